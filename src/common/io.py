"""Small file helpers shared by every stage: JSON/JSONL in and out, atomically, byte-stable."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import DataError


def read_json(path) -> object:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"at line {e.lineno} column {e.colno}", None, f"invalid JSON: {e.msg}") from None


def iter_jsonl(path) -> Iterator[dict]:
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {lineno}", None, f"invalid JSON: {e.msg}") from None


def dumps(obj) -> str:
    """The one JSON spelling used for outputs: UTF-8 text, stable key order as built, no trailing spaces."""
    return json.dumps(obj, ensure_ascii=False)


def _atomic_write(path: Path, write) -> None:
    # Write beside the target and rename: a crash never leaves a half-written file under the real name.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path, rows: Iterable[dict]) -> int:
    n = 0

    def write(f):
        nonlocal n
        for row in rows:
            f.write(dumps(row) + "\n")
            n += 1

    _atomic_write(Path(path), write)
    return n


def write_json(path, obj, indent: int = 1) -> None:
    _atomic_write(Path(path), lambda f: f.write(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n"))


def write_text(path, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text))
