#!/usr/bin/env bash
# Upcycle a dense checkpoint into a Post-MoE one (7 family experts, top-2, last 2 layers by default).
# No arguments: the embedded default model, models/SmolLM2-135M-Instruct -> models/SmolLM2-135M-MoE.
# Any arguments go to `python -m util.upcycle_moe` (see --help).
source "$(dirname "$0")/env.sh"
if [ "$#" -eq 0 ]; then
  if [ ! -f models/SmolLM2-135M-Instruct/config.json ]; then
    echo "models/SmolLM2-135M-Instruct is missing: run ./0.download_data.sh first (it converts the embedded model)" >&2
    exit 1
  fi
  set -- --model models/SmolLM2-135M-Instruct --out models/SmolLM2-135M-MoE --overwrite  # the same model again
fi
exec python -m util.upcycle_moe "$@"
