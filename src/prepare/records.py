"""Reading and validating training records (the contract of a training record, below), streamed.

Accepted files:

- the release list ``[{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}, ...],
  "source": "<category>_<lang>[_qa]", "class": ...}, ...]`` (a turn may also be a plain string, or use
  ``role``/``content``);
- the extracted dict ``{"<source>": [[q, a, q, a, ...], ...], ...}`` (docs/reference.md, "Data formats");
- JSON Lines with one release record per line (``.jsonl``).

Raw pretraining text (source keys ``<category>_<lang>_text``; every token of a document is a loss target, see
tokenize_chat.py) comes as:

- the release's text files ``{category}_{lang}_text.json``: a JSON list of strings, one document each (an element may
  also be an object with a string ``text`` and optionally its own ``source``);
- plain text (``.txt``), documents separated by one or more blank lines;
- JSON Lines (``.jsonl``), one document per line: a JSON string, or an object with ``text`` (and optionally ``source``);
- in the extracted dict, a ``*_text`` key whose list holds strings.

MMedBench's training split (a release folder with ``Train/``, the ``Train/`` folder, or one ``<Language>.jsonl``;
src/prepare/mmedbench.py) gives every item twice, as MMedLM fine-tunes: with its rationale and answer only, each a
one-turn conversation of MMedLM's prompt and target (src/prepare/mmedlm_prompts.py) from source ``mmedbench_<lang>``.

A text file is recognised by its name (``*_text.json``/``.jsonl``/``.txt``, or any ``.txt``) or given explicitly
(step 2's ``--text [SOURCE=]FILE``). A document's source is its own ``source`` field, else its dict key, else the
``SOURCE=`` of the flag, else the file name's stem.

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

from src.common.errors import DataError
from src.common.io import JsonStream, iter_jsonl, not_utf8
from src.common.languages import parse_train_source, train_source_kind
from src.prepare import mmedbench, mmedlm_prompts

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "bot", "model", "chatgpt"}

RECORD_SCHEMA = pa.schema([
    ("file", pa.int32()),  # position of the input file in --data
    ("index", pa.string()),  # the record's place in its file: "17", or "general_fr[3]" in the dict format
    ("source_id", pa.int32()),  # index into ReadResult.sources
    ("turns", pa.list_(pa.string())),  # a raw text document: one element, the document
    ("is_text", pa.bool_()),  # raw pretraining text (loss on every token) rather than a conversation
])


@dataclass(frozen=True)
class Input:
    """One input file of step 2: training records (kind 'records') or raw text documents (kind 'text')."""
    path: Path
    kind: str = "records"  # or "text", or "mmedbench"
    source: str | None = None  # text: the source key of documents that name none (from SOURCE= or the file name)
    style: str = "fixed"  # mmedbench: the prompt style of its records (src/prepare/mmedlm_prompts.py)


def text_key_of(path: Path) -> str | None:
    """The file's stem when it is a ``<category>_<lang>_text`` source key (the release's text file names)."""
    stem = Path(path).stem
    try:
        return stem if train_source_kind(stem) == "text" else None
    except ValueError:
        return None


def data_input(path, style: str = "fixed") -> Input:
    """An input given with --data: MMedBench's training split, text when its name says so (``*_text.*``, or
    ``.txt``), else training records. ``style``: the prompt style of MMedBench records."""
    path = Path(path)
    if mmedbench.is_release(path):
        return Input(path, "mmedbench", style=style)
    key = text_key_of(path)
    return Input(path, "text", key) if key or path.suffix == ".txt" else Input(path)


def text_input(arg: str) -> Input:
    """An input given with --text: ``FILE`` or ``SOURCE=FILE`` (SOURCE a ``<category>_<lang>_text`` key)."""
    head, sep, tail = arg.partition("=")
    if sep and head and not Path(arg).exists():
        try:
            kind = train_source_kind(head)
        except ValueError as e:
            raise ValueError(f"--text {arg}: {e}") from None
        if kind != "text":
            raise ValueError(f"--text {arg}: the source of raw text must end in _text (e.g. {head}_text)")
        return Input(Path(tail), "text", head)
    return Input(Path(arg), "text", text_key_of(Path(arg)))


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


def iter_text_file(path: Path) -> Iterator[tuple[int | str, str | None, object]]:
    """Yield (index, dict key or None, raw element) for every document of a raw-text file, streamed."""
    if path.suffix != ".txt":
        yield from iter_file(path)
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    lines: list[str] = []
    n = 0
    with path.open(encoding="utf-8-sig") as f:
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError:
                raise not_utf8(path) from None
            if line.strip():
                lines.append(line)
                continue
            if lines:  # a blank line (or the end of the file) closes a document
                yield n, None, "".join(lines).strip("\r\n")
                lines.clear()
                n += 1
            if not line:
                return


def parse_document(raw, path, index, source: str | None) -> tuple[str, list[str]]:
    """Validate one raw text document; return (source, [document]). ``source`` is the dict key or the file's."""
    if isinstance(raw, dict):
        if "text" not in raw:
            raise DataError(path, index, "text", "missing (a document is a string or an object with 'text')")
        source = raw.get("source", source)
        if not isinstance(source, str):
            raise DataError(path, index, "source", f"must be a string, got {type(source).__name__}")
        raw = raw["text"]
    if not isinstance(raw, str):
        raise DataError(path, index, "text", f"a document must be a string, got {type(raw).__name__}")
    if not raw.strip():
        raise DataError(path, index, "text", "empty document")
    if source is None:
        raise DataError(path, index, "source", "no source key: name the file <category>_<lang>_text.<ext>, pass "
                                               "--text <category>_<lang>_text=FILE, or give the record a 'source'")
    try:
        kind = train_source_kind(source)
    except ValueError as e:
        raise DataError(path, index, "source", str(e)) from None
    if kind != "text":
        raise DataError(path, index, "source", f"{source!r}: the source of a raw text document must be a "
                                               f"<category>_<lang>_text key")
    return source, [raw]


