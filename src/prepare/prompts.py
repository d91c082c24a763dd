"""XMedBench k-shot prompts: per-language wording, seeded shot selection, a token budget.

A prompt is ``prefix + shot_1 + ... + shot_k + target`` in the model's chat format, where a shot is one exchange
``user + <instruction, question, options> + assistant + <answer phrase>(B).`` + end + sep`` and the target stops right
after the assistant prefix. Shots come from the same source as the item and never are the item itself.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from ..common.chat_formats import ChatFormat
from .bench_items import BenchItem

_WORDING = Path(__file__).with_name("wording.json")


@lru_cache(maxsize=1)
def wording_table() -> dict[str, dict]:
    table = json.loads(_WORDING.read_text(encoding="utf-8"))
    table.pop("_comment", None)
    return table


def wording(language: str) -> dict:
    """The prompt wording of a language; the 38 minor languages use English, as the reference does."""
    table = wording_table()
    return table.get(language, table["en"])


class PromptBuilder:
    def __init__(self, fmt: ChatFormat):
        self.fmt = fmt

    @staticmethod
    def question_text(item: BenchItem) -> str:
        w = wording(item.language)
        letters = item.letters
        lines = [w["instruction"].format(first=letters[0], last=letters[-1])]
        if item.context:
            lines.append(f"{w['context']}: {item.context}")
        lines.append(f"{w['question']}: {item.question}")
        lines.append(f"{w['options']}:\n{item.options_block()}")
        return "\n".join(lines)

    @staticmethod
    def answer_phrase(item: BenchItem) -> str:
        return wording(item.language)["answer"]

    def answer_text(self, item: BenchItem) -> str:
        return f"{self.answer_phrase(item)}({item.answer})."

    def shot(self, item: BenchItem) -> str:
        return self.fmt.exchange(self.question_text(item), self.answer_text(item)) + self.fmt.sep

    def target(self, item: BenchItem) -> str:
        return self.fmt.exchange(self.question_text(item))

    def prompt(self, shots: list[BenchItem], item: BenchItem) -> str:
        return self.fmt.prefix + "".join(self.shot(s) for s in shots) + self.target(item)


def candidate_shots(item: BenchItem, pool: list[BenchItem], k: int, seed: int, fixed: bool) -> list[BenchItem]:
    """Draw up to ``k`` shots for ``item`` from ``pool`` (items of the same source).

    Seeded by (seed, item id), or by (seed, source) with ``fixed`` so every item of a source shares the same shots
    (lm-evaluation-harness style; enables prefix caching in step 4). The item itself, and any pool item with the same
    question text (a duplicate across files would leak the answer), are never chosen. A few spare draws replace
    excluded ones, so the result has ``k`` shots whenever the pool allows.
    """
    rng = random.Random(f"{seed}|{item.source if fixed else item.id}")
    draw = rng.sample(range(len(pool)), min(len(pool), k + 4))
    chosen = [pool[j] for j in draw if pool[j].id != item.id and pool[j].question != item.question]
    if len(chosen) < k and len(pool) > k + 4:  # rare: many excluded among the spares; fall back to a full scan
        rest = [p for j, p in enumerate(pool) if j not in set(draw) and p.id != item.id and p.question != item.question]
        rng.shuffle(rest)
        chosen += rest
    return chosen[:k]
