"""Reading and validating bench items (the contract of a raw bench item, below).

An item has ``question``, ``options`` (a string ``"(A) ...\\n(B) ..."`` or a mapping letter -> text), ``answer``
(``"(B)"`` or ``"B"``), ``source``, and optionally ``context``, ``class`` and ``language``. Each item gets a stable id
derived from its content, so ids survive reordering of the file.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from src.common.errors import DataError
from src.common.io import iter_json_array, read_json
from src.common.languages import source_language

LETTERS = "ABCDEFGH"  # up to 8 options, as the extractor supports
_OPTION_LINE = re.compile(r"^\s*[（(]([A-Za-z])[)）]\s?(.*)$")
_ANSWER = re.compile(r"^\s*[（(]?([A-Ha-h])[)）]?\.?\s*$")


@dataclass(frozen=True)
class BenchItem:
    id: str
    index: int  # position in its file, for error messages and reports
    source: str
    language: str
    question: str
    options: tuple[tuple[str, str], ...]  # (letter, text) in order
    answer: str  # one letter
    context: str | None
    # The question, context and options exactly as given: prompts paste these, as the reference does (a question
    # with a trailing space keeps it), while ids and duplicate checks use the stripped fields above.
    raw_question: str
    raw_context: str | None
    raw_options: str | dict

    @property
    def letters(self) -> list[str]:
        return [letter for letter, _ in self.options]

    def options_block(self) -> str:
        return "\n".join(f"({letter}) {text}" for letter, text in self.options)


def parse_options(value, path, index) -> tuple[tuple[str, str], ...]:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(v, str):  # str(None) or str(['y', 1]) would become an option's text
                raise DataError(path, index, "options", f"option {k!r}: expected a string, got {type(v).__name__}")
        pairs = [(str(k).strip().strip("()（）").upper(), v.strip()) for k, v in value.items()]
    elif isinstance(value, str):
        pairs = _option_lines(value, path, index)
    else:
        raise DataError(path, index, "options", f"expected a string or a mapping, got {type(value).__name__}")
    if len(pairs) < 2:
        raise DataError(path, index, "options", f"needs at least 2 options, found {len(pairs)}")
    letters = [letter for letter, _ in pairs]
    dup = sorted({letter for letter in letters if letters.count(letter) > 1})
    if dup:
        raise DataError(path, index, "options", f"duplicate option letters {', '.join(dup)}")
    bad = [letter for letter in letters if letter not in LETTERS]
    if bad:
        raise DataError(path, index, "options", f"option letters must be A-H, got {', '.join(bad)}")
    if any(not text for _, text in pairs):
        raise DataError(path, index, "options", "an option has empty text")
    return tuple(pairs)


def _option_lines(value: str, path, index) -> list[tuple[str, str]]:
    """``(A) ...`` lines; a line without a marker continues the option above it, unless a blank line separates
    them: text after the last option (e.g. a stray "Answer: B") must not be glued onto it."""
    pairs, gap = [], False
    for line in value.splitlines():
        m = _OPTION_LINE.match(line)
        if m:
            pairs.append((m.group(1).upper(), m.group(2).strip()))
            gap = False
        elif not line.strip():
            gap = bool(pairs)
        elif pairs and not gap:  # an option whose text runs over several lines
            pairs[-1] = (pairs[-1][0], pairs[-1][1] + "\n" + line.strip())
        elif pairs:
            raise DataError(path, index, "options", f"text after the last option, separated from it by a blank "
                                                    f"line: {line[:60]!r}")
        else:
            raise DataError(path, index, "options", f"text before the first '(A)' marker: {line[:60]!r}")
    return pairs


REQUIRED = ("question", "options", "answer", "source")
_STRINGS = ("question", "source", "answer")  # of the required fields, those that must be non-empty strings


def check_fields(raw, path, index, required=REQUIRED) -> dict:
    """``raw`` if it is an object with the ``required`` fields (the strings among them non-empty); else a DataError
    naming the file, the index and the field."""
    if not isinstance(raw, dict):
        raise DataError(path, index, None, f"expected an object, got {type(raw).__name__}")
    for field in required:
        if field not in raw:
            raise DataError(path, index, field, "missing")
    for field in (f for f in _STRINGS if f in required):
        if not isinstance(raw[field], str) or not raw[field].strip():
            raise DataError(path, index, field, "must be a non-empty string")
    return raw


def iter_questions(path) -> Iterator[tuple[int, str, str]]:
    """(index, source, question as given) of every item of a bench file, streamed: what decontamination compares
    (src/prepare/decontaminate.py), checked as ``parse_item`` checks those two fields."""
    for index, raw in enumerate(iter_json_array(path)):
        check_fields(raw, path, index, ("question", "source"))
        yield index, raw["source"], raw["question"]


def parse_item(raw, path, index: int) -> BenchItem:
    """Validate one raw item; raise DataError naming the file, the index and the field on any defect."""
    check_fields(raw, path, index)
    options = parse_options(raw["options"], path, index)
    m = _ANSWER.match(raw["answer"])
    if not m:
        raise DataError(path, index, "answer", f"expected '(B)' or 'B', got {raw['answer']!r}")
    answer = m.group(1).upper()
    letters = [letter for letter, _ in options]
    if answer not in letters:
        raise DataError(path, index, "answer", f"{raw['answer']!r} is not among the options {', '.join(letters)}")
    if raw.get("language") is not None and not isinstance(raw["language"], str):
        raise DataError(path, index, "language", f"must be a language code string, got {type(raw['language']).__name__}")
    try:
        language = source_language(raw["source"], raw.get("language"))
    except ValueError as e:
        raise DataError(path, index, "language" if raw.get("language") else "source", str(e)) from None
    context = raw.get("context")
    if context is not None and not isinstance(context, str):
        raise DataError(path, index, "context", "must be a string")
    return BenchItem(id="", index=index, source=raw["source"], language=language, question=raw["question"].strip(),
                     options=options, answer=answer, context=(context or "").strip() or None,
                     raw_question=raw["question"], raw_context=context, raw_options=raw["options"])


def _content_id(item: BenchItem) -> str:
    h = hashlib.sha1("\x1f".join([item.source, item.question, item.options_block(), item.answer,
                                   item.context or ""]).encode("utf-8")).hexdigest()
    return f"{item.source}-{h[:10]}"


def load_bench(path, skip_errors: bool = False) -> tuple[list[BenchItem], list[dict]]:
    """Load and validate a bench file. Returns (items, rejects); rejects is only non-empty with ``skip_errors``."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(path, "(top level)", None, f"expected a JSON list of items, got {type(data).__name__}")
    items, rejects, seen = [], [], {}
    for i, raw in enumerate(data):
        try:
            item = parse_item(raw, path, i)
        except DataError as e:
            if not skip_errors:
                raise
            rejects.append({"file": str(path), "index": i, "field": e.field, "reason": e.reason, "item": raw})
            continue
        base = _content_id(item)
        seen[base] = seen.get(base, 0) + 1  # identical duplicates keep distinct ids, numbered in file order
        item_id = base if seen[base] == 1 else f"{base}-{seen[base]}"
        items.append(BenchItem(**{**item.__dict__, "id": item_id}))
    return items, rejects
