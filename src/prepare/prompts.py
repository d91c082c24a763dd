"""XMedBench k-shot prompts: the reference's per-language strings in two styles, seeded shots, a length budget.

A prompt is ``prefix + shot_1 + ... + shot_k + target`` in the model's chat format, where a shot is one exchange
``user + <instruction, [context,] question, options> + assistant + <answer phrase>(B).`` + end + sep`` and the target
stops right after the assistant prefix. Shots come from the same source as the item and never are the item itself.

The strings are the reference's step 1 strings, verbatim (``wording.json``). Two styles (docs/prompts.md):

* ``paper``: exactly what the reference writes for the same item and shots: its hard-coded letter ranges, its answer
  phrases glued to the letter, Arabic letter-before-phrase, and its 4,096-character shot rule (``fit_characters``).
* ``fixed`` (default): the same strings with three fixes only: the letter range comes from the item's own options
  (written the language's way), a space between the answer phrase and the letter where the reference glued them, and
  the Arabic phrase before the letter. Its length budget is in tokens (step 1's ``--max-tokens``).

A template is chosen by source as the reference does: a source its step 1 maps to a language; a minor-language
source the English template (the reference's 50-languages step 1); any other source the English PubMed template with
a ``Context:`` line.
"""
from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path

from src.common.chat_formats import ChatFormat
from src.common.languages import is_major
from src.prepare.bench_items import BenchItem

_WORDING = Path(__file__).with_name("wording.json")
STYLES = ("fixed", "paper")
PAPER_MAX_CHARS = 4096  # the reference's prompt limit, in characters


@lru_cache(maxsize=1)
def wording_table() -> dict[str, dict]:
    table = json.loads(_WORDING.read_text(encoding="utf-8"))
    table.pop("_comment", None)
    return table


@lru_cache(maxsize=1)
def _template_of_source() -> dict[str, str]:
    return {src: name for name, t in wording_table().items() for src in t["sources"]}


def template_name(item: BenchItem) -> str:
    """Which template the reference's step 1 uses for this item's source (see the module docstring)."""
    name = _template_of_source().get(item.source)
    if name:
        return name
    return "en_pubmed" if is_major(item.language) else "en"


class PromptBuilder:
    def __init__(self, fmt: ChatFormat, style: str = "fixed"):
        if style not in STYLES:
            raise ValueError(f"unknown prompt style {style!r}; choose from {', '.join(STYLES)}")
        self.fmt = fmt
        self.style = style

    def template(self, item: BenchItem) -> dict:
        return wording_table()[template_name(item)]

    def instruction(self, item: BenchItem, shot: bool) -> str:
        t = self.template(item)
        text = t["instruction_shot"] if shot and "instruction_shot" in t else t["instruction"]
        if "{range}" not in text:
            return text
        if self.style == "paper":
            return text.format(range=t["paper_range"])
        script = t.get("range_letters", {})
        first, last = item.letters[0], item.letters[-1]
        return text.format(range=t["range"].format(first=script.get(first, first), last=script.get(last, last)))

    def question_text(self, item: BenchItem, shot: bool = False) -> str:
        """The user message. ``shot``: as an exemplar (the PubMed template's instruction then ends with a space)."""
        t = self.template(item)
        lines = [self.instruction(item, shot)]
        if "context" in t:  # the reference formats a missing context as empty (it crashed on a missing key)
            lines.append(t["context"].format(context=item.raw_context or ""))
        lines.append(f"{t['question']} {item.raw_question}")
        lines.append(f"{t['options']}\n{options_text(item)}")
        return "\n".join(lines)

    def answer_phrase(self, item: BenchItem) -> str:
        """What the answer says before ``(B)`` (empty where the reference puts the letter first)."""
        t = self.template(item)
        if self.style == "paper":
            return "" if t.get("letter_first") else t["answer"]
        return t["answer_fixed"]

    def answer_text(self, item: BenchItem) -> str:
        t = self.template(item)
        if self.style == "paper" and t.get("letter_first"):
            return f"({item.answer}){t['answer']}."
        return f"{self.answer_phrase(item)}({item.answer})."

    def shot(self, item: BenchItem) -> str:
        return self.fmt.exchange(self.question_text(item, shot=True), self.answer_text(item)) + self.fmt.sep

    def target(self, item: BenchItem) -> str:
        return self.fmt.exchange(self.question_text(item))

    def prompt(self, shots: list[BenchItem], item: BenchItem) -> str:
        return self.fmt.prefix + "".join(self.shot(s) for s in shots) + self.target(item)

    def fit_characters(self, shots: list[BenchItem], item: BenchItem,
                       limit: int = PAPER_MAX_CHARS) -> tuple[list[BenchItem], str] | None:
        """The reference's length rule: each shot, in draw order, is kept when the prompt so far plus that shot plus
        the target stays under ``limit`` characters; a prompt still over ``limit`` is None (the reference drops it)."""
        target = self.target(item)
        text, kept = self.fmt.prefix, []
        for s in shots:
            shot = self.shot(s)
            if len(text) + len(target) + len(shot) < limit:
                text += shot
                kept.append(s)
        text += target
        return None if len(text) > limit else (kept, text)


def options_text(item: BenchItem) -> str:
    """The options as the bench file writes them (the reference pastes that string); a mapping as ``(A) text`` lines."""
    return item.raw_options if isinstance(item.raw_options, str) else item.options_block()


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
