#!/usr/bin/env bash
# The main job: steps 0-4 end to end on the embedded default (our sample data + SmolLM2-135M-Instruct), on CPU.
# Creates or reuses .venv. Each step can also be run on its own with its own flags (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/env.sh
EXP=sample_SmolLM2-135M-Instruct
bash 0.download_data.sh                                  # sample -> data/raw/sample, SmolLM2 -> models/
bash 1.data_process_test_dev.sh --out "data/$EXP"        # 3-shot test/dev prompts
bash 2.data_process_train.sh --out "data/$EXP"           # priority-ordered, packed training rows
bash 3.single_node_train.sh                              # a few CPU training steps -> ckpts/$EXP
CKPT="$(python -c "from src.train.checkpoint import latest_checkpoint; print(latest_checkpoint('ckpts/$EXP'))")"
bash 4.eval.sh --model "$CKPT" --input "data/$EXP/test.jsonl" --out "results/$EXP"
