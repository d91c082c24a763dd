"""Step 4's predictions: step 1 records -> prompts -> a backend's generations (src/generation) -> predictions.

A prediction is {"id", "source", "language", "raw", "letter", "rule", "gold", "correct", "tie", "new_tokens",
"stop"} for a generated answer (the letter from src/evaluate/extract.py; an MMedBench item's from mmedlm.py), or the
log-likelihood mode's {"raw": "", "letter", "rule": "loglik", "scores", ...} (loglik.py). Every backend gives the same
fields for the same records: ``predict_records`` is the one path from records to predictions (step 4, the trainer's
dev evaluation, the speed benchmarks); ``predict`` is the same for a model already loaded in this process.
"""
from __future__ import annotations

from typing import Callable

from src.evaluate import mmedlm
from src.evaluate.extract import extract
from src.generation.types import GenerationConfig, Prompt


def generation_prediction(rec: dict, raw: str, new_tokens: int, stop: str) -> dict:
    """The prediction of a generated answer: the letter and rule come from the extractor, ``stop`` says why
    generation ended."""
    if mmedlm.is_mmedbench(rec):  # several letters and a rationale (src/evaluate/mmedlm.py)
        return mmedlm.prediction(rec, raw, new_tokens, stop)
    ex = extract(raw, rec.get("letters"))
    gold = rec.get("answer")
    return {"id": rec.get("id"), "source": rec.get("source"), "language": rec.get("language"), "raw": raw,
            "letter": ex.letter, "rule": ex.rule, "gold": gold, "correct": ex.letter is not None and ex.letter == gold,
            "tie": ex.tie, "new_tokens": new_tokens, "stop": stop}


def prompt_group(rec: dict) -> tuple:
    """Records likely to share a prompt prefix: one source, and within it one first shot (engine.plan_groups)."""
    return rec.get("source"), (rec.get("shots") or [None])[0]


def record_prompts(records: list[dict], tokenizer, texts: list[str] | None = None) -> list[Prompt]:
    """The prompts of ``records`` (``texts``: other texts than their ``prompt``), tokenized as they are: step 1's
    prompts already carry BOS and system prefix."""
    texts = texts if texts is not None else [r["prompt"] for r in records]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [Prompt(list(i), text=t, group=prompt_group(r)) for r, i, t in zip(records, ids, texts)]


def generation_config(tokenizer, fmt, model=None, *, max_new_tokens: int = 128, min_new_tokens: int = 2,
                      whole_answer: bool = False, stop_ids: list[int] | None = None) -> GenerationConfig:
    """Step 4's generation: greedy, the chat format's stop set, ended at the first line's end unless the whole
    answer counts (MMedBench: its rationale and the answer after it)."""
    from src.generation.stops import stop_token_ids

    stops = stop_ids if stop_ids is not None else stop_token_ids(tokenizer, fmt, model)
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, stop_ids=tuple(stops),
                            stop_at_line=not whole_answer)


def predict_records(backend, tokenizer, records: list[dict], config: GenerationConfig, *, mode: str = "generate",
                    callback: Callable[[dict], None] | None = None, progress: bool = True,
                    stats: dict | None = None) -> list[dict]:
    """Predictions of ``records`` (in their order) by ``backend``; ``callback`` gets each as soon as it is made (to
    append it to a file), ``stats`` is filled with the backend's counters."""
    records = list(records)
    if mode == "loglik":
        from src.evaluate.loglik import predict_loglik

        return predict_loglik(backend, tokenizer, records, callback=callback, progress=progress, stats=stats)
    if mode != "generate":
        raise ValueError(f"mode must be 'generate' or 'loglik', got {mode!r}")
    out: list = [None] * len(records)

    def on_result(g):
        pred = generation_prediction(records[g.index], g.text, g.new_tokens, g.stop)
        out[g.index] = pred
        if callback is not None:
            callback(pred)
    backend.generate(record_prompts(records, tokenizer), config, on_result=on_result, progress=progress,
                     stats=stats, desc="step 4 (generate)")
    return out


def predict(model, tokenizer, records, *, engine: str = "custom", fmt=None, batch_size: int = 8,
            max_new_tokens: int = 128, min_new_tokens: int = 2, mode: str = "generate", early_stop: bool = True,
            progress: bool = True, callback: Callable[[dict], None] | None = None, stats: dict | None = None,
            max_padding: float = 0.1, prefix_cache: str = "auto", prefill_batch: int | None = None,
            sort_by_length: bool = True, logits_processor=None) -> list[dict]:
    """``predict_records`` for a model loaded in this process (a transformers model, our Post-MoE, or a StepModel such
    as proxy-tuning's wrapper for the custom engine): ``engine`` one of custom, hf, cb (src/generation/backends.py);
    ``fmt`` a ChatFormat or format name (default: resolved from the tokenizer and config; it gives the stop token);
    ``early_stop`` False generates the whole answer. The engines' own options pass through."""
    from src.common.chat_formats import resolve_format
    from src.generation.backends import open_backend

    if fmt is None or isinstance(fmt, str):
        fmt = resolve_format(tokenizer, getattr(model, "config", None), fmt)
    backend = open_backend(engine, model, tokenizer, batch_size=batch_size, max_padding=max_padding,
                           prefix_cache=prefix_cache, prefill_batch=prefill_batch, sort_by_length=sort_by_length,
                           logits_processor=logits_processor)
    config = generation_config(tokenizer, fmt, model, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                               whole_answer=not early_stop)
    return predict_records(backend, tokenizer, records, config, mode=mode, callback=callback, progress=progress,
                           stats=stats)
