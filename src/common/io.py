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


def iter_json_array(path, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Yield the elements of a top-level JSON list one at a time, reading the file in chunks.

    The release training file is ~13.5 GB; ``json.load`` would need several times that in memory."""
    path = Path(path)
    decoder = json.JSONDecoder()
    with path.open(encoding="utf-8") as f:
        buf, pos, eof, index = "", 0, False, 0

        def fill() -> bool:
            nonlocal buf, pos, eof
            more = f.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            return bool(more)

        def skip_space():
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos].isspace():
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip_space()
        if buf[pos:pos + 1] != "[":
            raise DataError(path, "(top level)", None, "expected a JSON list")
        pos += 1
        skip_space()
        if buf[pos:pos + 1] == "]":
            return
        while True:
            try:
                obj, end = decoder.raw_decode(buf, pos)
                if end == len(buf) and not eof:  # a number or literal may continue in the next chunk
                    raise json.JSONDecodeError("incomplete", buf, end)
            except json.JSONDecodeError as e:
                if not eof and fill():
                    continue
                raise DataError(path, index, None, f"invalid JSON: {e.msg}") from None
            yield obj
            index += 1
            pos = end
            skip_space()
            sep = buf[pos:pos + 1]
            if sep == "]":
                return
            if sep != ",":
                raise DataError(path, index, None, f"invalid JSON: expected ',' or ']' after record {index - 1}")
            pos += 1
            skip_space()
            if pos > chunk_chars:  # drop what has been parsed so the buffer stays about one chunk long
                buf, pos = buf[pos:], 0


class JsonArrayWriter:
    """Write a JSON list element by element (the counterpart of ``iter_json_array``), atomically on close."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self._f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        self._f.write("[")
        self.count = 0

    def write(self, obj) -> None:
        self._f.write((",\n" if self.count else "\n") + dumps(obj))
        self.count += 1

    def close(self) -> None:
        self._f.write("\n]\n")
        self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        Path(self._tmp).unlink(missing_ok=True)


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
