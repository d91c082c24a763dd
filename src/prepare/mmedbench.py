"""MMedBench (MMedLM's multilingual medical benchmark): its release layout, read and validated.

The release is a folder with ``Train/`` and ``Test/``, each holding one JSON Lines file per language named after it:
``English.jsonl``, ``Chinese.jsonl``, ``Japanese.jsonl``, ``French.jsonl``, ``Russian.jsonl``, ``Spanish.jsonl``.
Every line is one multiple-choice item::

    {"question": str, "options": {"A": str, "B": str, ...}, "answer_idx": "B" or "A,C" (several answers),
     "rationale": str, "human_checked": bool, "human_check_passed": bool}

Other fields are ignored. ``answer_idx`` may also be a list of letters (MMedLM's own code joins one with ","). The
two ``human_check*`` flags say whether a doctor checked the rationale and passed it: only passed rationales count
for rationale similarity; an item without the flags counts as unchecked (reported). A defect is a DataError naming
the file, the record (counted from 1, blank lines skipped, as step 4 counts JSON Lines records) and the field.

The file's base name is the language as MMedLM names it in its prompts ("You're a English doctor"), ``LANGUAGES``
maps it to the project's language code.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from src.common.errors import DataError
from src.common.io import iter_jsonl

# File base name -> language code, in the column order of MMedLM's tables.
LANGUAGES = {"English": "en", "Chinese": "zh", "Japanese": "ja", "French": "fr", "Russian": "ru", "Spanish": "es"}
SPLITS = ("Train", "Test")
OPTION_LETTERS = "ABCDEFGH"  # MMedBench uses A-E; the project's extractor knows A-H
TASK = "mmedbench"  # the ``task`` field of step 1 records made from MMedBench


@dataclass(frozen=True)
class MMedItem:
    id: str
    file: Path
    index: int  # record number in its file, from 1
    language_name: str  # the file's base name, e.g. "English"
    question: str  # as given (prompts paste it unchanged)
    options: tuple[tuple[str, str], ...]  # (letter, text) in the file's order
    answer_idx: str  # the gold as MMedLM reads it: the string, or a list joined with ","
    answers: tuple[str, ...]  # the gold letters, in the file's order
    rationale: str
    human_checked: bool
    human_check_passed: bool
    has_check_flags: bool  # both flags were present in the file

    @property
    def language(self) -> str:
        return LANGUAGES[self.language_name]

    @property
    def letters(self) -> list[str]:
        return [letter for letter, _ in self.options]

    @property
    def answer(self) -> str:
        """The gold letters joined by "," (one letter for most items)."""
        return ",".join(self.answers)


def language_of_file(path: Path) -> str:
    """The MMedLM language name of a release file (its base name), or a DataError listing the known ones."""
    name = Path(path).name.split(".")[0]
    if name not in LANGUAGES:
        raise DataError(path, "(file name)", None, f"not an MMedBench language file: expected one of "
                                                   f"{', '.join(f'{n}.jsonl' for n in LANGUAGES)}")
    return name


def _options(raw, path, n) -> tuple[tuple[str, str], ...]:
    value = raw.get("options")
    if not isinstance(value, dict):
        raise DataError(path, n, "options", f"expected a mapping letter -> text, got {type(value).__name__}")
    if len(value) < 2:
        raise DataError(path, n, "options", f"needs at least 2 options, found {len(value)}")
    pairs = []
    for key, text in value.items():
        if not isinstance(key, str) or len(key) != 1 or key not in OPTION_LETTERS:
            raise DataError(path, n, "options", f"option keys must be single letters A-H, got {key!r}")
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, n, "options", f"option {key}: expected non-empty text, got {text!r}")
        pairs.append((key, text))
    return tuple(pairs)


def _answers(raw, path, n, letters: list[str]) -> tuple[str, tuple[str, ...]]:
    value = raw.get("answer_idx")
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        value = ",".join(value)  # what MMedLM's scripts do with a list
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, n, "answer_idx", f"expected a letter or letters joined by ',', got {value!r}")
    answers = tuple(part.strip() for part in value.split(","))
    bad = [a for a in answers if a not in letters]
    if bad:
        raise DataError(path, n, "answer_idx", f"{value!r}: {', '.join(map(repr, bad))} is not an option letter "
                                               f"({', '.join(letters)})")
    if len(set(answers)) != len(answers):
        raise DataError(path, n, "answer_idx", f"{value!r} repeats a letter")
    return value, answers


def _flags(raw, path, n) -> tuple[bool, bool, bool]:
    present = [name for name in ("human_checked", "human_check_passed") if name in raw]
    for name in present:
        if not isinstance(raw[name], bool):
            raise DataError(path, n, name, f"expected true or false, got {raw[name]!r}")
    checked, passed = bool(raw.get("human_checked")), bool(raw.get("human_check_passed"))
    if passed and not checked:
        raise DataError(path, n, "human_check_passed", "true while human_checked is false")
    return checked, passed, len(present) == 2


def parse_item(raw, path: Path, n: int, language_name: str) -> MMedItem:
    """Validate one raw item (record ``n`` of ``path``); a DataError names the first defect."""
    if not isinstance(raw, dict):
        raise DataError(path, n, None, f"expected an object, got {type(raw).__name__}")
    question = raw.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(path, n, "question", "missing or not a non-empty string")
    options = _options(raw, path, n)
    answer_idx, answers = _answers(raw, path, n, [letter for letter, _ in options])
    rationale = raw.get("rationale")
    if not isinstance(rationale, str):
        raise DataError(path, n, "rationale", f"expected a string, got {type(rationale).__name__}")
    checked, passed, has_flags = _flags(raw, path, n)
    return MMedItem("", Path(path), n, language_name, question, options, answer_idx, answers, rationale,
                    checked, passed, has_flags)


def _content_id(item: MMedItem) -> str:
    text = "\x1f".join([item.language_name, item.question.strip(), *(f"{k}. {v}" for k, v in item.options),
                        item.answer])
    return f"mmedbench-{item.language}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:10]}"


def read_file(path: Path, skip_errors: bool = False) -> tuple[list[MMedItem], list[dict]]:
    """The items of one language file and, with ``skip_errors``, the rejected records (else the first defect is
    raised). Ids come from the content (stable under reordering); identical items are numbered in file order."""
    language_name = language_of_file(path)
    items, rejects, seen = [], [], {}
    for n, raw in enumerate(iter_jsonl(path), 1):
        try:
            item = parse_item(raw, path, n, language_name)
        except DataError as e:
            if not skip_errors:
                raise
            rejects.append({"file": str(path), "index": n, "field": e.field, "reason": e.reason})
            continue
        base = _content_id(item)
        seen[base] = seen.get(base, 0) + 1
        items.append(MMedItem(**{**item.__dict__, "id": base if seen[base] == 1 else f"{base}-{seen[base]}"}))
    return items, rejects


def split_files(path: Path, split: str) -> list[Path]:
    """The language files of one split: ``path`` may be the release root (holding Train/ and Test/), a split folder
    (holding the language files) or one language file. Files come in MMedLM's language order."""
    path = Path(path)
    if path.is_file():
        language_of_file(path)
        return [path]
    folder = path / split if (path / split).is_dir() else path
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no such MMedBench folder or file")
    files = [folder / f"{name}.jsonl" for name in LANGUAGES if (folder / f"{name}.jsonl").is_file()]
    if not files:
        raise FileNotFoundError(f"{folder}: no MMedBench language files ({', '.join(f'{n}.jsonl' for n in LANGUAGES)})")
    return files


def is_release(path: Path) -> bool:
    """True when ``path`` looks like MMedBench: a release root or split folder holding language files, or one
    language file (``English.jsonl``, ...)."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".jsonl" and path.name.split(".")[0] in LANGUAGES
    return path.is_dir() and any((d / f"{name}.jsonl").is_file() for d in (path, *(path / s for s in SPLITS))
                                 for name in LANGUAGES)


def load_split(path: Path, split: str, skip_errors: bool = False) -> tuple[list[MMedItem], list[dict]]:
    """Every item of one split (see ``split_files``), in language order, and the rejected records."""
    items, rejects = [], []
    for f in split_files(path, split):
        got, bad = read_file(f, skip_errors)
        items += got
        rejects += bad
    return items, rejects
