"""Step 4 through an OpenAI-compatible server (``4.eval.sh --backend openai --api-base URL``).

The same records, prediction fields, files and resume as the in-process engine; only the generation runs elsewhere
(vLLM on a GPU node, ``transformers serve`` here, any OpenAI-compatible server).

Generate mode. Step 1's prompt text goes unchanged to ``POST /v1/completions``, greedy, ``--max-new-tokens`` (128)
and, where the server has a minimum, ``--min-new-tokens`` (2). The in-process engine stops a row once its first
non-empty line is complete; a server's plain ``stop: ["\\n"]`` would also stop on a *leading* newline and lose the
answer that follows. So the request stops on a newline, and when the reply is only newlines (the one case where the
stop fired before a non-empty line) the item is asked again without a stop string and the full decode is cut here at
the end of its first non-empty line. Both give the greedy decode's first non-empty line, hence the same letter.

What each server is sent (the server is recognised from the routes it publishes):

* vLLM: ``temperature 0``, ``min_tokens``, ``stop_token_ids`` (the chat format's end token and the EOS ids, as
  in-process), ``include_stop_str_in_output``, and ``add_special_tokens: false`` (step 1's prompts already carry BOS).
* transformers serve (it rejects unknown fields): a ``generation_config`` with ``do_sample: false``,
  ``min_new_tokens`` and the same stop ids. It always adds the tokenizer's special tokens, so a leading BOS is taken
  off the text first (checked: the server then computes exactly the in-process prompt tokens).
* any other server: ``temperature 0``, ``max_tokens``, ``stop``; no minimum and the server's own stop tokens.

Log-likelihood mode needs prompt log-probabilities (``echo`` + ``logprobs``; vLLM has them): each option letter's
continuation after ``prompt + answer_phrase + "("`` is scored as the sum of its token log-probabilities, as the
in-process engine scores it. A server that returns none stops the run with one clear line.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from src.common.io import dumps
from src.common.openai_client import SERVER_DEFAULT, ApiError, OpenAIClient, run_concurrently
from src.evaluate import mmedlm
from src.evaluate.extract import extract

_COMPLETE = re.compile(r"[^\n]\n")  # the end of the first non-empty line (extract.line_complete)


def cut_first_line(text: str) -> tuple[str, bool]:
    """``text`` up to and including the newline that completes its first non-empty line, and whether there is one."""
    m = _COMPLETE.search(text)
    return (text[:m.end()], True) if m else (text, False)


def needs_full_decode(text: str, finish_reason: str | None) -> bool:
    """A reply stopped on a newline before any other character: the answer may follow that newline."""
    return finish_reason == "stop" and text != "" and text.strip("\n") == ""


@dataclass
class ServerTarget:
    """What a request needs to know about the server and the checkpoint behind it."""
    engine: str  # vllm | transformers | openai
    stop_ids: list[int]
    max_new_tokens: int
    min_new_tokens: int
    pad_id: int | None = None
    stats: dict = field(default_factory=lambda: {"items": 0, "requests": 0, "full_decodes": 0, "new_tokens": 0,
                                                 "prompt_tokens": 0, "stops": {}})

    def generate_params(self, stop_on_newline: bool = True) -> dict:
        stop = ["\n"] if stop_on_newline else None
        if self.engine == "vllm":
            return {"temperature": 0, "max_tokens": self.max_new_tokens, "min_tokens": self.min_new_tokens,
                    "stop": stop, "include_stop_str_in_output": True, "stop_token_ids": self.stop_ids,
                    "add_special_tokens": False, "skip_special_tokens": True}
        if self.engine == "transformers":
            config = {"do_sample": False, "max_new_tokens": self.max_new_tokens,
                      "min_new_tokens": self.min_new_tokens, "eos_token_id": self.stop_ids,
                      "pad_token_id": self.pad_id}
            return {"max_tokens": self.max_new_tokens, "stop": stop, "generation_config": json.dumps(config)}
        return {"temperature": 0, "max_tokens": self.max_new_tokens, "stop": stop}


def server_prompt(tokenizer, prompt: str, engine: str) -> str:
    """The text to send so that the server tokenizes it into exactly the in-process prompt tokens.

    vLLM is told not to add special tokens; other servers add the tokenizer's own (a BOS), which step 1's prompts
    already start with, so that BOS text is taken off. Anything else that cannot be matched is an error."""
    if engine == "vllm":
        return prompt
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    if not added:
        return prompt
    want = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    head = tokenizer.decode(added)
    text = prompt[len(head):] if prompt.startswith(head) else prompt
    if tokenizer(text, add_special_tokens=True)["input_ids"] != want:
        raise ValueError(f"this tokenizer adds {head!r} to every text and the prompt does not start with it: a "
                         f"server that adds special tokens would not see the in-process prompt tokens")
    return text


def _prediction(rec: dict, raw: str, new_tokens: int, stop: str) -> dict:
    if mmedlm.is_mmedbench(rec):  # several letters and a rationale (src/evaluate/mmedlm.py)
        return mmedlm.prediction(rec, raw, new_tokens, stop)
    ex = extract(raw, rec.get("letters"))
    gold = rec.get("answer")
    return {"id": rec.get("id"), "source": rec.get("source"), "language": rec.get("language"), "raw": raw,
            "letter": ex.letter, "rule": ex.rule, "gold": gold, "correct": ex.letter is not None and ex.letter == gold,
            "tie": ex.tie, "new_tokens": new_tokens, "stop": stop}


def generate_one(client: OpenAIClient, target: ServerTarget, tokenizer, rec: dict) -> dict:
    """One item's greedy answer through the server, cut at the end of its first non-empty line (an MMedBench item:
    the whole answer, its rationale and the answer after it)."""
    prompt = server_prompt(tokenizer, rec["prompt"], target.engine)
    whole = mmedlm.is_mmedbench(rec)
    out = client.completion(prompt, **target.generate_params(stop_on_newline=not whole))
    requests, full = 1, 0
    if not whole and needs_full_decode(out.get("text") or "", out.get("finish_reason")):
        out = client.completion(prompt, **target.generate_params(stop_on_newline=False))
        requests, full = 2, 1
    text = out.get("text") or ""
    raw, complete = (text, False) if whole else cut_first_line(text)
    usage = out.get("usage") or {}
    new_tokens = int(usage.get("completion_tokens") or 0)
    stop = "line" if complete else ("max_tokens" if out.get("finish_reason") == "length" else "eos")
    pred = _prediction(rec, raw, new_tokens, stop)
    pred["_counts"] = {"requests": requests, "full_decodes": full, "prompt_tokens": int(usage.get("prompt_tokens")
                                                                                         or 0)}
    return pred


def loglik_one(client: OpenAIClient, target: ServerTarget, tokenizer, rec: dict) -> dict:
    """Score every option letter from the server's prompt log-probabilities (one echo request per letter)."""
    ctx = rec["prompt"] + rec.get("answer_phrase", "") + "("
    base = tokenizer(ctx, add_special_tokens=False)["input_ids"]
    fulls = {L: tokenizer(ctx + L, add_special_tokens=False)["input_ids"] for L in rec["letters"]}
    n = min(_common_prefix(list(fulls.values()) + [base]), min(len(s) for s in fulls.values()) - 1)
    # A server that adds the tokenizer's special tokens (a BOS; server_prompt took it off the text) lists them first.
    shift = 0 if target.engine == "vllm" else len(tokenizer("", add_special_tokens=True)["input_ids"])
    scores = {}
    for L, ids in fulls.items():
        params = {"max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        if target.engine == "vllm":
            params["add_special_tokens"] = False
        out = client.completion(server_prompt(tokenizer, ctx + L, target.engine), **params)
        logprobs = (out.get("logprobs") or {}).get("token_logprobs")
        if not logprobs or len(logprobs) < len(ids) + shift:
            raise ApiError(f"--mode loglik needs prompt log-probabilities (echo + logprobs), which this server "
                           f"({target.engine}) does not return; use vLLM or --mode generate")
        scores[L] = float(sum(logprobs[shift + n:shift + len(ids)]))
    letter = max(scores, key=lambda k: scores[k])
    gold = rec.get("answer")
    return {"id": rec.get("id"), "source": rec.get("source"), "language": rec.get("language"), "raw": "",
            "letter": letter, "rule": "loglik", "gold": gold, "correct": letter == gold,
            "tie": sum(v == scores[letter] for v in scores.values()) > 1,
            "scores": {k: round(v, 4) for k, v in scores.items()},
            "_counts": {"requests": len(fulls), "full_decodes": 0, "prompt_tokens": 0}}


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def _stop_ids(model_path: str, tokenizer, fmt) -> list[int]:
    """The in-process stop ids (chat format end token, tokenizer EOS, generation config EOS) without the weights."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from src.evaluate.engine import stop_token_ids

    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json in the folder
        gen = None
    return stop_token_ids(tokenizer, fmt, SimpleNamespace(generation_config=gen))


def _count(target: ServerTarget, pred: dict) -> dict:
    counts = pred.pop("_counts", {})
    s = target.stats
    s["items"] += 1
    for k, v in counts.items():
        s[k] += v
    if "stop" in pred:
        s["new_tokens"] += pred["new_tokens"]
        s["stops"][pred["stop"]] = s["stops"].get(pred["stop"], 0) + 1
    return pred


def open_server(api_base: str, api_model: str | None, model_path: str, tokenizer, fmt_name: str | None,
                max_new_tokens: int, min_new_tokens: int, timeout: float = 300.0):
    """(client, target, chat format) for scoring ``model_path``'s prompts through the server at ``api_base``."""
    from transformers import AutoConfig

    from src.common.chat_formats import resolve_format

    config = AutoConfig.from_pretrained(model_path) if Path(model_path).is_dir() else None
    fmt = resolve_format(tokenizer, config, fmt_name)
    client = OpenAIClient(api_base, api_model, timeout=timeout)
    engine = client.engine()
    if client.model is None:
        try:
            client.default_model()
        except ApiError:
            if engine != "transformers":
                raise
            client.model = SERVER_DEFAULT  # transformers serve FOLDER answers with its one model, listed or not
    target = ServerTarget(engine, _stop_ids(model_path, tokenizer, fmt), max_new_tokens, min_new_tokens,
                          tokenizer.pad_token_id)
    return client, target, fmt


def iter_predictions(client, target: ServerTarget, tokenizer, records: list[dict], mode: str, concurrency: int):
    """(index, prediction) for every record, as the server answers them (at most ``concurrency`` in flight)."""
    one = loglik_one if mode == "loglik" else generate_one
    for i, pred in run_concurrently(lambda r: one(client, target, tokenizer, r), records, concurrency):
        yield i, _count(target, pred)


def predict_through_server(args, tokenizer, records: list[dict], target_file: Path, stats: dict,
                           progress: bool = True, fingerprints: dict | None = None) -> str:
    """Predict ``records`` through the server at ``args.api_base``, appending each prediction to ``target_file`` as
    it arrives (so a server that dies mid-run leaves resumable predictions). Fills ``stats``; returns the chat format
    name. Settings come from step 4's flags (model, format, mode, max/min new tokens, api model, concurrency)."""
    from tqdm import tqdm

    from src.evaluate.eval import _repair_tail

    client, target, fmt = open_server(args.api_base, args.api_model, args.model, tokenizer, args.format,
                                      args.max_new_tokens, args.min_new_tokens, args.api_timeout)
    print(f"[step 4] {len(records)} items through {client.base} ({target.engine}, model "
          f"{client.model or 'the server default'}); mode={args.mode} format={fmt.name} stop ids={target.stop_ids} "
          f"concurrency={args.concurrency}", flush=True)
    t0 = time.time()
    target_file.parent.mkdir(parents=True, exist_ok=True)
    _repair_tail(target_file)
    bar = tqdm(total=len(records), desc=f"step 4 ({args.mode}, server)", unit="item", disable=not progress,
               dynamic_ncols=True)
    try:
        with target_file.open("a", encoding="utf-8") as fh, client:
            for _, pred in iter_predictions(client, target, tokenizer, records, args.mode, args.concurrency):
                if fingerprints is not None:  # what step 4's resume checks (fingerprint.py)
                    pred["fingerprint"] = fingerprints[pred["id"]]
                fh.write(dumps(pred) + "\n")
                fh.flush()
                bar.update(1)
    except (ApiError, ValueError) as e:
        bar.close()
        raise SystemExit(f"[step 4] {e} ({target.stats['items']} predictions kept in {target_file}; rerun the same "
                         f"command to resume)") from None
    bar.close()
    stats.update(target.stats, seconds=round(time.time() - t0, 3), engine=target.engine)
    if target.stats["full_decodes"]:
        print(f"[step 4] {target.stats['full_decodes']} replies began with a newline and were decoded in full",
              file=sys.stderr)
    return fmt.name
