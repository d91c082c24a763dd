#!/usr/bin/env bash
# The main job: steps 0-4 end to end on the embedded default (our sample data + SmolLM2-135M-Instruct), on CPU.
# Creates or reuses .venv. Each step can also be run on its own with its own flags (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
EXP=data/sample_SmolLM2-135M-Instruct
bash 0.download_data.sh
bash 1.data_process_test_dev.sh --out "$EXP"
