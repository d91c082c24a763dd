#!/usr/bin/env bash
# The Post-MoE path on the embedded default: upcycle SmolLM2 into language-family experts (last 2 layers, 7 experts,
# top-2), train a few steps on step 2's rows with hybrid routing, and score 2 items per source with step 4 (a demo:
# drop --limit-per-source to score all), then draw the routing heat map. It ends by exporting the trained checkpoint
# to transformers' stock Qwen2MoeForCausalLM, scoring that export with step 4 (same chat format) and checking that
# every extracted letter equals the one from the project's own MoE folder.
# Runs steps 0-2 first if their outputs are missing. The export and its scores are derived from this run's
# checkpoint and are rewritten on every run (--overwrite on those two only). CPU, a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
EXP=sample_SmolLM2-135M-Instruct
{ [ -f models/SmolLM2-135M-Instruct/config.json ] && [ -f data/raw/sample/bench_test.json ]; } || bash 0.download_data.sh
[ -f "data/$EXP/test.jsonl" ] || bash 1.data_process_test_dev.sh --out "data/$EXP"
[ -f "data/$EXP/mixture.json" ] || bash 2.data_process_train.sh --out "data/$EXP"
bash scripts/upcycle_moe.sh --model models/SmolLM2-135M-Instruct --out models/SmolLM2-135M-MoE \
  --experts 7 --top-k 2 --moe-layers 2 --overwrite
bash 3.single_node_train.sh --model models/SmolLM2-135M-MoE --expect moe --train "data/$EXP/train" \
  --dev "data/$EXP/dev.jsonl" --out "ckpts/${EXP}_moe" --max-steps 3 --batch-size 1 --grad-accum 1 \
  --save-every 0 --max-ckpts 1 --eval-every 0 --dev-limit 7 --dev-batch-size 7 --dev-max-new-tokens 8 --overwrite
CKPT="$(python -c "from src.train.checkpoint import latest_checkpoint; print(latest_checkpoint('ckpts/${EXP}_moe'))")"
bash 4.eval.sh --model "$CKPT" --input "data/$EXP/test.jsonl" --out "results/${EXP}_moe" --limit-per-source 2
python -m util.routing_analysis --model "$CKPT" --input "data/$EXP/test.jsonl" --out "results/${EXP}_moe/routing" --limit 4

# Stock export: scored with the chat format step 4 resolved for our folder (a stock qwen2_moe type alone would
# select the Qwen2 format), then compared letter by letter.
python -m util.moe_export --model "$CKPT" --out models/SmolLM2-135M-MoE-stock --overwrite
FORMAT="$(python -c "import json; print(json.load(open('results/${EXP}_moe/run.json'))['settings']['resolved_format'])")"
bash 4.eval.sh --model models/SmolLM2-135M-MoE-stock --input "data/$EXP/test.jsonl" --out "results/${EXP}_moe_stock" \
  --limit-per-source 2 --format "$FORMAT" --overwrite
python -m util.compare_predictions "results/${EXP}_moe/predictions.jsonl" \
  "results/${EXP}_moe_stock/predictions.jsonl"
