"""The in-process token loop: one prompt, one new token at a time with a KV cache, greedy or sampled with transformers'
own logits processors. It works with anything called like a causal LM (a transformers model, our Post-MoE, the
proxy-tuning wrapper), so every in-process backend streams through it (the chats, the judge's answers)."""
from __future__ import annotations

from typing import Iterator

import torch

from src.generation.types import Sampling


def processors(sampling: Sampling):
    """transformers' logits processors for ``sampling``: the repetition penalty, then temperature, top-k, top-p."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if not sampling.greedy:
        out.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            out.append(TopKLogitsWarper(sampling.top_k))
        out.append(TopPLogitsWarper(sampling.top_p))
    return out


@torch.no_grad()
def stream_tokens(model, input_ids: torch.Tensor, *, max_new_tokens: int, stop_ids, sampling: Sampling,
                  min_new_tokens: int = 0, generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield new token ids one at a time (batch of one), stopping on any of ``stop_ids`` (not yielded; suppressed
    during the first ``min_new_tokens``) or after ``max_new_tokens``. Sampling draws from ``generator``, or from one
    seeded with ``sampling.seed`` when that is set."""
    chain = processors(sampling)
    if generator is None and sampling.seed is not None and not sampling.greedy:
        generator = torch.Generator(device=input_ids.device).manual_seed(sampling.seed)
    stops = list(stop_ids)
    seq, cache, step_input = input_ids, None, input_ids
    for n in range(max_new_tokens):
        out = model(input_ids=step_input, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        scores = chain(seq, out.logits[:, -1, :].float())
        if n < min_new_tokens and stops:
            scores[:, stops] = -float("inf")
        if sampling.greedy:
            token = int(scores.argmax(-1))
        else:
            token = int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))
        if token in stops:
            return
        yield token
        step_input = torch.tensor([[token]], device=seq.device)
        seq = torch.cat([seq, step_input], dim=1)
