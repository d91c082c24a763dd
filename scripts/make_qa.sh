#!/usr/bin/env bash
# Rewrite medical text into QA pairs (or doctor-patient dialogues) in the release format, for step 2.
# With no arguments: the embedded sample text (data/raw/sample/text/, from step 0) with SmolLM2 on CPU
# -> data/sample_qa/. All flags: --help
source "$(dirname "$0")/env.sh"
exec python -m src.prepare.make_qa "$@"
