"""Small file helpers shared by every stage: JSON/JSONL in and out, atomically, byte-stable."""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from src.common.errors import DataError


def not_utf8(path) -> DataError:
    """The error for a file that is not UTF-8 text, naming the byte offset of the first invalid byte (found by
    decoding the file again incrementally: the decoder's own offset is relative to one read buffer)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                # bytes held back from the previous chunk (an unfinished character) come first in e.object
                start = offset - (len(e.object) - len(chunk)) + e.start
                return DataError(path, f"at byte {start}", None, f"not UTF-8 text ({e.reason}, byte "
                                                                  f"0x{e.object[e.start]:02x})")
            offset += len(chunk)
    return DataError(path, f"at byte {offset}", None, "not UTF-8 text (the file ends inside a character)")


def read_json(path) -> object:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"at line {e.lineno} column {e.colno}", None, f"invalid JSON: {e.msg}") from None


def iter_jsonl(path) -> Iterator[dict]:
    """Objects of a JSON Lines file, skipping blank lines; a broken line is an error naming the file and line."""
    path = Path(path)
    with path.open(encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark some editors write
        lines = enumerate(f, 1)
        while True:
            try:
                lineno, line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise not_utf8(path) from None
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {lineno}", None, f"invalid JSON: {e.msg}") from None


class JsonStream:
    """Incremental parser for a top-level JSON list, or an object whose values are lists, element by element."""

    def __init__(self, path: Path, chunk_chars: int = 1 << 20):
        self.path = path
        self.f = path.open(encoding="utf-8-sig")
        self.chunk = chunk_chars
        self.buf, self.pos, self.base, self.eof = "", 0, 0, False
        self.decoder = json.JSONDecoder()

    def close(self) -> None:
        self.f.close()

    def _more(self) -> bool:
        try:
            data = self.f.read(self.chunk)
        except UnicodeDecodeError:
            raise not_utf8(self.path) from None
        if not data:
            self.eof = True
            return False
        if self.pos:
            self.base += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += data
        return True

    def _error(self, msg: str) -> DataError:
        return DataError(self.path, f"at character {self.base + self.pos}", None, f"invalid JSON: {msg}")

    def peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file), not consumed."""
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < n:
                return self.buf[self.pos]
            if not self._more():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self._error(f"expected one of {' '.join(repr(x) for x in chars)}, found {c or 'end of file'!r}")
        self.pos += 1
        return c

    def value(self):
        self.peek()
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
                # A value that ends exactly at the buffer's end may be cut short (a number): read on to be sure.
                if end < len(self.buf) or self.eof:
                    self.pos = end
                    return obj
            except json.JSONDecodeError as e:
                if self.eof:
                    self.pos = e.pos
                    raise self._error(e.msg) from None
            if len(self.buf) - self.pos > self.chunk:  # one element larger than a chunk: grow, stay linear
                self.chunk *= 2
            self._more()

    def elements(self) -> Iterator[tuple[str | None, object]]:
        """Yield (key, element): key is None for a top-level list, the dict key for a dict of lists."""
        top = self.expect("[{")
        if top == "[":
            yield from ((None, v) for v in self._list_items())
        else:
            if self.peek() == "}":
                self.pos += 1
            else:
                while True:
                    key = self.value()
                    if not isinstance(key, str):
                        raise self._error("object keys must be strings")
                    self.expect(":")
                    if self.peek() != "[":
                        raise DataError(self.path, key, None,
                                        "in the dict format every source key must map to a list of records")
                    self.pos += 1
                    yield from ((key, v) for v in self._list_items())
                    if self.expect(",}") == "}":
                        break
        if self.peek():
            raise self._error("trailing content after the top-level value")

    def _list_items(self) -> Iterator[object]:
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self.value()
            if self.expect(",]") == "]":
                return


