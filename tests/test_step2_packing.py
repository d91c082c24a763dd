"""Step 2 packing: next-fit invariants, row construction from chunked Arrow data, labels, positions, languages."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from src.prepare.packing import IGNORE_INDEX, ListColumn, plan_rows, write_dataset_metadata, write_rows


@pytest.mark.parametrize("seed", range(5))
def test_plan_rows_next_fit_invariants(seed):
    rng = np.random.default_rng(seed)
    max_len = 64
    lengths = rng.integers(1, max_len + 1, size=500)
    bounds = plan_rows(lengths, max_len)
    assert bounds[0] == 0 and bounds[-1] == len(lengths) and np.all(np.diff(bounds) >= 1)
    for r in range(len(bounds) - 1):
        row = lengths[bounds[r]:bounds[r + 1]]
        assert row.sum() <= max_len  # never over the limit; entries are never split (whole slices)
        if r + 1 < len(bounds) - 1:  # next-fit: the row closed because the next entry did not fit
            assert row.sum() + lengths[bounds[r + 1]] > max_len


def test_plan_rows_edge_cases():
    assert plan_rows(np.array([], dtype=np.int64), 8).tolist() == [0]
    assert plan_rows(np.array([8, 8, 1, 7, 1]), 8).tolist() == [0, 1, 2, 4, 5]


def _table(docs, spans, chunk_sizes):
    """A chunked tokenized table like Dataset.map(num_proc) makes, with one sliced chunk."""
    ids = pa.array([d for d in docs], pa.list_(pa.int32()))
    sp = pa.array([s for s in spans], pa.list_(pa.int32()))
    bounds = np.concatenate([[0], np.cumsum(chunk_sizes)])
    id_chunks = [ids.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]  # slices keep a non-zero offset
    sp_chunks = [sp.slice(a, b - a) for a, b in zip(bounds, bounds[1:])]
    return pa.table({"input_ids": pa.chunked_array(id_chunks), "label_spans": pa.chunked_array(sp_chunks)})


def test_list_column_gathers_across_sliced_chunks():
    docs = [[i * 100 + j for j in range(i % 5 + 1)] for i in range(30)]
    col = ListColumn(_table(docs, [[] for _ in docs], [10, 0, 7, 13]).column("input_ids"))
    pick = np.array([29, 0, 15, 15, 3, 17, 16])
    assert col.gather(pick).tolist() == [t for i in pick for t in docs[i]]
    assert col.lengths.tolist() == [len(d) for d in docs]


def _read(out_dir, names):
    rows = []
    for name in names:
        with pa.ipc.open_stream(str(out_dir / name)) as r:
            rows += r.read_all().to_pylist()
    return rows


def test_rows_hold_whole_documents_with_restarting_positions(tmp_path):
    rng = np.random.default_rng(0)
    n, max_len = 40, 32
    docs, spans = [], []
    for i in range(n):
        length = int(rng.integers(4, max_len + 1))
        docs.append((np.arange(length) + 1000 * i).tolist())
        a = int(rng.integers(1, length - 1))
        spans.append([a, length] if i % 3 else [1, 2, a, length])  # one or two answers per document
    table = _table(docs, spans, [15, 15, 10])
    order = rng.permutation(np.concatenate([np.arange(n), np.arange(0, n, 2)]))  # some records twice (epochs)
    lengths = np.array([len(docs[i]) for i in order])
    bounds = plan_rows(lengths, max_len)
    lang = (np.arange(n) % 7).astype(np.int32)
    h1, h2 = hashlib.sha256(), hashlib.sha256()
    names = write_rows(table, order, bounds, lang, tmp_path / "a", hasher=h1, tokens_per_batch=50)
    rows = _read(tmp_path / "a", names)
    assert names == ["data-00000-of-00001.arrow"] and len(rows) == len(bounds) - 1
    stream = []
    for r, row in enumerate(rows):
        ids, labels, pos, langs = row["input_ids"], row["labels"], row["position_ids"], row["language_ids"]
        assert len(ids) == len(labels) == len(pos) == len(langs) <= max_len
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
        assert starts[0] == 0
        docs_in_row = order[bounds[r]:bounds[r + 1]]
        assert len(starts) - 1 == len(docs_in_row)
        for d, a, b in zip(docs_in_row, starts, starts[1:]):
            assert ids[a:b] == docs[d] and pos[a:b] == list(range(b - a))
            assert set(langs[a:b]) == {int(lang[d])}
            target = np.zeros(b - a, bool)
            for s, e in np.array(spans[d]).reshape(-1, 2):
                target[s:e] = True
            assert labels[a:b] == [t if m else IGNORE_INDEX for t, m in zip(docs[d], target)]
        stream += ids
    assert stream == [t for d in order for t in docs[d]]  # the training order is the stored order
    # neither the batch size nor the shard size changes the rows or their digest
    names = write_rows(table, order, bounds, lang, tmp_path / "b", hasher=h2, shard_bytes=1000)
    assert len(names) > 1 and names[-1] == f"data-{len(names) - 1:05d}-of-{len(names):05d}.arrow"
    assert _read(tmp_path / "b", names) == rows and h1.hexdigest() == h2.hexdigest()
    write_dataset_metadata(tmp_path / "b", names, "f" * 32)
    import datasets

    ds = datasets.load_from_disk(str(tmp_path / "b"))
    assert ds.to_list() == rows and ds.column_names == ["input_ids", "labels", "position_ids", "language_ids"]


def test_metadata_is_what_save_to_disk_writes(tmp_path):
    """write_dataset_metadata mimics Dataset.save_to_disk: fail loudly if a datasets release changes the layout."""
    import datasets

    table = _table([[1, 2, 3], [4, 5]], [[1, 3], [0, 2]], [2])
    names = write_rows(table, np.array([0, 1, 0]), plan_rows(np.array([3, 2, 3]), 5), np.array([4, 0], np.int32),
                       tmp_path / "ours")
    write_dataset_metadata(tmp_path / "ours", names, "0123456789abcdef")
    ours = datasets.load_from_disk(str(tmp_path / "ours"))
    ours.save_to_disk(str(tmp_path / "theirs"))
    info = [(tmp_path / d / "dataset_info.json").read_text() for d in ("ours", "theirs")]
    assert info[0] == info[1]
    # state.json: identical text but for the fingerprint (load_from_disk's with_format derives a new one)
    state = {d: json.loads((tmp_path / d / "state.json").read_text()) for d in ("ours", "theirs")}
    assert state["ours"].pop("_fingerprint") == "0123456789abcdef"
    state["theirs"].pop("_fingerprint")
    assert state["ours"] == state["theirs"]
    assert (tmp_path / "ours" / "state.json").read_text() == \
        (tmp_path / "theirs" / "state.json").read_text().replace(ours._fingerprint, "0123456789abcdef")
    theirs = datasets.load_from_disk(str(tmp_path / "theirs"))
    assert theirs.features == ours.features and theirs.to_list() == ours.to_list()
    assert ours.to_list() == [  # documents 0 and 1 share a row (3 + 2 <= 5); document 0 again in the next
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1],
         "language_ids": [4, 4, 4, 0, 0]},
        {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2], "language_ids": [4, 4, 4]}]
