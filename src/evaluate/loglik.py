"""Step 4's log-likelihood mode (``--mode loglik``): the option letter with the highest probability after
``prompt + answer_phrase + "("`` (lm-evaluation-harness style: what ``util/export_lm_eval.py`` asks the harness).

In process, one forward pass per item gives the next token's log-probabilities (``Engine.next_token_logprobs``,
batched, shared prefixes once) and each letter's is read off, when every letter is one token after that context for
this tokenizer (checked on the context's end, cached per answer phrase and letter set). Otherwise each letter's whole
continuation is scored (``Engine.continuation_logprobs``: the sum of its token log-probabilities). Through a server
(``--backend openai``) each letter's continuation is scored from the server's prompt log-probabilities (``echo`` +
``logprobs``: vLLM has them; a server without them stops the run with one clear line).
"""
from __future__ import annotations

from typing import Callable

from src.common.openai_client import ApiError
from src.evaluate.predict import record_prompts
from src.generation.engine import common_prefix


def loglik_prediction(rec: dict, scores: dict[str, float]) -> dict:
    letter = max(scores, key=lambda L: scores[L])  # first letter wins a tie
    gold = rec.get("answer")
    return {"id": rec.get("id"), "source": rec.get("source"), "language": rec.get("language"), "raw": "",
            "letter": letter, "rule": "loglik", "gold": gold, "correct": letter == gold,
            "tie": sum(v == scores[letter] for v in scores.values()) > 1,
            "scores": {L: round(v, 4) for L, v in scores.items()}}


def context(rec: dict) -> str:
    return rec["prompt"] + rec.get("answer_phrase", "") + "("


def predict_loglik(backend, tokenizer, records: list[dict], *, callback: Callable[[dict], None] | None = None,
                   progress: bool = True, stats: dict | None = None) -> list[dict]:
    """Log-likelihood predictions of ``records`` (in their order) by the custom engine or a server."""
    out: list = [None] * len(records)

    def emit(i: int, pred: dict):
        out[i] = pred
        if callback is not None:
            callback(pred)
    if backend.name == "openai":
        _served(backend, tokenizer, records, emit, stats)
        return out
    if backend.name != "custom":
        raise ValueError(f"--mode loglik runs on the custom engine or a server, not on {backend.name}")
    engine = backend.generator
    texts = [context(r) for r in records]
    prompts = record_prompts(records, tokenizer, texts)
    letters = letter_token_ids(tokenizer, records)
    fast = [i for i, L in enumerate(letters) if L is not None]
    engine.next_token_logprobs(
        [prompts[i] for i in fast], progress=progress, desc="step 4 (loglik)",
        on_result=lambda j, logp: emit(fast[j], loglik_prediction(
            records[fast[j]], {L: float(logp[t]) for L, t in letters[fast[j]].items()})))
    for i in (i for i, L in enumerate(letters) if L is None):
        seqs = [tokenizer(texts[i] + L, add_special_tokens=False)["input_ids"] for L in records[i]["letters"]]
        scores = engine.continuation_logprobs(prompts[i].ids, seqs)
        emit(i, loglik_prediction(records[i], dict(zip(records[i]["letters"], scores))))
    if stats is not None:
        stats.update(engine.stats.as_dict(), batch_size_final=engine.batch_size)
    return out


def letter_token_ids(tokenizer, records: list[dict]) -> list[dict | None]:
    """Per record: letter -> the single token that follows its context, or None when some letter is not one token
    there. Checked on the end of the context (from the answer phrase on), cached per phrase and letter set."""
    cache: dict = {}
    out: list[dict | None] = []
    for r in records:
        key = (r.get("answer_phrase", ""), tuple(r["letters"]))
        if key not in cache:
            cache[key] = _single_tokens(tokenizer, r)
        out.append(cache[key])
    return out


def _single_tokens(tokenizer, rec: dict) -> dict | None:
    ctx = context(rec)
    base = tokenizer(ctx, add_special_tokens=False)["input_ids"]
    result = {}
    for L in rec["letters"]:
        full = tokenizer(ctx + L, add_special_tokens=False)["input_ids"]
        if len(full) != len(base) + 1 or full[:-1] != base:
            return None
        result[L] = full[-1]
    return result


# ------------------------------------------------------------------------------------------------------ a server
def _served(backend, tokenizer, records: list[dict], emit, stats: dict | None) -> None:
    import time

    from src.common.openai_client import run_concurrently

    counts = {"items": 0, "requests": 0, "full_decodes": 0, "new_tokens": 0, "prompt_tokens": 0, "stops": {}}
    t0 = time.time()
    for i, (pred, requests) in run_concurrently(lambda r: _served_one(backend, tokenizer, r), records,
                                                backend.concurrency):
        counts["items"] += 1
        counts["requests"] += requests
        emit(i, pred)
    if stats is not None:
        stats.update(counts, seconds=round(time.time() - t0, 3), engine=backend.engine)


def _served_one(backend, tokenizer, rec: dict) -> tuple[dict, int]:
    """Every option letter scored from the server's prompt log-probabilities (one echo request per letter)."""
    from src.generation.server import server_text

    ctx = context(rec)
    base = tokenizer(ctx, add_special_tokens=False)["input_ids"]
    fulls = {L: tokenizer(ctx + L, add_special_tokens=False)["input_ids"] for L in rec["letters"]}
    n = min(common_prefix(list(fulls.values()) + [base]), min(len(s) for s in fulls.values()) - 1)
    # A server that adds the tokenizer's special tokens (a BOS; server_text took it off the text) lists them first.
    shift = 0 if backend.engine == "vllm" else len(tokenizer("", add_special_tokens=True)["input_ids"])
    scores = {}
    for L, ids in fulls.items():
        params = {"max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        if backend.engine == "vllm":
            params["add_special_tokens"] = False
        out = backend.client.completion(server_text(tokenizer, ctx + L, backend.engine), **params)
        logprobs = (out.get("logprobs") or {}).get("token_logprobs")
        if not logprobs or len(logprobs) < len(ids) + shift:
            raise ApiError(f"--mode loglik needs prompt log-probabilities (echo + logprobs), which this server "
                           f"({backend.engine}) does not return; use vLLM or --mode generate")
        scores[L] = float(sum(logprobs[shift + n:shift + len(ids)]))
    return loglik_prediction(rec, scores), len(fulls)

