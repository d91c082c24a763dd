"""Which step 4 engine runs (``--engine auto|custom|hf|cb``), and the one call that runs any of them.

* ``custom``: ``engine.predict``, our batched early-stopping engine (prefix sharing, continuous batching);
* ``hf``: ``hf_engine.predict_hf``, plain ``model.generate`` batches (the fallback, no transformers internals);
* ``cb``: ``cb_engine.predict_cb``, transformers' own continuous batching (paged attention, CUDA graphs);
* ``auto``: per device type, from measurements (docs/eval.md "Engines").

All three write the same prediction fields with the same stopping rule; which one ran is recorded in run.json. It is
not part of a prediction's fingerprint (like the batch size, it changes the speed, not the prompt or the rule).
"""
from __future__ import annotations

import torch

ENGINES = ("custom", "hf", "cb")
# --engine auto per device type. CPU: the custom engine measured faster than transformers' continuous batching
# (docs/eval.md "Engines"). CUDA: the custom engine until a GPU check (bench/gpu_check.sh) has measured both.
AUTO = {"cpu": "custom", "cuda": "custom"}


def choose_engine(requested: str, device) -> str:
    if requested != "auto":
        return requested
    return AUTO.get(torch.device(device).type, "custom")


def predict_with(engine: str, model, tokenizer, records, *, mode: str = "generate", max_padding: float = 0.1,
                 prefix_cache: str = "auto", prefill_batch: int | None = None, early_stop: bool = True,
                 **common) -> list[dict]:
    """Predictions of ``records`` by ``engine`` (one of ENGINES). ``common``: the arguments every engine takes
    (fmt, batch_size, max_new_tokens, min_new_tokens, progress, callback, stats); ``early_stop`` (stop at the end
    of the first non-empty line) applies to custom and cb (hf always decodes to a stop token or the limit); the
    others are the custom engine's."""
    if engine == "hf":
        from src.evaluate.hf_engine import predict_hf

        return predict_hf(model, tokenizer, records, **common)
    if engine == "cb":
        from src.evaluate.cb_engine import predict_cb

        return predict_cb(model, tokenizer, records, early_stop=early_stop, **common)
    if engine != "custom":
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    from src.evaluate.engine import predict

    return predict(model, tokenizer, records, mode=mode, max_padding=max_padding, prefix_cache=prefix_cache,
                   prefill_batch=prefill_batch, early_stop=early_stop, **common)
