#!/usr/bin/env bash
# The GPU check of the serving issue (NOT YET RUN: no GPU was lent when it was written). On one GPU node with vLLM
# installed in the project's venv (pip install vllm), models/SmolLM2-135M-Instruct made by 0.download_data.sh (or
# MODEL=<a local Qwen2-0.5B folder>) and the real XMedBench slice in ../shared/data/xmedbench:
#   vllm serve MODEL in bf16  vs  the reference-style HF generate loop (batch 4, bf16, same prompts, same extractor)
#   on ITEMS (default 500) real 3-shot items. Targets: >= 10x faster, >= 99% identical letters.
# Finishes in under 8 minutes (hard limit below); figures go to results/gpu_serving_check.json; record them, and
# the GPU name it prints, in the README's Serving section.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
export HF_HUB_OFFLINE=1
MODEL="${MODEL:-models/SmolLM2-135M-Instruct}"
ITEMS="${ITEMS:-500}"
python -c "import vllm, torch; assert torch.cuda.is_available(), 'no GPU'" || { echo "needs vLLM and a GPU" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 python bench/eval_speed.py --model "$MODEL" --device cuda --backend openai --serve vllm \
  --items "$ITEMS" --max-prompt-tokens 2048 --concurrency 64 --threads 0 --skip-fixed --skip-floor --skip-ours \
  --json results/gpu_serving_check.json
