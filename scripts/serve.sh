#!/usr/bin/env bash
# Serve a checkpoint through an OpenAI-compatible engine: vllm serve on a GPU node (when vLLM is installed),
# transformers serve otherwise. Prints the base URL for `4.eval.sh --backend openai --api-base URL`, the chat demos
# and bench/eval_speed.py; Ctrl-C stops it. Flags after `--` go to the engine. All flags: --help
#   scripts/serve.sh --model CKPT [--engine auto|vllm|transformers] [--host 127.0.0.1] [--port 8000] [-- ENGINE FLAGS]
source "$(dirname "$0")/env.sh"
exec python -m src.serving.launch "$@"
