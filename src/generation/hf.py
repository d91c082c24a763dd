"""The ``hf`` backend: transformers' own ``generate``, nothing else.

The custom engine (engine.py) stops each row at the end of its first non-empty line, shares prompt prefixes and
merges KV caches, which leans on transformers internals (cache layers, attention registries). This backend does none
of that: greedy prompts go in batches, left-padded with an attention mask (``padding.left_padded``), to ``generate``
with ``min_new_tokens`` and the stop tokens, and every row decodes to a stop token or ``max_new_tokens``
(``stop_at_line`` is not used: the first line's text is the same either way). Sampled prompts go one at a time, each
seeded on its own (``Sampling.seed``), so a prompt's text does not depend on the prompts beside it. It is step 4's
fallback after a library upgrade (``--engine hf``; same letters as the custom engine, slower), the reference-style
loop of the speed benchmark (``sort_by_length=False``, file order), and the QA rewriting's in-process generator.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from src.generation.padding import left_padded
from src.generation.types import Generation, GenerationConfig, Prompt


class HFGenerate:
    """``generate`` over one model: ``batch_size`` greedy prompts per call, longest first (``sort_by_length``) or in
    their order. ``logits_processor`` goes to every ``generate`` call unchanged (tests bias a random model with it)."""

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 8, sort_by_length: bool = True, logits_processor=None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.sort_by_length = batch_size, sort_by_length
        self.logits_processor = logits_processor

    def generate(self, prompts: list[Prompt], config: GenerationConfig,
                 on_result: Callable[[Generation], None] | None = None, progress: bool = False,
                 stats: dict | None = None, desc: str = "generate (hf)") -> list[Generation]:
        from tqdm import tqdm

        order = list(range(len(prompts)))
        if self.sort_by_length:
            order.sort(key=lambda i: (-len(prompts[i].ids), i))
        size = self.batch_size if config.sampling.greedy else 1  # a sampled prompt is seeded on its own
        out: list = [None] * len(prompts)
        counts = {"items": 0, "batches": 0, "new_tokens": 0, "stops": {}}
        t0 = time.time()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress,
                                       dynamic_ncols=True) as bar:
                for s in range(0, len(order), size):
                    batch = order[s:s + size]
                    for g in self._batch(prompts, batch, config):
                        out[g.index] = g
                        counts["new_tokens"] += g.new_tokens
                        counts["stops"][g.stop] = counts["stops"].get(g.stop, 0) + 1
                        if on_result is not None:
                            on_result(g)
                    counts["items"] += len(batch)
                    counts["batches"] += 1
                    bar.update(len(batch))
        finally:
            self.model.train(was_training)
        if stats is not None:
            stats.update(counts, seconds=round(time.time() - t0, 3))
        return out

    def _batch(self, prompts: list[Prompt], batch: list[int], config: GenerationConfig) -> list[Generation]:
        stops = list(config.stop_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        ids, mask = left_padded([prompts[i].ids for i in batch], pad)
        device = self.model.device
        inputs = {"input_ids": torch.tensor(ids, device=device), "attention_mask": torch.tensor(mask, device=device)}
        with _seeded(config.sampling.seed if not config.sampling.greedy else None, device):
            rows = self.model.generate(**inputs, **generate_kwargs(config, pad),
                                       logits_processor=self.logits_processor)[:, len(ids[0]):].tolist()
        return [self._result(i, row, stops, len(prompts[i].ids)) for i, row in zip(batch, rows)]

    def _result(self, index: int, row: list[int], stops: list[int], prompt_tokens: int) -> Generation:
        """Cut a generated row at its first stop token (generate pads finished rows with ``pad`` after it)."""
        n, stop = len(row), "max_tokens"
        for k, tok in enumerate(row):
            if tok in stops:
                n, stop = k + 1, "eos"
                break
        return Generation(index, row[:n], self.tokenizer.decode(row[:n], skip_special_tokens=True), stop,
                          prompt_tokens)


def generate_kwargs(config: GenerationConfig, pad_id: int) -> dict:
    """``generate``'s arguments for a config: greedy (no sampling knobs, so a checkpoint's generation config cannot
    turn sampling on) or sampled (top-k off unless asked for)."""
    s = config.sampling
    kwargs = {"max_new_tokens": config.max_new_tokens, "eos_token_id": list(config.stop_ids), "pad_token_id": pad_id}
    if config.min_new_tokens:
        kwargs["min_new_tokens"] = config.min_new_tokens
    if s.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = s.repetition_penalty
    if s.greedy:
        return {**kwargs, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {**kwargs, "do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k or 0}


class _seeded:
    """torch's global generator seeded for one call and restored after it (``None``: nothing changes)."""

    def __init__(self, seed: int | None, device):
        self.seed, self.device = seed, torch.device(device)
        self._fork = None

    def __enter__(self):
        if self.seed is not None:
            devices = [self.device.index or 0] if self.device.type == "cuda" else []
            self._fork = torch.random.fork_rng(devices=devices)
            self._fork.__enter__()
            torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        if self._fork is not None:
            self._fork.__exit__(*exc)
