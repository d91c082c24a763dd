#!/usr/bin/env bash
# Step 3: train on step 2's rows with accelerate + DeepSpeed (ZeRO-1/2/3) on one node -> CKPTDIR/checkpoint-<step>/.
#   bash 3.single_node_train.sh --model M --train DIR --dev D.jsonl --out CKPTDIR [--zero 1|2|3] [--lr] [...]
# All flags: python -m src.train.train --help (docs/train.md). Environment:
#   NUM_PROCESSES  processes to start (default: the number of GPUs, 1 on a CPU-only machine)
#   MAIN_PORT      rendezvous port (default 29503; a busy port makes accelerate pick a free one)
# With no arguments: a short CPU-sized run of SmolLM2-135M-Instruct on the embedded default's step 2 output
# (data/sample_SmolLM2-135M-Instruct/train) -> ckpts/sample_SmolLM2-135M-Instruct/.
source "$(dirname "$0")/scripts/env.sh"
if [ $# -eq 0 ]; then
  EXP=sample_SmolLM2-135M-Instruct
  set -- --model models/SmolLM2-135M-Instruct --train "data/$EXP/train" --dev "data/$EXP/dev.jsonl" \
    --out "ckpts/$EXP" --max-steps 3 --batch-size 1 --grad-accum 1 --save-every 0 --max-ckpts 1 \
    --eval-every 0 --dev-limit 7 --dev-batch-size 7 --dev-max-new-tokens 8 --overwrite  # a demo: retrain afresh
fi
if [ -z "${NUM_PROCESSES:-}" ]; then
  NUM_PROCESSES="$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi
if [ "$NUM_PROCESSES" = 1 ]; then
  # One process needs no launcher (train.py gives itself a world of one): it starts faster.
  exec python -m src.train.train "$@"
fi
# accelerate launch, reporting a failed run as one line per distinct error with the ranks' exit code (2: a user
# mistake; 130: Ctrl-C) instead of torch's traceback: src/train/launch.py.
exec python -m src.train.launch --config_file src/train/configs/single_node.yaml \
  --num_processes "$NUM_PROCESSES" --num_machines 1 --main_process_port "${MAIN_PORT:-29503}" \
  -m src.train.train "$@"
