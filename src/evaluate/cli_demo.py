"""Chat with a checkpoint in the terminal (or through a pipe: one message per line).

    python -m src.evaluate.cli_demo --model ckpts/my-run/checkpoint-final
    python -m src.evaluate.cli_demo --model BIG --proxy-tuned SMALL_TUNED --proxy-raw SMALL_BASE

Any checkpoint the project loads (dense, Post-MoE, a hub id or a local folder) in its chat format from the registry.
Replies stream token by token; the history is kept within the model's context by dropping the oldest exchanges;
sampling defaults follow Apollo's demo (temperature 0.3, top-p 0.7, repetition penalty 1.1; ``--greedy`` for
deterministic replies). Commands: ``clear`` empties the history, ``quit`` (or ``exit``, ``stop``) leaves.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterator

import torch

BANNER = ("Medical chat with {model}. This is a research model: it makes mistakes and is NOT medical advice; "
          "follow your doctor's advice.\nType 'clear' to forget the conversation, 'quit' to leave.")
CLEAR, QUIT = {"clear", "/clear"}, {"quit", "exit", "stop", "/quit", "/exit"}


def fit_history(fmt, tokenizer, history: list[tuple[str, str]], question: str, budget: int) -> tuple[str, int]:
    """Render history + question as a prompt of at most ``budget`` tokens, dropping the oldest exchanges first.

    Returns (prompt, number of exchanges dropped). Raises ValueError when the question alone does not fit."""
    for dropped in range(len(history) + 1):
        turns = [t for pair in history[dropped:] for t in pair] + [question]
        prompt = fmt.render(turns, open_last=True)
        if len(tokenizer(prompt, add_special_tokens=False).input_ids) <= budget:
            return prompt, dropped
    raise ValueError(f"the message alone is longer than the context budget of {budget} tokens")


@torch.no_grad()
def stream_tokens(model, input_ids: torch.Tensor, *, max_new_tokens: int, stop_ids: set[int], greedy: bool = False,
                  temperature: float = 0.3, top_p: float = 0.7, repetition_penalty: float = 1.1,
                  generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (batch of one) with a KV cache, stopping on any of ``stop_ids``.

    Works with anything called like a causal LM (a transformers model, ``ProxyTuned``). The sampling pieces are
    transformers' own logits processors."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopPLogitsWarper)

    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if not greedy:
        processors += [TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)]
    seq, cache, step_input = input_ids, None, input_ids
    for _ in range(max_new_tokens):
        out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        scores = processors(seq, out.logits[:, -1, :].float())
        if greedy:
            token = int(scores.argmax(-1))
        else:
            token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
        if token in stop_ids:
            return
        yield token
        step_input = torch.tensor([[token]], device=seq.device)
        seq = torch.cat([seq, step_input], dim=1)


def reply(model, tokenizer, prompt: str, args, stop_ids: set[int], out=sys.stdout) -> str:
    """Stream one reply to ``out`` and return its text."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
    tokens: list[int] = []
    shown = ""
    for token in stream_tokens(model, ids, max_new_tokens=args.max_new_tokens, stop_ids=stop_ids,
                               greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                               repetition_penalty=args.repetition_penalty):
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(shown):])
            out.flush()
            shown = text
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text.strip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.evaluate.cli_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct", help="checkpoint folder or hub id")
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

    from ..common.chat_formats import resolve_format
    from ..models.loading import load_model, load_tokenizer

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.proxy_tuned:
        from ..models.proxy_tuning import load_proxy_tuned

        model, tokenizer = load_proxy_tuned(args.model, args.proxy_tuned, args.proxy_raw, device=device)
    else:
        tokenizer = load_tokenizer(args.model)
        model = load_model(args.model, device=device).eval()
    fmt = resolve_format(tokenizer, model.config, args.format)
    stop_ids = {i for i in (fmt.stop_token(tokenizer), tokenizer.eos_token_id) if i is not None}
    context = args.max_context or min(getattr(model.config, "max_position_embeddings", 4096) or 4096, 8192)
    budget = context - args.max_new_tokens
    if budget <= 0:
        p.error(f"--max-new-tokens {args.max_new_tokens} leaves no room in a context of {context} tokens")

    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a bad byte must not end the chat and lose its history
        sys.stdin.reconfigure(errors="replace")
    print(BANNER.format(model=args.model), flush=True)
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
            prompt, dropped = fit_history(fmt, tokenizer, history, message, budget)
        except ValueError as e:
            print(f"[{e}]", flush=True)
            continue
        if dropped:
            history = history[dropped:]
            print(f"[dropped the {dropped} oldest exchange(s) to stay within {context} tokens]", flush=True)
        print("Assistant: ", end="", flush=True)
        history.append((message, reply(model, tokenizer, prompt, args, stop_ids)))
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
