#!/usr/bin/env bash
# Step 4: XMedBench scoring -> results/<exp>/predictions.jsonl, score.json, score.md (prints the table).
# With no arguments: SmolLM2-135M-Instruct on the embedded sample (data/sample_SmolLM2-135M-Instruct/test.jsonl).
# Multi-GPU: python -m src.train.launch --num_processes N -m src.evaluate.eval <same flags> (or accelerate launch).
# All flags: --help
source "$(dirname "$0")/scripts/env.sh"
exec python -m src.evaluate.eval "$@"
