"""Step 4 with plain ``model.generate`` (``--engine hf``): the fallback and the baseline of the custom engine.

The custom engine (``engine.py``) stops each row at the end of its first non-empty line, shares prompt prefixes and
merges KV caches, which leans on transformers internals (cache layers, attention registries). This one does none of
that: batches of prompts, left-padded with an attention mask, greedy ``generate`` with ``min_new_tokens`` and the
same stop tokens, then the same extraction and the same prediction fields. The letters are those of the custom engine
(the extractor reads only the first non-empty line, and both decode greedily): a test checks it. It is slower (every
row decodes until a stop token or ``max_new_tokens``) but depends only on transformers' public ``generate``.

``sort_by_length`` (default) batches prompts of similar length together; ``False`` keeps file order, as the
original evaluation loop did (the speed benchmark's reference-style baseline).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from src.evaluate.engine import generation_prediction, resolve_fmt, stop_token_ids


def predict_hf(model, tokenizer, records, *, fmt=None, batch_size: int = 8, max_new_tokens: int = 128,
               min_new_tokens: int = 2, progress: bool = True, callback: Callable[[dict], None] | None = None,
               stats: dict | None = None, sort_by_length: bool = True, logits_processor=None) -> list[dict]:
    """Predictions for step 1 records with ``model.generate``, in the order given (same fields as ``predict``).
    ``logits_processor`` goes to ``generate`` unchanged (tests bias a random model with it)."""
    from tqdm import tqdm

    records = list(records)
    stops = stop_token_ids(tokenizer, resolve_fmt(tokenizer, model, fmt), model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = list(range(len(records)))
    if sort_by_length:
        lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in records], add_special_tokens=False).input_ids]
        order.sort(key=lambda i: (-lengths[i], i))
    out: list[dict | None] = [None] * len(records)
    counts = {"items": 0, "batches": 0, "new_tokens": 0, "stops": {}}
    t0 = time.time()
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with torch.no_grad(), tqdm(total=len(records), desc="step 4 (hf generate)", unit="item",
                                   disable=not progress, dynamic_ncols=True) as bar:
            for s in range(0, len(order), batch_size):
                batch = order[s:s + batch_size]
                enc = tokenizer([records[i]["prompt"] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(model.device)
                gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                     min_new_tokens=min_new_tokens, eos_token_id=stops, pad_token_id=pad,
                                     temperature=None, top_p=None, top_k=None,
                                     logits_processor=logits_processor)[:, enc["input_ids"].shape[1]:]
                for i, row in zip(batch, gen.tolist()):
                    pred = _prediction(tokenizer, records[i], row, stops, pad)
                    counts["new_tokens"] += pred["new_tokens"]
                    counts["stops"][pred["stop"]] = counts["stops"].get(pred["stop"], 0) + 1
                    out[i] = pred
                    if callback is not None:
                        callback(pred)
                counts["items"] += len(batch)
                counts["batches"] += 1
                bar.update(len(batch))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    if stats is not None:
        stats.update(counts, seconds=round(time.time() - t0, 3))
    return out  # type: ignore[return-value]


def _prediction(tokenizer, rec: dict, row: list[int], stops: list[int], pad: int) -> dict:
    """Cut a generated row at its first stop token (generate pads finished rows with ``pad`` after it)."""
    n, stop = len(row), "max_tokens"
    for k, tok in enumerate(row):
        if tok in stops:
            n, stop = k + 1, "eos"
            break
    return generation_prediction(rec, tokenizer.decode(row[:n], skip_special_tokens=True), n, stop)
