"""Step 1's records (test.jsonl, dev.jsonl) as the stages after it read them: step 4 and the lm-eval export.

A record is an object with the strings ``id``, ``source`` and ``prompt``, the item's option ``letters`` (a list of
distinct letters from A-H) and the ``answer`` (one of them); ``language`` and ``answer_phrase``, when present, are
strings. An MMedBench record (``task: "mmedbench"``, src/prepare/mmedbench_step1.py) may have several gold letters:
its ``answers`` (distinct option letters) joined by "," are its ``answer``; it also carries the gold ``rationale``
and ``answer_idx`` (strings) and the booleans ``with_rationale``, ``human_checked`` and ``human_check_passed``. A defect is a DataError naming the file, the record (counted from 1, blank lines skipped, as the lines of a
JSON Lines file) and the field, so a hand-edited or foreign file fails with one clear line, never mid-run.

A file inside a step 1 folder must also be the one the folder's report.json describes: step 1 writes report.json
last, with the sha256 of test.jsonl and dev.jsonl (``check_step1_file``), so a folder that step 1 left half
rewritten, or an edited file, is refused instead of scored.
"""
from __future__ import annotations

from pathlib import Path

from src.common.errors import BadFile, DataError
from src.common.io import file_sha256, iter_jsonl, read_json
from src.evaluate.extract import ALL_LETTERS
from src.prepare.mmedbench import TASK as MMEDBENCH

STEP4_FIELDS = ("id", "source", "prompt", "answer", "letters")
# Step 1's folder: report.json is written last and lists the digests of the files below (format_version 1; step 1
# wrote no format_version and no digests before, and such folders are still read).
STEP1_REPORT, STEP1_FORMAT_VERSION, STEP1_FILES = "report.json", 1, ("test.jsonl", "dev.jsonl")
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
    check_step1_file(path)
    records, seen = [], set()
    for n, rec in enumerate(iter_jsonl(path), 1):
        check_record(rec, path, n, required)
        if rec["id"] in seen:
            raise DataError(path, n, "id", f"duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        records.append(rec)
    if not records:
        raise BadFile(path, "no records: the file is empty (step 1 writes one prompt per line)")
    return records


def check_step1_file(path: Path) -> None:
    """Refuse a test.jsonl or dev.jsonl of a step 1 folder that step 1 did not finish writing (no report.json beside
    the rejects.jsonl it also writes) or that its report.json does not describe (another run's, or edited); accept
    a file outside a step 1 folder, and one of a step 1 version that recorded no digests."""
    path = Path(path)
    report_file = path.parent / STEP1_REPORT
    if path.name not in STEP1_FILES:
        return
    if not report_file.is_file():
        if (path.parent / "rejects.jsonl").is_file():
            raise BadFile(path, f"step 1 did not finish writing {path.parent}: there is no {STEP1_REPORT} (step 1 "
                                f"writes it last); rerun step 1 with the same command")
        return
    report = read_json(report_file)
    if not isinstance(report, dict) or "settings" not in report:
        return  # a report.json of something else than step 1
    version = report.get("format_version", 0)
    if not isinstance(version, int) or not 0 <= version <= STEP1_FORMAT_VERSION:
        raise BadFile(report_file, f"format_version {version!r} is not one this code reads (up to "
                                   f"{STEP1_FORMAT_VERSION}): written by a newer version of the project, or edited")
    entry = (report.get("files") or {}).get(path.name)
    if isinstance(entry, dict) and entry.get("sha256") != file_sha256(path):
        raise BadFile(path, f"not the file the {STEP1_REPORT} beside it describes (step 1 writes that last): step 1 "
                            f"was stopped while rewriting {path.parent}, or the file was edited since; rerun step 1, "
                            f"or move the file out of the folder to use it as it is")
