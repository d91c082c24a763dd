"""A web chat (gradio) with a checkpoint or a server, sharing the chat core with the terminal chat.

    python -m src.evaluate.web_demo --model models/SmolLM2-135M-Instruct [--port 7860]
    python -m src.evaluate.web_demo --api-base http://127.0.0.1:8000/v1 [--model FOLDER] [--port 7860]

gradio's ChatInterface: replies stream as they are made, the history is kept within the context budget (oldest
exchanges dropped first, as in the terminal chat), the chat window's clear button empties it, the sampling controls
sit under "Sampling", example questions come in several languages, and the page says it is not medical advice.
The page listens on 127.0.0.1 unless ``--host`` says otherwise.
"""
from __future__ import annotations

import argparse
import sys

from src.evaluate.chat_core import EXAMPLES, NOTICE, ChatSettings
from src.evaluate.config import ChatConfig, add_chat_args

TITLE = "Medical chat"


def _pairs(history: list) -> list[tuple[str, str]]:
    """gradio's message list -> (question, answer) pairs (an unanswered question is left out)."""
    pairs, question = [], None
    for m in history:
        role, content = m.get("role"), m.get("content")
        if isinstance(content, list):  # gradio may hand text back as a list of parts
            content = " ".join(c.get("text", "") if isinstance(c, dict) else str(c) for c in content)
        if role == "user":
            question = content
        elif role == "assistant" and question is not None:
            pairs.append((question, content or ""))
            question = None
    return pairs


def replies(chat, message: str, history: list, settings: ChatSettings):
    """What the page shows while ``chat`` answers ``message`` after gradio's ``history``: the reply so far, after a
    note when old exchanges were dropped to fit the context; a message that cannot fit is one bracketed line."""
    try:
        kept, dropped = chat.fit(_pairs(history), message)
    except ValueError as e:
        yield f"[{e}]"
        return
    note = f"[dropped the {dropped} oldest exchange(s) to stay within {chat.context} tokens]\n\n" if dropped else ""
    for text in chat.stream(kept, message, settings):
        yield note + text


def build_page(chat, sampling: ChatSettings):
    import gradio as gr

    def respond(message, history, greedy, temperature, top_p, repetition_penalty, max_new_tokens):
        s = ChatSettings(bool(greedy), float(temperature), float(top_p), float(repetition_penalty),
                         int(max_new_tokens))
        yield from replies(chat, message, history, s)

    controls = [
        gr.Checkbox(sampling.greedy, label="Greedy (deterministic)"),
        gr.Slider(0.05, 1.5, sampling.temperature, step=0.05, label="Temperature"),
        gr.Slider(0.05, 1.0, sampling.top_p, step=0.05, label="Top-p"),
        gr.Slider(1.0, 2.0, sampling.repetition_penalty, step=0.05, label="Repetition penalty"),
        gr.Slider(16, max(16, sampling.max_new_tokens), sampling.max_new_tokens, step=16, label="Max new tokens"),
    ]
    return gr.ChatInterface(
        respond, title=TITLE, description=f"Model: `{chat.name}`. **{NOTICE}**",
        chatbot=gr.Chatbot(label="Conversation", elem_id="chat"), additional_inputs=controls,
        additional_inputs_accordion=gr.Accordion("Sampling", open=False),
        examples=[[q] for q in EXAMPLES], run_examples_on_click=False, cache_examples=False,
        fill_height=True, flagging_mode="never")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m src.evaluate.web_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = ChatConfig.from_args(build_parser().parse_args(argv))
    chat = cfg.open()
    page = build_page(chat, ChatSettings(max_new_tokens=cfg.max_new_tokens))
    print(f"[web] {chat.name} on http://{cfg.host}:{cfg.port}", flush=True)
    page.queue().launch(server_name=cfg.host, server_port=cfg.port, share=False, inbrowser=False,
                        show_error=True)
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
