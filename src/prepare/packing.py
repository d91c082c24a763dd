"""Packing ordered entries into rows of at most max_seq_len tokens, without splitting an entry.

Rows are filled next-fit in the priority order (an entry that does not fit closes the row), so the stored row order
is the training order. Rows are not padded: the trainer's collator pads. Each row carries

- ``input_ids``;
- ``labels``: the token id where the token is a loss target (an answer or the end string after it), else -100, not
  shifted (transformers' causal-LM loss shifts);
- ``position_ids``: restarting at 0 at every document, so documents of a row do not attend to each other
  (transformers builds the block-diagonal mask from them; flash-attention varlen uses them likewise);
- ``language_ids``: the id of each document's language (family or per-language), per token.

Tokens are gathered straight from the memory-mapped tokenized Arrow data with vectorised numpy indexing, a bounded
batch of rows at a time, and written as the shards of a ``datasets`` save_to_disk directory; nothing proportional to
the corpus is held in memory.
"""
from __future__ import annotations

import hashlib
from array import array
from pathlib import Path

import numpy as np
import pyarrow as pa

from src.common.defaults import IGNORE_INDEX
from src.common.io import writing

# Step 2's output folder as step 3 reads it: train/ (these rows) and mixture.json beside it, which is written last
# (it marks a complete folder); train/step2_rows.json and mixture.json record the same rows digest. Versions: 1
# (before the marker and the tokenizer fingerprint, still read), 2.
MIXTURE_FILE, ROWS_MARKER, STEP2_FORMAT_VERSION = "mixture.json", "step2_rows.json", 2

ROW_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("language_ids", pa.list_(pa.int32())),
])


def plan_rows(lengths: np.ndarray, max_len: int, chunk: int = 1 << 20) -> np.ndarray:
    """Next-fit packing of entries (in order) with the given lengths (each <= max_len).

    Returns the row boundaries: row r holds entries ``bounds[r]:bounds[r + 1]``. A plain loop (next-fit is
    sequential), over bounded chunks of Python ints, collecting boundaries in a compact array.
    """
    bounds = array("q", [0])
    cur = 0
    for c0 in range(0, len(lengths), chunk):
        for i, n in enumerate(lengths[c0:c0 + chunk].tolist(), c0):
            if cur + n > max_len and cur:
                bounds.append(i)
                cur = 0
            cur += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.frombuffer(bounds, dtype=np.int64).copy()


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concatenate([arange(s, s + n) for s, n in zip(starts, lengths)]) without a Python loop."""
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    return np.repeat(starts - first, lengths) + np.arange(total, dtype=np.int64)


class ListColumn:
    """Random access to the rows of a list<int32> column of a (memory-mapped, chunked) Arrow table."""

    def __init__(self, column: pa.ChunkedArray):
        self.values, bases, starts, lengths = [], [0], [], []
        for chunk in column.chunks:
            offsets = chunk.offsets.to_numpy().astype(np.int64)  # absolute positions into chunk.values
            values = chunk.values.to_numpy(zero_copy_only=True)
            starts.append(offsets[:-1] + bases[-1])
            lengths.append(np.diff(offsets))
            self.values.append(values)
            bases.append(bases[-1] + len(values))
        self.bases = np.asarray(bases, dtype=np.int64)
        self.starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The concatenated values of ``rows`` (in the given order)."""
        starts, lengths = self.starts[rows], self.lengths[rows]
        out = np.empty(int(lengths.sum()), dtype=np.int32)
        dest = np.cumsum(lengths) - lengths
        chunk = np.searchsorted(self.bases, starts, side="right") - 1
        nonempty = lengths > 0  # an empty row may sit at a chunk's end, where its start names no chunk
        for c in np.unique(chunk[nonempty]):
            m = (chunk == c) & nonempty
            out[_ranges(dest[m], lengths[m])] = self.values[c][_ranges(starts[m] - self.bases[c], lengths[m])]
        return out


SHARD_BYTES = 500 * 2**20  # as datasets' save_to_disk (config.MAX_SHARD_SIZE)


def row_features():
    """The rows' datasets Features (list<int32> columns), whose arrow_schema carries datasets' own metadata."""
    from datasets import Features, List, Value

    return Features({name: List(Value("int32")) for name in ROW_SCHEMA.names})


