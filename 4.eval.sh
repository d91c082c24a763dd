#!/usr/bin/env bash
# Step 4: XMedBench scoring -> results/<exp>/predictions.jsonl, score.json, score.md (prints the table).
# With no arguments: SmolLM2-135M-Instruct on the embedded sample (data/sample_SmolLM2-135M-Instruct/test.jsonl).
# Multi-GPU: accelerate launch -m src.evaluate.eval <same flags>. All flags: --help
source "$(dirname "$0")/scripts/env.sh"
exec python -m src.evaluate.eval "$@"
