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

from src.evaluate.chat_core import CLEAR, NOTICE, QUIT, ChatSettings
from src.evaluate.config import ChatConfig, add_chat_args

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.evaluate.cli_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_args(p)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--top-p", type=float, default=0.7)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = ChatConfig.from_args(build_parser().parse_args(argv))
    torch.manual_seed(cfg.seed)
    chat = cfg.open()
    settings = cfg.reply_settings()
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