def write_rows(tokenized: pa.Table, order: np.ndarray, bounds: np.ndarray, doc_language: np.ndarray, out_dir: Path,
               hasher=None, tokens_per_batch: int = 1 << 20, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Write the packed rows as the Arrow shard files of a ``save_to_disk`` directory, streamed.

    ``order`` = record index of each entry in training order, ``bounds`` from plan_rows, ``doc_language`` = language
    id per record; ``hasher`` (hashlib) digests the rows' content, independent of batch and shard sizes. Rows are
    split into contiguous shards of equal row counts, about ``shard_bytes`` each, named as save_to_disk names them.
    Writing the final files directly (rather than a temporary file that save_to_disk then copies through a memory
    map) keeps the resident memory of the step independent of the corpus size. Returns the shard file names.
    """
    ids_col, spans_col = ListColumn(tokenized.column("input_ids")), ListColumn(tokenized.column("label_spans"))
    entry_len = ids_col.lengths[order]
    row_tokens = np.add.reduceat(entry_len, bounds[:-1]) if len(bounds) > 1 else np.zeros(0, np.int64)
    schema = row_features().arrow_schema
    n_rows = len(bounds) - 1
    nbytes = 4 * len(ROW_SCHEMA.names) * (int(row_tokens.sum()) + n_rows + 1)
    n_shards = max(1, min(n_rows, nbytes // shard_bytes + 1))
    div, mod = divmod(n_rows, n_shards)  # the split of Dataset.shard(contiguous=True)
    shard_rows = [div * i + min(i, mod) for i in range(n_shards + 1)]
    col_hash = [hashlib.sha256() for _ in range(2 * len(schema.names))]  # row lengths, values per column
    names = [f"data-{i:05d}-of-{n_shards:05d}.arrow" for i in range(n_shards)]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, s0, s1 in zip(names, shard_rows, shard_rows[1:]):
        # writing(): pyarrow's full-disk error names no file
        with writing(out_dir / name), pa.OSFile(str(out_dir / name), "wb") as sink, \
                pa.ipc.new_stream(sink, schema) as writer:
            r0 = s0
            while r0 < s1:
                # as many rows as fit in the token budget of one batch (at least one)
                cum = np.cumsum(row_tokens[r0:s1])
                r1 = r0 + max(1, int(np.searchsorted(cum, tokens_per_batch, side="right")))
                e0, e1 = int(bounds[r0]), int(bounds[r1])
                batch = _row_batch(ids_col, spans_col, order[e0:e1], bounds[r0:r1 + 1] - e0, doc_language, schema)
                for c, col in enumerate(batch.columns):
                    col_hash[2 * c].update(np.diff(col.offsets.to_numpy()).tobytes())
                    col_hash[2 * c + 1].update(col.values.to_numpy().tobytes())
                writer.write_batch(batch)
                r0 = r1
    if hasher is not None:
        for h in col_hash:
            hasher.update(h.digest())
    return names


def write_dataset_metadata(out_dir: Path, shard_names: list[str], fingerprint: str) -> None:
    """state.json and dataset_info.json exactly as ``Dataset.save_to_disk`` writes them in datasets 5.2 (a private
    layout: tests/test_step2_packing.py compares them with save_to_disk's own output and fails when a release changes
    it), so ``datasets.load_from_disk(out_dir)`` loads the shards step 2 streamed."""
    import json

    from datasets import DatasetInfo
    from datasets.utils.py_utils import asdict  # datasets' own: leaves out fields at their defaults

    state = {"_data_files": [{"filename": n} for n in shard_names], "_fingerprint": fingerprint,
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}
    with writing(out_dir / "state.json"), (out_dir / "state.json").open("w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    info = asdict(DatasetInfo(features=row_features()))
    with writing(out_dir / "dataset_info.json"), (out_dir / "dataset_info.json").open("w", encoding="utf-8") as f:
        json.dump({key: info[key] for key in sorted(info)}, f, indent=2)


def _row_batch(ids_col: ListColumn, spans_col: ListColumn, docs: np.ndarray, row_bounds: np.ndarray,
               doc_language: np.ndarray, schema: pa.Schema) -> pa.RecordBatch:
    ids = ids_col.gather(docs)
    lengths = ids_col.lengths[docs]
    total = len(ids)
    doc_start = np.cumsum(lengths) - lengths  # position of each document in this batch's token stream
    # loss targets: +1 at each span start, -1 at each span end, cumulative sum > 0 inside spans
    spans = spans_col.gather(docs).astype(np.int64).reshape(-1, 2)
    span_doc = np.repeat(np.arange(len(docs)), spans_col.lengths[docs] // 2)
    spans += doc_start[span_doc, None]
    delta = np.bincount(spans[:, 0], minlength=total + 1) - np.bincount(spans[:, 1], minlength=total + 1)
    target = np.cumsum(delta[:total]) > 0
    labels = np.where(target, ids, IGNORE_INDEX).astype(np.int32)
    positions = (np.arange(total, dtype=np.int64) - np.repeat(doc_start, lengths)).astype(np.int32)
    languages = np.repeat(doc_language[docs], lengths).astype(np.int32)
    row_offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)])[row_bounds].astype(np.int32))
    cols = [pa.ListArray.from_arrays(row_offsets, pa.array(v)) for v in (ids, labels, positions, languages)]
    return pa.record_batch(cols, schema=schema)