def parse_record(raw, path, index, source: str | None = None) -> tuple[str, list[str]]:
    """Validate one record; return (source, turns). ``source`` is given in the dict format (``raw`` = the turns)."""
    if source is None:
        if not isinstance(raw, dict):
            hint = (" (raw text? pass the file with --text, or name it <category>_<lang>_text.json)"
                    if isinstance(raw, str) else "")
            raise DataError(path, index, None, f"expected an object with 'conversations' and 'source', "
                                               f"got {type(raw).__name__}{hint}")
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
    if source.endswith("_text"):
        raise DataError(path, index, "source", f"{source!r} is a raw text source (*_text): its records are "
                                               f"documents (strings), not conversations")
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


def read_records(paths: list, out_file: Path, skip_errors: bool = False, batch: int = 8192,
                 screen=None) -> ReadResult:
    """Stream every record of ``paths`` (paths of record files, or ``Input``s) into an Arrow stream file with
    RECORD_SCHEMA. ``screen`` (a ``decontaminate.Screen``) removes records that leak bench questions; they are listed
    in ``ReadResult.leaks``."""
    inputs = [p if isinstance(p, Input) else Input(Path(p)) for p in paths]
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
            for (f, index, source, turns, is_text), leak in zip(pending, found):
                if leak is not None:
                    res.leaks.append({"file": str(inputs[f].path), "index": index, "source": source, **leak})
                    continue
                sid = ids.get(source)
                if sid is None:
                    sid = ids[source] = len(res.sources)
                    res.sources.append(source)
                cols["file"].append(f)
                cols["index"].append(str(index))
                cols["source_id"].append(sid)
                cols["turns"].append(turns)
                cols["is_text"].append(is_text)
                res.records += 1
            pending.clear()
            if len(cols["file"]) >= batch:
                flush()

        for f, inp in enumerate(inputs):
            n_read = 0
            for index, _, _, source, turns, is_text, reject in parsed_elements(inp):
                n_read += 1
                if reject is not None:
                    if not skip_errors:
                        raise reject
                    res.rejects.append({"file": str(inp.path), "index": index, "field": reject.field,
                                        "reason": reject.reason})
                    continue
                pending.append((f, index, source, turns, is_text))
                if len(pending) >= batch:
                    keep()
            keep()
            res.read_per_file.append(n_read)
        flush()
    return res


def parsed_elements(inp: Input):
    """(index, dict key or None, raw element, source, turns, is_text, DataError or None) for every element of one
    input, streamed: a training record, or a raw text document (one turn) of a text file or of a ``*_text`` key.
    Step 2 and scripts/decontaminate.sh read their inputs through this."""
    if inp.kind == "mmedbench":
        yield from _mmedbench_elements(inp)
        return
    path = inp.path
    text_file = inp.kind == "text"
    if text_file and path.suffix == ".txt" and inp.source is None:
        raise ValueError(f"{path}: no source key for this text file: name it <category>_<lang>_text.txt or pass "
                         f"--text <category>_<lang>_text={path}")
    for index, key, raw in (iter_text_file(path) if text_file else iter_file(path)):
        is_text = text_file or (key is not None and key.endswith("_text"))
        try:
            if is_text:
                source, turns = parse_document(raw, path, index, key or inp.source)
            else:
                source, turns = parse_record(raw, path, index, key)
        except DataError as e:
            yield index, key, raw, None, None, is_text, e
            continue
        yield index, key, raw, source, turns, is_text, None


def _mmedbench_elements(inp: Input):
    """``parsed_elements`` of MMedBench's training split: two conversations per item (with rationale, answer only);
    an item with an empty rationale gives the answer-only one and a reject for the other."""
    for path in mmedbench.split_files(inp.path, "Train"):
        name = mmedbench.language_of_file(path)
        source = f"{mmedbench.TASK}_{mmedbench.LANGUAGES[name]}"
        for n, raw in enumerate(iter_jsonl(path), 1):
            try:
                item = mmedbench.parse_item(raw, path, n, name)
            except DataError as e:
                yield f"{path.name}:{n}", None, raw, None, None, False, e
                continue
            if not item.rationale.strip():
                yield (f"{path.name}:{n}:rationale", None, raw, None, None, False,
                       DataError(path, n, "rationale", "empty: no with-rationale training record (the answer-only "
                                                       "one is kept with --on-error skip)"))
            for variant, prompt, target in mmedlm_prompts.training_pairs(item, inp.style):
                yield f"{path.name}:{n}:{variant}", None, raw, source, [prompt, target], False, None