def iter_json_array(path, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Yield the elements of a top-level JSON list one at a time (the release training file is ~13.5 GB;
    ``json.load`` would need several times that in memory)."""
    stream = JsonStream(Path(path), chunk_chars)
    try:
        if stream.peek() != "[":
            raise DataError(path, "(top level)", None, "expected a JSON list")
        for _, element in stream.elements():
            yield element
    finally:
        stream.close()


@contextmanager
def writing(path):
    """Name ``path`` in a full-disk error raised inside the block that names no file (pyarrow's writers, json.dump
    into an open file, a plain write): the one-line error then says which file could not be written."""
    try:
        yield
    except BaseException as e:
        from src.common.cli import space_failure

        failure = space_failure(e)
        if failure is not None and not getattr(failure, "filename", None) and not hasattr(failure, "apollo_path"):
            try:
                failure.apollo_path = str(path)
            except AttributeError:  # an exception type without a __dict__: the error says "?"
                pass
        raise


def _sibling_tmp(path: Path) -> tuple[int, str]:
    """A temporary file beside ``path`` (same filesystem, so the final rename is atomic), with the permissions an
    ordinary new file gets (0666 less the umask): tempfile makes it private (0600), and it becomes the output."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class _StreamWriter:
    """A file written piece by piece beside its target and renamed into place on close (``abort`` drops it)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = _sibling_tmp(self.path)
        self._f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        self.count = 0

    def _finish(self) -> None:
        with writing(self.path):
            self._f.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        Path(self._tmp).unlink(missing_ok=True)


class JsonArrayWriter(_StreamWriter):
    """Write a JSON list element by element (the counterpart of ``iter_json_array``), atomically on close."""

    def __init__(self, path):
        super().__init__(path)
        self._f.write("[")

    def write(self, obj) -> None:
        with writing(self.path):
            self._f.write((",\n" if self.count else "\n") + dumps(obj))
        self.count += 1

    def close(self) -> None:
        self._f.write("\n]\n")
        self._finish()


class JsonLinesWriter(_StreamWriter):
    """Write JSON Lines row by row (``write_jsonl`` for rows that come one at a time), atomically on close."""

    def write(self, row) -> None:
        with writing(self.path):
            self._f.write(dumps(row) + "\n")
        self.count += 1

    def close(self) -> None:
        self._finish()


def file_sha256(path) -> str:
    """sha256 of a file's bytes, streamed (hashlib.file_digest reads it in blocks)."""
    import hashlib

    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def dumps(obj) -> str:
    """The one JSON spelling used for outputs: UTF-8 text, stable key order as built, no trailing spaces."""
    return json.dumps(obj, ensure_ascii=False)


def _atomic_write(path: Path, write) -> None:
    # Write beside the target and rename: a crash never leaves a half-written file under the real name.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _sibling_tmp(path)
    try:
        with writing(path), os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_file(src, dst) -> None:
    """Copy ``src`` to ``dst`` beside-and-rename, so a reader never sees half a file (an interrupted copy leaves the
    old one, or none)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _sibling_tmp(dst)
    try:
        with writing(dst), os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out)
        os.replace(tmp, dst)
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


def read_appended(path, tag: str = "") -> list[dict]:
    """The rows of a JSON Lines file that a run appends to as it goes (resumable outputs). A last line cut short by
    a crash is left out (its row is redone; said on stderr after ``tag``); any other broken line is an error naming
    the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if all(not rest.strip() for rest in lines[n:]):  # an interrupted write: repair_tail cuts it
                print(f"{tag}{path}: dropping an incomplete last line (an interrupted write); it is redone",
                      file=sys.stderr)
                break
            raise DataError(path, f"line {n}", None, f"invalid JSON: {e.msg}") from None
    return rows


def repair_tail(path) -> bool:
    """Cut an incomplete last line (a crash mid-write) so appended rows start on a fresh line; True if one was cut."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return False
    path.write_bytes(data[:data.rfind(b"\n") + 1])
    return True
