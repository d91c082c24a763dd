#!/usr/bin/env bash
# Step 2: priority-ordered, tokenized, packed training rows (train/, mixture.json, curriculum.png, train_rejects.jsonl).
# With no arguments: the embedded sample and SmolLM2 -> data/sample_SmolLM2-135M-Instruct/ (max_seq_len 1024).
# All flags: --help
source "$(dirname "$0")/scripts/env.sh"
exec python -m src.prepare.train_data "$@"
