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

from src.common.defaults import DEFAULT_MODEL_NAME
from src.evaluate.chat_core import EXAMPLES, NOTICE, ChatSettings, open_chat

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


def build_page(chat, sampling: ChatSettings):
    import gradio as gr

    def respond(message, history, greedy, temperature, top_p, repetition_penalty, max_new_tokens):
        s = ChatSettings(bool(greedy), float(temperature), float(top_p), float(repetition_penalty),
                         int(max_new_tokens))
        try:
            kept, dropped = chat.fit(_pairs(history), message)
        except ValueError as e:
            yield f"[{e}]"
            return
        note = f"[dropped the {dropped} oldest exchange(s) to stay within {chat.context} tokens]\n\n" if dropped else ""
        for text in chat.stream(kept, message, s):
            yield note + text

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.evaluate.web_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=f"models/{DEFAULT_MODEL_NAME}",
                   help="checkpoint folder or hub id (with --api-base: the tokenizer that counts the budget)")
    p.add_argument("--api-base", default=None, help="chat with an OpenAI-compatible server (serve.sh)")
    p.add_argument("--api-model", default=None)
    p.add_argument("--proxy-tuned")
    p.add_argument("--proxy-raw")
    p.add_argument("--format", default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    args = p.parse_args(argv)
    if bool(args.proxy_tuned) != bool(args.proxy_raw):
        p.error("--proxy-tuned and --proxy-raw go together")
    try:
        chat = open_chat(args.model, args.api_base, args.api_model, args.proxy_tuned, args.proxy_raw, args.format,
                         args.max_context, args.max_new_tokens)
    except ValueError as e:
        p.error(str(e))
    page = build_page(chat, ChatSettings(max_new_tokens=args.max_new_tokens))
    print(f"[web] {chat.name} on http://{args.host}:{args.port}", flush=True)
    page.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                        show_error=True)
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
