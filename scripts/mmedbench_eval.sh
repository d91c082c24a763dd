#!/usr/bin/env bash
# MMedBench (MMedLM's benchmark) end to end on the embedded default: step 0 (the sample, with its MMedBench part, and
# SmolLM2-135M-Instruct), step 1 (MMedLM's zero-shot prompts), step 4 (answers read robustly and by MMedLM's rule,
# accuracy per language and the mean of six, rationale similarity). docs/mmedbench.md explains every number.
#   bash scripts/mmedbench_eval.sh [step 4 flags, e.g. --limit-per-source 2 --max-new-tokens 300 --parsing reference]
# Environment (all optional):
#   MODEL      model to evaluate (default models/SmolLM2-135M-Instruct)
#   BENCH      MMedBench release (default: the sample, DATA_DIR/sample/mmedbench; the real one after
#              `bash 0.download_data.sh --hub --mmedbench` is data/raw/hub/MMedBench)
#   STYLE      step 1 prompt style: fixed (default) or mmedlm;  RATIONALE  with (default) or without
#   FORMAT     step 1 chat format (default: the model's; raw = MMedLM's layout without a chat template)
#   FINETUNE_STEPS  if set, MMedLM's protocol first: fine-tune MODEL on BENCH's Train split (steps 2 and 3, this many
#              optimizer steps) and evaluate that checkpoint
#   DATA_DIR   step 0's --data-dir (default data/raw);  PREP, CKPTS, RESULTS  output folders (default
#              data/$EXP, ckpts/$EXP, results/$EXP with EXP=mmedbench_sample_<model name>)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
MODEL="${MODEL:-models/SmolLM2-135M-Instruct}"
DATA_DIR="${DATA_DIR:-data/raw}"
BENCH="${BENCH:-$DATA_DIR/sample/mmedbench}"
EXP="mmedbench_sample_$(basename "$MODEL")"
PREP="${PREP:-data/$EXP}"
CKPTS="${CKPTS:-ckpts/$EXP}"
RESULTS="${RESULTS:-results/$EXP}"
STEP1=(--bench "$BENCH" --prompt-style "${STYLE:-fixed}" --rationale "${RATIONALE:-with}" --out "$PREP")
if [ -n "${FORMAT:-}" ]; then STEP1+=(--format "$FORMAT"); fi

python -m src.download.download_data --data-dir "$DATA_DIR"
python -m src.prepare.bench_prompts --model "$MODEL" "${STEP1[@]}"
if [ -n "${FINETUNE_STEPS:-}" ]; then
  # Train/ as MMedLM fine-tunes on it: every item with its rationale and answer only, the loss on the target
  python -m src.prepare.train_data --data "$BENCH" --model "$MODEL" --out "$PREP" --prompt-style "${STYLE:-fixed}" \
    --max-seq-len 1024 ${FORMAT:+--format "$FORMAT"}
  bash 3.single_node_train.sh --model "$MODEL" --train "$PREP/train" --out "$CKPTS" --max-steps "$FINETUNE_STEPS" \
    --batch-size 1 --grad-accum 1 --save-every 0 --max-ckpts 1 --eval-every -1 --overwrite
  MODEL="$(python -c "from src.train.checkpoint import latest_checkpoint; print(latest_checkpoint('$CKPTS'))")"
fi
python -m src.evaluate.eval --model "$MODEL" --input "$PREP/test.jsonl" --out "$RESULTS" "$@"
