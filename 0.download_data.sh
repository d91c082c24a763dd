#!/usr/bin/env bash
# Step 0: install the embedded default (no arguments) or download data, bench and a base model (--hub).
# All flags: bash 0.download_data.sh --help
source "$(dirname "$0")/scripts/env.sh"
exec python -m src.download.download_data "$@"
