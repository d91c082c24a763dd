"""Reading and validating training records (the DESIGN contract for a training record), streamed.

Accepted files:

- the release list ``[{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}, ...],
  "source": "<category>_<lang>[_qa]", "class": ...}, ...]`` (a turn may also be a plain string, or use
  ``role``/``content``);
- the extracted dict ``{"<source>": [[q, a, q, a, ...], ...], ...}`` (docs/reference.md, "Data formats");
- JSON Lines with one release record per line (``.jsonl``).

Files are parsed one element at a time (``json.JSONDecoder.raw_decode`` over a sliding buffer), so a multi-gigabyte
release file never has to fit in memory as Python objects. Valid records are appended to an Arrow stream file in
batches; invalid ones raise a ``DataError`` naming the file, the record and the field, or (``skip``) are returned as
rejects with their reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from ..common.errors import DataError
from ..common.io import JsonStream, iter_jsonl
from ..common.languages import parse_train_source

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "bot", "model", "chatgpt"}

RECORD_SCHEMA = pa.schema([
    ("file", pa.int32()),  # position of the input file in --data
    ("index", pa.string()),  # the record's place in its file: "17", or "general_fr[3]" in the dict format
    ("source_id", pa.int32()),  # index into ReadResult.sources
    ("turns", pa.list_(pa.string())),
])


def iter_file(path: Path) -> Iterator[tuple[int | str, str | None, object]]:
    """Yield (index, source or None, raw element) for every record of a training file, streamed."""
    if path.suffix == ".jsonl":
        yield from ((n, None, raw) for n, raw in enumerate(iter_jsonl(path)))
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    stream = JsonStream(path)
    try:
        counters: dict[str, int] = {}
        n = 0
        for key, raw in stream.elements():
            if key is None:
                yield n, None, raw
                n += 1
            else:
                i = counters.get(key, 0)
                counters[key] = i + 1
                yield f"{key}[{i}]", key, raw
    finally:
        stream.close()


def parse_record(raw, path, index, source: str | None = None) -> tuple[str, list[str]]:
    """Validate one record; return (source, turns). ``source`` is given in the dict format (``raw`` = the turns)."""
    if source is None:
        if not isinstance(raw, dict):
            raise DataError(path, index, None, f"expected an object with 'conversations' and 'source', "
                                               f"got {type(raw).__name__}")
        for name in ("conversations", "source"):
            if name not in raw:
                raise DataError(path, index, name, "missing")
        source, convs, fname = raw["source"], raw["conversations"], "conversations"
        if not isinstance(source, str):
            raise DataError(path, index, "source", f"must be a string, got {type(source).__name__}")
    else:
        convs, fname = raw, "turns"
    try:
        parse_train_source(source)
    except ValueError as e:
        raise DataError(path, index, "source", str(e)) from None
    if not isinstance(convs, list) or not convs:
        raise DataError(path, index, fname, "expected a non-empty list of turns")
    turns = []
    for j, t in enumerate(convs):
        want = "user" if j % 2 == 0 else "assistant"
        if isinstance(t, dict):
            role = t.get("from", t.get("role"))
            value = t.get("value", t.get("content"))
            where = f"{fname}[{j}]"
            if role is not None and str(role).lower() not in (USER_ROLES if want == "user" else ASSISTANT_ROLES):
                raise DataError(path, index, f"{where}.from",
                                f"role {role!r} where a {want} turn is expected (turns alternate user, assistant)")
            if value is None:
                raise DataError(path, index, f"{where}.value", "missing")
            where += ".value"
        else:
            value, where = t, f"{fname}[{j}]"
        if not isinstance(value, str):
            raise DataError(path, index, where, f"a turn must be a string, got {type(value).__name__}")
        if not value.strip():
            raise DataError(path, index, where, "empty turn")
        turns.append(value)
    if len(turns) % 2:
        raise DataError(path, index, fname,
                        f"odd number of turns ({len(turns)}): every user turn needs an assistant answer")
    return source, turns


@dataclass
class ReadResult:
    sources: list[str] = field(default_factory=list)  # source_id -> key, in order of first appearance
    records: int = 0  # valid records written
    read_per_file: list[int] = field(default_factory=list)  # elements read per input file (valid + rejected)
    rejects: list[dict] = field(default_factory=list)
    leaks: list[dict] = field(default_factory=list)  # records removed by --decontaminate-against (not in sources)


def read_records(paths: list[Path], out_file: Path, skip_errors: bool = False, batch: int = 8192,
                 screen=None) -> ReadResult:
    """Stream every record of ``paths`` into an Arrow stream file with RECORD_SCHEMA. ``screen`` (a
    ``decontaminate.Screen``) removes records that leak bench questions; they are listed in ``ReadResult.leaks``."""
    res = ReadResult()
    ids: dict[str, int] = {}
    cols: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    pending: list[tuple] = []  # valid records waiting for the leak screen (checked a batch at a time)

    with pa.OSFile(str(out_file), "wb") as sink, pa.ipc.new_stream(sink, RECORD_SCHEMA) as writer:
        def flush():
            if cols["file"]:
                writer.write_batch(pa.record_batch([pa.array(cols[n], type=RECORD_SCHEMA.field(n).type)
                                                    for n in RECORD_SCHEMA.names], schema=RECORD_SCHEMA))
                for v in cols.values():
                    v.clear()

        def keep():
            found = screen.check([p[3] for p in pending]) if screen else [None] * len(pending)
            for (f, index, source, turns), leak in zip(pending, found):
                if leak is not None:
                    res.leaks.append({"file": str(paths[f]), "index": index, "source": source, **leak})
                    continue
                sid = ids.get(source)
                if sid is None:
                    sid = ids[source] = len(res.sources)
                    res.sources.append(source)
                cols["file"].append(f)
                cols["index"].append(str(index))
                cols["source_id"].append(sid)
                cols["turns"].append(turns)
                res.records += 1
            pending.clear()
            if len(cols["file"]) >= batch:
                flush()

        for f, path in enumerate(paths):
            path = Path(path)
            n_read = 0
            for index, key, raw in iter_file(path):
                n_read += 1
                try:
                    source, turns = parse_record(raw, path, index, key)
                except DataError as e:
                    if not skip_errors:
                        raise
                    res.rejects.append({"file": str(path), "index": index, "field": e.field, "reason": e.reason})
                    continue
                pending.append((f, index, source, turns))
                if len(pending) >= batch:
                    keep()
            keep()
            res.read_per_file.append(n_read)
        flush()
    return res
