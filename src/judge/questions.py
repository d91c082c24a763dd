"""Open questions from JSON Lines, in LLMZoo's multilingual format: one object per line with ``id`` (an integer or a
string), ``query`` (the question) and optionally ``label`` (its category) and ``language``.

LLMZoo's files carry no language field (the language is in the file name, ``en100.jsonl``), so a record without one
takes the language code the file name starts with. Ids repeat across languages there, so a question is known by its
``key``, ``<language>/<id>``, which must be unique over all files read.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from src.common import languages
from src.common.defaults import ROOT
from src.common.errors import DataError
from src.common.io import iter_jsonl

DEFAULT_QUESTIONS = ROOT / "assets" / "sample" / "open_questions.jsonl"
NO_LABEL = "unlabelled"
_CODE_IN_NAME = re.compile(r"([a-z]{2,3})(?=$|[\d_.-])")


@dataclass(frozen=True)
class Question:
    key: str  # "<language>/<id>"
    id: int | str
    query: str
    label: str
    language: str
    path: str  # where it was read, for error lines
    index: int


def read_questions(paths: list[Path], limit: int | None = None,
                   skip_labels: tuple[str, ...] = ()) -> tuple[list[Question], Counter]:
    """All questions of ``paths`` in file order, validated; with ``limit`` the first N of each language. Returns the
    questions kept and the count of those left out, by reason."""
    kept, skipped, seen, per_language = [], Counter(), {}, Counter()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found")
        for index, record in enumerate(iter_jsonl(path)):
            q = _question(path, index, record)
            if q.key in seen:
                raise DataError(path, index, "id", f"{q.id!r} repeats question {q.key} ({seen[q.key]})")
            seen[q.key] = f"{path}: record {index}"
            if q.label in skip_labels:
                skipped[f"label {q.label} (--skip-label)"] += 1
            elif limit is not None and per_language[q.language] >= limit:
                skipped["over --limit"] += 1
            else:
                per_language[q.language] += 1
                kept.append(q)
    if not kept:
        raise DataError(paths[0], "(all)", None, "no questions left to evaluate"
                        + (f" (left out: {dict(skipped)})" if skipped else ""))
    return kept, skipped


def _question(path: Path, index: int, record) -> Question:
    if not isinstance(record, dict):
        raise DataError(path, index, None, f"expected an object with id and query, got {type(record).__name__}")
    qid = record.get("id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise DataError(path, index, "id", "missing" if qid is None else f"must be an integer or a non-empty string, "
                                                                           f"got {qid!r}")
    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        raise DataError(path, index, "query", "missing" if query is None else "must be a non-empty string")
    label = record.get("label", NO_LABEL)
    if not isinstance(label, str) or not label.strip():
        raise DataError(path, index, "label", f"must be a non-empty string, got {label!r}")
    language = _language(path, index, record.get("language"))
    return Question(f"{language}/{qid}", qid, query, label.strip(), language, str(path), index)


def _language(path: Path, index: int, given) -> str:
    if given is None:
        match = _CODE_IN_NAME.match(path.name.lower())
        if not match:
            raise DataError(path, index, "language", f"missing, and the file name {path.name!r} does not start with "
                                                     f"a language code (as LLMZoo's en100.jsonl does)")
        given, where = match.group(1), f"taken from the file name {path.name!r}"
    elif not isinstance(given, str):
        raise DataError(path, index, "language", f"must be a language code string, got {given!r}")
    else:
        where = None
    try:
        return languages.canonical(given)
    except ValueError as e:
        raise DataError(path, index, "language", f"{e}" + (f" ({where})" if where else "")) from None
