#!/usr/bin/env bash
# Step 1: k-shot XMedBench prompts (test.jsonl, dev.jsonl, report.json) for one model's chat format.
# With no arguments: the embedded sample and SmolLM2 -> data/sample_SmolLM2-135M-Instruct/. All flags: --help
source "$(dirname "$0")/scripts/env.sh"
exec python -m src.prepare.bench_prompts "$@"
