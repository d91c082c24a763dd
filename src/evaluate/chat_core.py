"""The chat core shared by the terminal chat (``cli_demo.py``) and the web chat (``web_demo.py``).

A chat is either *local* (a checkpoint the project loads, decoded here token by token in its chat format) or
*served* (an OpenAI-compatible server, ``scripts/serve.sh``, streamed from ``/v1/chat/completions``). Both offer the
same two calls:

* ``fit(history, message)``: the history kept within the context budget (oldest exchanges dropped first) and how many
  exchanges were dropped; ``ValueError`` when the message alone does not fit;
* ``stream(history, message, sampling)``: the reply text so far, growing piece by piece.

The budget is counted with the checkpoint's tokenizer in its chat format (for a server, the ``--model`` folder names
that tokenizer; the server renders the messages with its own chat template, the same layout for our checkpoints).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import torch

NOTICE = ("This is a research model: it makes mistakes and is NOT medical advice; follow your doctor's advice.")
EXAMPLES = [
    "What are the first symptoms of type 2 diabetes?",
    "¿Cuáles son las causas más frecuentes de anemia?",
    "Quels sont les signes d'une appendicite ?",
    "高血压患者在饮食上应该注意什么？",
    "ما هي أعراض نقص فيتامين د؟",
    "बच्चों में निर्जलीकरण के लक्षण क्या हैं?",
]
CLEAR, QUIT = {"clear", "/clear"}, {"quit", "exit", "stop", "/quit", "/exit"}


@dataclass
class Sampling:
    """Apollo's demo defaults: temperature 0.3, top-p 0.7, repetition penalty 1.1."""
    greedy: bool = False
    temperature: float = 0.3
    top_p: float = 0.7
    repetition_penalty: float = 1.1
    max_new_tokens: int = 512


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
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

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


class _Chat:
    def __init__(self, name: str, tokenizer, fmt, context: int, max_new_tokens: int):
        self.name, self.tokenizer, self.fmt, self.context = name, tokenizer, fmt, context
        self.budget = context - max_new_tokens
        if self.budget <= 0:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in a context of {context} tokens")

    def fit(self, history: list[tuple[str, str]], message: str) -> tuple[list[tuple[str, str]], int]:
        _, dropped = fit_history(self.fmt, self.tokenizer, history, message, self.budget)
        return history[dropped:], dropped


class LocalChat(_Chat):
    """A checkpoint decoded in this process (dense, Post-MoE or a proxy-tuning wrapper)."""

    def __init__(self, name, model, tokenizer, fmt, context: int, max_new_tokens: int):
        super().__init__(name, tokenizer, fmt, context, max_new_tokens)
        self.model = model
        self.stop_ids = {i for i in (fmt.stop_token(tokenizer), tokenizer.eos_token_id) if i is not None}

    def stream(self, history, message: str, s: Sampling) -> Iterator[str]:
        prompt = self.fmt.render([t for pair in history for t in pair] + [message], open_last=True)
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(self.model.device)
        tokens: list[int] = []
        for token in stream_tokens(self.model, ids, max_new_tokens=s.max_new_tokens, stop_ids=self.stop_ids,
                                   greedy=s.greedy, temperature=s.temperature, top_p=s.top_p,
                                   repetition_penalty=s.repetition_penalty):
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text
        yield self.tokenizer.decode(tokens, skip_special_tokens=True)


class ServedChat(_Chat):
    """A model behind an OpenAI-compatible server, streamed from its chat endpoint."""

    def __init__(self, name, client, tokenizer, fmt, context: int, max_new_tokens: int):
        super().__init__(name, tokenizer, fmt, context, max_new_tokens)
        self.client = client
        self.engine = client.engine()

    def params(self, s: Sampling) -> dict:
        """Sampling fields in the form each server takes (transformers serve only follows a full generation config
        for sampling; vLLM names the repetition penalty itself)."""
        if self.engine == "transformers":
            config = {"do_sample": not s.greedy, "max_new_tokens": s.max_new_tokens,
                      "repetition_penalty": s.repetition_penalty,
                      "eos_token_id": sorted({i for i in (self.fmt.stop_token(self.tokenizer),
                                                          self.tokenizer.eos_token_id) if i is not None})}
            if not s.greedy:
                config.update(temperature=s.temperature, top_p=s.top_p)
            return {"max_tokens": s.max_new_tokens, "generation_config": json.dumps(config)}
        params = {"max_tokens": s.max_new_tokens, "temperature": 0 if s.greedy else s.temperature,
                  "top_p": 1.0 if s.greedy else s.top_p}
        if self.engine == "vllm":
            params["repetition_penalty"] = s.repetition_penalty
        return params

    def stream(self, history, message: str, s: Sampling) -> Iterator[str]:
        messages = []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": message})
        text = ""
        for piece in self.client.chat_stream(messages, **self.params(s)):
            text += piece
            yield text
        yield text


def open_chat(model: str, api_base: str | None = None, api_model: str | None = None, proxy_tuned: str | None = None,
              proxy_raw: str | None = None, fmt_name: str | None = None, max_context: int | None = None,
              max_new_tokens: int = 512):
    """A LocalChat for ``model`` (with proxy models if given), or a ServedChat for the server at ``api_base``
    (``model`` then names the tokenizer/chat format used for the context budget)."""
    from src.common.chat_formats import resolve_format
    from src.models.loading import load_config, load_model, load_tokenizer

    tokenizer = load_tokenizer(model)
    config = load_config(model)  # also reads our Post-MoE folders
    fmt = resolve_format(tokenizer, config, fmt_name)
    context = max_context or min(getattr(config, "max_position_embeddings", 4096) or 4096, 8192)
    if api_base:
        from src.common.openai_client import SERVER_DEFAULT, ApiError, OpenAIClient

        client = OpenAIClient(api_base, api_model)
        if client.model is None:
            try:
                client.default_model()
            except ApiError:  # transformers serve offline lists nothing, and answers with its one model
                client.model = SERVER_DEFAULT
        return ServedChat(f"{client.model or model} at {client.base}", client, tokenizer, fmt, context,
                          max_new_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if proxy_tuned:
        from src.models.proxy_tuning import load_proxy_tuned

        net, tokenizer = load_proxy_tuned(model, proxy_tuned, proxy_raw, device=device)
    else:
        net = load_model(model, device=device).eval()
    return LocalChat(model, net, tokenizer, fmt, context, max_new_tokens)
