"""Chat with a checkpoint in the terminal (or through a pipe: one message per line).

    python -m src.evaluate.cli_demo --model ckpts/my-run/checkpoint-final
    python -m src.evaluate.cli_demo --model BIG --proxy-tuned SMALL_TUNED --proxy-raw SMALL_BASE
    python -m src.evaluate.cli_demo --api-base http://127.0.0.1:8000/v1 [--model FOLDER]   # a server (serve.sh)

Any checkpoint the project loads (dense, Post-MoE, a hub id or a local folder) in its chat format from the registry,
or a model behind an OpenAI-compatible server (``--model`` then names the tokenizer that counts the context budget).
Replies stream as they are made; the history is kept within the model's context by dropping the oldest exchanges;
sampling defaults follow Apollo's demo (temperature 0.3, top-p 0.7, repetition penalty 1.1; ``--greedy`` for
deterministic replies). Commands: ``clear`` empties the history, ``quit`` (or ``exit``, ``stop``) leaves.
The chat itself lives in ``chat_core.py``, shared with the web chat (``web_demo.py``).
"""
from __future__ import annotations

import argparse
import sys

import torch

from src.common.defaults import DEFAULT_MODEL_NAME
from src.evaluate.chat_core import CLEAR, NOTICE, QUIT, ChatSettings, open_chat

BANNER = "Medical chat with {model}. " + NOTICE + "\nType 'clear' to forget the conversation, 'quit' to leave."


def reply(chat, history, message: str, settings: ChatSettings, out=sys.stdout) -> str:
    """Stream one reply to ``out`` and return its text."""
    shown = ""
    for text in chat.stream(history, message, settings):
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write("\n")
    out.flush()
    return shown.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.evaluate.cli_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"models/{DEFAULT_MODEL_NAME}", help="checkpoint folder or hub id")
    p.add_argument("--api-base", default=None, help="chat with an OpenAI-compatible server instead (serve.sh)")
    p.add_argument("--api-model", default=None, help="model name on the server (default: the one it serves)")
    p.add_argument("--proxy-tuned", help="small tuned model: decode --model with logits base + (tuned - raw)")
    p.add_argument("--proxy-raw", help="the small model before tuning (needed with --proxy-tuned)")
    p.add_argument("--format", default=None, help="chat format name (default: from the model)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-context", type=int, default=None,
                   help="token budget for history + reply (default: the model's max_position_embeddings, at most 8192)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if bool(args.proxy_tuned) != bool(args.proxy_raw):
        p.error("--proxy-tuned and --proxy-raw go together")
    if args.api_base and args.proxy_tuned:
        p.error("--api-base takes no proxy models")

    torch.manual_seed(args.seed)
    try:
        chat = open_chat(args.model, args.api_base, args.api_model, args.proxy_tuned, args.proxy_raw, args.format,
                         args.max_context, args.max_new_tokens)
    except ValueError as e:
        p.error(str(e))
    settings = ChatSettings(args.greedy, args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a bad byte must not end the chat and lose its history
        sys.stdin.reconfigure(errors="replace")
    print(BANNER.format(model=chat.name), flush=True)
    history: list[tuple[str, str]] = []
    while True:
        if interactive:
            try:
                line = input("\nUser: ")
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        message = line.strip()
        if not message:
            continue
        if "\ufffd" in message:
            print("[warning: the input was not valid UTF-8; invalid bytes were replaced by \ufffd]", flush=True)
        if message.lower() in QUIT:
            break
        if message.lower() in CLEAR:
            history.clear()
            print("[history cleared]", flush=True)
            continue
        try:
            history, dropped = chat.fit(history, message)
        except ValueError as e:
            print(f"[{e}]", flush=True)
            continue
        if dropped:
            print(f"[dropped the {dropped} oldest exchange(s) to stay within {chat.context} tokens]", flush=True)
        print("Assistant: ", end="", flush=True)
        history.append((message, reply(chat, history, message, settings)))
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
