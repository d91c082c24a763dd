"""Step 1's records (test.jsonl, dev.jsonl) as the stages after it read them: step 4 and the lm-eval export.

A record is an object with the strings ``id``, ``source`` and ``prompt``, the item's option ``letters`` (a list of
distinct letters from A-H) and the ``answer`` (one of them); ``language`` and ``answer_phrase``, when present, are
strings. An MMedBench record (``task: "mmedbench"``, src/prepare/mmedbench_step1.py) may have several gold letters:
its ``answers`` (distinct option letters) joined by "," are its ``answer``; it also carries the gold ``rationale``
and ``answer_idx`` (strings) and the booleans ``with_rationale``, ``human_checked`` and ``human_check_passed``. A defect is a DataError naming the file, the record (counted from 1, blank lines skipped, as the lines of a
JSON Lines file) and the field, so a hand-edited or foreign file fails with one clear line, never mid-run.
"""
from __future__ import annotations

from pathlib import Path

from src.common.errors import DataError
from src.common.io import iter_jsonl
from src.evaluate.extract import ALL_LETTERS
from src.prepare.mmedbench import TASK as MMEDBENCH

STEP4_FIELDS = ("id", "source", "prompt", "answer", "letters")
_STRINGS = ("id", "source", "prompt", "answer", "language", "answer_phrase")


def check_record(rec, path, n: int, required=STEP4_FIELDS) -> dict:
    """``rec`` unchanged if it is a valid record with the ``required`` fields; else a DataError."""
    if not isinstance(rec, dict):
        raise DataError(path, n, None, f"expected an object, got {type(rec).__name__}")
    for f in required:
        if rec.get(f) in (None, "", []):
            raise DataError(path, n, f, "missing (is this a step 1 test.jsonl/dev.jsonl?)")
    for f in _STRINGS:
        if rec.get(f) is not None and not isinstance(rec[f], str):
            raise DataError(path, n, f, f"must be a string, got {type(rec[f]).__name__}")
    letters = rec.get("letters")
    if letters is not None:
        if not isinstance(letters, list) or not all(map(_is_letter, letters)):
            raise DataError(path, n, "letters", f"must be a list of option letters A-H, got {letters!r}")
        if len(set(letters)) != len(letters):
            raise DataError(path, n, "letters", f"repeats a letter: {letters!r}")
    if rec.get("task") is not None:
        _check_mmedbench(rec, path, n)
    elif letters is not None and rec.get("answer") is not None and rec["answer"] not in letters:
        raise DataError(path, n, "answer", f"{rec['answer']!r} is not one of the letters {letters}")
    return rec


def _check_mmedbench(rec: dict, path, n) -> None:
    if rec["task"] != MMEDBENCH:
        raise DataError(path, n, "task", f"unknown task {rec['task']!r} (step 1 writes {MMEDBENCH!r} or none)")
    answers, letters = rec.get("answers"), rec.get("letters") or []
    if not isinstance(answers, list) or not answers or not all(map(_is_letter, answers)) \
            or len(set(answers)) != len(answers):
        raise DataError(path, n, "answers", f"must be a list of distinct option letters A-H, got {answers!r}")
    if any(a not in letters for a in answers):
        raise DataError(path, n, "answers", f"{answers!r} are not all among the letters {letters}")
    if rec.get("answer") != ",".join(answers):
        raise DataError(path, n, "answer", f"must be the answers joined by ',' ({','.join(answers)!r}), got "
                                           f"{rec.get('answer')!r}")
    for f in ("rationale", "answer_idx"):
        if not isinstance(rec.get(f), str):
            raise DataError(path, n, f, f"must be a string, got {type(rec.get(f)).__name__}")
    for f in ("with_rationale", "human_checked", "human_check_passed"):
        if not isinstance(rec.get(f), bool):
            raise DataError(path, n, f, f"must be true or false, got {rec.get(f)!r}")


def _is_letter(x) -> bool:
    return isinstance(x, str) and len(x) == 1 and x in ALL_LETTERS


def load_records(path: Path, required=STEP4_FIELDS) -> list[dict]:
    """Every record of ``path``, checked; a repeated id is an error too (it would be scored twice)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input not found (make it with 1.data_process_test_dev.sh)")
    records, seen = [], set()
    for n, rec in enumerate(iter_jsonl(path), 1):
        check_record(rec, path, n, required)
        if rec["id"] in seen:
            raise DataError(path, n, "id", f"duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        records.append(rec)
    return records
