"""Answers to the open questions from each checkpoint, through the chat code of the demos (src/evaluate/chat_core.py).

A model is given as ``[NAME=]FOLDER`` (loaded in-process: dense or Post-MoE folders, in its chat format) or
``[NAME=]FOLDER@URL`` (served by an OpenAI-compatible server at URL; FOLDER names its tokenizer, for the context
check). The question is the one user turn; decoding is greedy unless ``--temperature`` is above 0, seeded per question
(in-process: a generator seeded from --seed and the question's key; served: the request's ``seed``).

Answers are appended to ``answers.jsonl`` as they are made, each with a fingerprint of what produced it (the model's
weights or server, the generation settings, the question text): a rerun reuses the answers whose fingerprint matches
and redoes stale ones (said once). Models are loaded one at a time and released before the next.
"""
from __future__ import annotations

import gc
import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from src.common.errors import DataError, UsageError
from src.common.io import dumps, read_appended, repair_tail
from src.judge.budget import Budget
from src.judge.questions import Question

_SPEC = re.compile(r"(?:(?P<name>[^=@/]+)=)?(?P<folder>.+?)(?:@(?P<url>https?://\S+))?")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    folder: str
    api_base: str | None = None


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int
    format: str | None

    def sampling(self):
        from src.evaluate.chat_core import ChatSettings

        return ChatSettings(greedy=self.temperature == 0, temperature=self.temperature or 1.0, top_p=self.top_p,
                            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens)

    def settings(self) -> dict:
        return asdict(self)


def parse_spec(text: str, flag: str) -> ModelSpec:
    match = _SPEC.fullmatch(text.strip())
    if not match or not match["folder"]:
        raise UsageError(flag, f"{text!r}: expected [NAME=]FOLDER or [NAME=]FOLDER@http://HOST:PORT")
    folder = match["folder"]
    name = (match["name"] or Path(folder.rstrip("/")).name).strip()
    return ModelSpec(name, folder, match["url"])


def question_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}/{key}".encode()).hexdigest()[:8], 16)


def model_identity(spec: ModelSpec) -> str:
    """What an answer depends on besides the settings: the weights' fingerprint, or the server and its tokenizer."""
    if spec.api_base:
        return f"served:{spec.api_base}:{spec.folder}"
    from src.evaluate.fingerprint import model_fingerprint

    return model_fingerprint(spec.folder)


def answer_fingerprint(identity: str, gen: Generation, query: str) -> str:
    doc = json.dumps({"model": identity, "settings": gen.settings(), "query": query}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:32]


def answer_all(specs: list[ModelSpec], questions: list[Question], gen: Generation, path: Path, budget: Budget,
               progress: bool) -> tuple[dict, dict]:
    """(model name, question key) -> answer row for every answer available after this run, and the counts."""
    wanted = {s.name: {q.key: answer_fingerprint(model_identity(s), gen, q.query) for q in questions} for s in specs}
    answers, stale = {}, 0
    for row in read_appended(path, "[judge] "):
        fp = wanted.get(row.get("model"), {}).get(row.get("key"))
        if fp is not None and row.get("fingerprint") == fp:
            answers[(row["model"], row["key"])] = row
        elif fp is not None:
            stale += 1
    if stale:
        print(f"[judge] {stale} answers in {path} were made by other weights or settings or for another question "
              f"text: making them again", file=sys.stderr)
    counts = {"reused": len(answers), "new": 0, "left": 0}
    repair_tail(path)
    with path.open("a", encoding="utf-8") as out:
        for spec in specs:
            pending = [q for q in questions if (spec.name, q.key) not in answers]
            if spec.api_base:
                granted = budget.grant(len(pending))
                counts["left"] += len(pending) - granted
                pending = pending[:granted]
            if not pending:
                continue
            for q, row in _answer_model(spec, pending, gen, progress):
                row["fingerprint"] = wanted[spec.name][q.key]
                out.write(dumps(row) + "\n")
                out.flush()
                answers[(spec.name, q.key)] = row
                counts["new"] += 1
    return answers, counts


def _answer_model(spec: ModelSpec, questions: list[Question], gen: Generation, progress: bool):
    """Yield (question, answer row) for each question, the model loaded once and released at the end."""
    from src.evaluate.chat_core import open_chat

    chat = open_chat(spec.folder, api_base=spec.api_base, fmt_name=gen.format, max_new_tokens=gen.max_new_tokens)
    try:
        for q in tqdm(questions, desc=f"answers {spec.name}", unit="q", disable=not progress):
            try:
                chat.fit([], q.query)
            except ValueError as e:
                raise DataError(q.path, q.index, "query", f"{e} of {spec.name} with "
                                                          f"--max-new-tokens {gen.max_new_tokens}") from None
            seed = question_seed(gen.seed, q.key)
            text, finish, tokens = chat.reply(q.query, gen.sampling(), seed)
            yield q, {"model": spec.name, "key": q.key, "id": q.id, "language": q.language, "label": q.label,
                      "query": q.query, "answer": text, "finish_reason": finish, "new_tokens": tokens}
    finally:
        del chat
        _release_memory()


def _release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def answer_counts(answers: dict, models: list[str]) -> dict:
    """Per model: answers available, empty ones and ones cut at --max-new-tokens (worth knowing before reading the
    judge's verdicts: a cut answer is judged as it stands)."""
    rows = list(answers.values())
    return {m: {"answers": sum(r["model"] == m for r in rows),
                "empty": sum(r["model"] == m and not r["answer"].strip() for r in rows),
                "cut_at_max_new_tokens": sum(r["model"] == m and r["finish_reason"] == "length" for r in rows)}
            for m in models}
