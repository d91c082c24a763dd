#!/usr/bin/env bash
# The test suite, offline, on CPU. Creates or reuses .venv. Extra arguments go to pytest (e.g. -k step1).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest -q tests "$@"
