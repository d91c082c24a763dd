"""Asking the judge: one chat request per (question, model, order), sent to any OpenAI-compatible server.

Every request is appended to ``judgments.jsonl`` once answered: the messages sent, the parameters, the judge's raw
reply, its finish reason and token usage, and a fingerprint of the request (judge, messages, parameters). A rerun
reuses a judgment whose request would be the same and sends the others; the replies are parsed when the results are
made, so a different ``--parser`` needs no new request. The API key is read from the environment
(``OPENAI_API_KEY``) by the client and written nowhere.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from src.common.io import dumps, read_appended, repair_tail
from src.common.openai_client import ApiError, OpenAIClient, run_concurrently
from src.judge.budget import Budget
from src.judge.prompts import JudgePrompt
from src.judge.questions import Question
from src.judge.verdicts import shown

TEMPERATURE = 0  # as LLMZoo's review script: the judge's most likely reply


@dataclass(frozen=True)
class Task:
    key: str
    model: str
    order: str
    messages: list
    fingerprint: str


def judge_settings(judge: str, prompt: JudgePrompt, max_tokens: int) -> dict:
    """What a judgment depends on besides the question and the answers (recorded in MODE/run.json)."""
    return {"judge": judge, "role": prompt.role, "prompt": prompt.template, "temperature": TEMPERATURE,
            "max_tokens": max_tokens}


def plan(questions: list[Question], models: list[str], baseline: str, orders: tuple[str, ...], answers: dict,
         prompt: JudgePrompt, settings: dict) -> tuple[list[Task], int]:
    """The judgments to have, in question order with both orders of a pair together, and how many cannot be asked
    yet because an answer is missing. ``answers``: (model, question key) -> answer row."""
    tasks, waiting = [], 0
    for q in questions:
        for model in models:
            a, b = answers.get((baseline, q.key)), answers.get((model, q.key))
            if a is None or b is None:
                waiting += len(orders)
                continue
            for order in orders:
                messages = prompt.messages(q.query, shown(order, a["answer"], b["answer"]))
                doc = json.dumps({"settings": settings, "messages": messages}, sort_keys=True)
                tasks.append(Task(q.key, model, order, messages, hashlib.sha256(doc.encode()).hexdigest()[:32]))
    return tasks, waiting


def judge_all(client: OpenAIClient, tasks: list[Task], settings: dict, path: Path, budget: Budget,
              concurrency: int, progress: bool) -> tuple[dict, dict]:
    """(question key, model, order) -> the judgment row for every task judged after this run, and the counts."""
    fingerprints = {t.fingerprint for t in tasks}
    previous = read_appended(path, "[judge] ")
    rows = {(r["key"], r["model"], r["order"]): r for r in previous if r.get("fingerprint") in fingerprints}
    stale = {(r.get("key"), r.get("model"), r.get("order")) for r in previous} - set(rows)
    stale &= {(t.key, t.model, t.order) for t in tasks}
    if stale:
        print(f"[judge] {len(stale)} judgments in {path} were made for other answers: asking again", file=sys.stderr)
    pending = [t for t in tasks if (t.key, t.model, t.order) not in rows]
    granted = pending[:budget.grant(len(pending))]
    counts = {"reused": len(rows), "new": 0, "left": len(pending) - len(granted)}
    params = {"temperature": settings["temperature"], "max_tokens": settings["max_tokens"]}

    def ask(task: Task) -> dict:
        reply = client.chat(task.messages, **params)
        return {"key": task.key, "model": task.model, "order": task.order, "judge": settings["judge"],
                "messages": task.messages, "params": params, "reply": reply["text"],
                "finish_reason": reply["finish_reason"], "usage": reply["usage"], "fingerprint": task.fingerprint}

    repair_tail(path)
    with path.open("a", encoding="utf-8") as out, \
            tqdm(total=len(granted), desc="judgments", unit="req", disable=not progress) as bar:
        try:
            for _, row in run_concurrently(ask, granted, concurrency):
                out.write(dumps(row) + "\n")
                out.flush()
                rows[(row["key"], row["model"], row["order"])] = row
                counts["new"] += 1
                bar.update()
        except ApiError as e:
            raise SystemExit(f"[judge] the judge failed: {e}. The {len(rows)} judgments made so far are kept in "
                             f"{path}; rerun the same command to resume") from None
    return rows, counts
