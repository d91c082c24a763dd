"""Step 3 input: step 2's packed rows, read in their stored order, split into micro-batches per rank, and collated.

Rows (``datasets.load_from_disk(DIR)``) are already in training order and at most ``max_seq_len`` tokens long, unpadded:
``input_ids``, ``labels`` (-100 = no loss), ``position_ids`` (restart at 0 at every packed document) and
``language_ids`` (family id per token, -1 = padding). The order is never shuffled.

Data position. A *global micro-batch* is ``world_size * batch_size`` consecutive rows; rank ``r`` takes the ``r``-th
slice of ``batch_size`` rows of it. An optimizer step is ``grad_accum`` global micro-batches (the last step of an epoch
may have fewer). So the rows a step consumes depend only on (step, world size, batch size, grad accum), which is what
makes resume exact: the trainer state records the step, and the plan below regenerates the remaining batches without
reading the skipped rows. The few rows at the end of an epoch that do not fill a global micro-batch
(< world_size * batch_size) are dropped and reported, never silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from src.common.defaults import IGNORE_INDEX
from src.common.errors import BadFile
from src.common.io import read_json
from src.common.languages import PAD_LANGUAGE_ID
from src.prepare.packing import MIXTURE_FILE, ROWS_MARKER, STEP2_FORMAT_VERSION

REQUIRED_COLUMNS = ("input_ids", "labels")


def load_rows(path, *, tokenizer=None, model_name=None, vocab_size: int | None = None,
              allow_tokenizer_mismatch: bool = False, log=print):
    """Step 2's training rows as a ``datasets.Dataset`` (Arrow, memory-mapped), with a clear error when malformed,
    left incomplete or mixed with another run's mixture.json by an interrupted step 2, or made for another vocabulary
    than the model's: ``tokenizer`` (compared with the fingerprint step 2 recorded, unless
    ``allow_tokenizer_mismatch``) and ``vocab_size`` (every id must have an embedding) are the model's."""
    import datasets

    path = rows_folder(path)
    mixture = check_step2_folder(path)
    if tokenizer is not None:
        note = check_tokenizer(mixture, path, tokenizer, model_name, allow_tokenizer_mismatch)
        if note:
            log(f"[train] note: {note}")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # a folder that is not a saved dataset
        raise ValueError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (splits: {list(ds)})")
        ds = ds["train"]
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: training rows lack column(s) {missing}; columns are {ds.column_names}")
    if len(ds) == 0:
        raise ValueError(f"{path}: the training set has no rows")
    require_label_tokens(ds, path)
    if vocab_size is not None:
        require_ids_in_vocabulary(ds, vocab_size, path)
    keep = [c for c in ("input_ids", "labels", "position_ids", "language_ids") if c in ds.column_names]
    return ds.select_columns(keep)


def rows_folder(path) -> Path:
    """The folder of the rows: ``path``, or its train/ subfolder when ``path`` is step 2's output folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: training rows not found (step 2 writes them: 2.data_process_train.sh)")
    if not path.is_dir():
        raise BadFile(path, "not a folder: step 3 reads the folder of rows step 2 writes (its --out, or the train/ "
                            "in it)")
    if (path / "train" / ROWS_MARKER).is_file() or ((path / MIXTURE_FILE).is_file() and (path / "train").is_dir()):
        path = path / "train"  # step 2's output folder given instead of its train/ subfolder
    return path


def check_step2_folder(train_dir: Path) -> dict | None:
    """Step 2's mixture.json beside ``train_dir``, checked: present (step 2 writes it last, so its absence beside
    rows step 2 marked means step 2 did not finish), of a format_version this code reads, and describing these very
    rows (the digest in train/step2_rows.json; for folders of step 2's version 1, the prefix datasets' state.json
    holds). None for rows that step 2 did not write there (a dataset saved by other means)."""
    mixture_file, marker_file = train_dir.parent / MIXTURE_FILE, train_dir / ROWS_MARKER
    if marker_file.is_file():
        held = _digest_field(read_json(marker_file), "rows_sha256", marker_file)
        if not mixture_file.is_file():
            raise BadFile(train_dir, f"step 2 did not finish writing {train_dir.parent}: there is no {MIXTURE_FILE} "
                                     f"beside train/ (step 2 writes it last); rerun step 2 with the same command")
    elif train_dir.name == "train" and mixture_file.is_file():
        held = None
    else:
        return None
    mixture = read_json(mixture_file)
    if not isinstance(mixture, dict):
        raise BadFile(mixture_file, f"expected a JSON object, got {type(mixture).__name__}")
    version = mixture.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= STEP2_FORMAT_VERSION:
        raise BadFile(mixture_file, f"format_version {version!r} is not one this code reads (1 to "
                                    f"{STEP2_FORMAT_VERSION}): written by another version of the project, or edited")
    recorded = _digest_field(mixture, "rows_sha256", mixture_file)
    if held is None:  # version 1: datasets' state.json holds the first 32 digits of the digest
        held, recorded = str(read_json(train_dir / "state.json").get("_fingerprint")), recorded[:32]
    if held != recorded:
        raise BadFile(mixture_file, f"does not belong with {train_dir}: it describes the rows {recorded[:12]}..., "
                                    f"train/ holds the rows {held[:12]}... (step 2 was stopped while replacing them, "
                                    f"or the folders were mixed by hand); rerun step 2 into {train_dir.parent}")
    return mixture


def _digest_field(entry, field: str, file: Path) -> str:
    value = entry.get(field) if isinstance(entry, dict) else None
    if not isinstance(value, str) or not value:
        raise BadFile(file, f"field {field!r}: expected the rows' sha256, got {value!r}")
    return value


def check_tokenizer(mixture: dict | None, train_dir: Path, tokenizer, model_name, allow: bool) -> str | None:
    """Refuse rows step 2 tokenized with another tokenizer than the model's (their ids would mean other tokens),
    unless ``allow``; returns a note where the tokenizer cannot be checked or the mismatch is allowed."""
    from src.models.loading import tokenizer_fingerprint

    mixture_file = train_dir.parent / MIXTURE_FILE
    if mixture is None:
        return (f"{train_dir}: no {MIXTURE_FILE} beside it (rows not written there by step 2): their tokenizer is not "
                f"checked, only that every id has an embedding")
    recorded = (mixture.get("tokenizer") or {}).get("fingerprint")
    if not recorded:
        return (f"{mixture_file}: an older step 2 recorded no tokenizer fingerprint: the rows' tokenizer is not "
                f"checked, only that every id has an embedding")
    mine = tokenizer_fingerprint(tokenizer)
    if recorded == mine:
        return None
    problem = (f"the rows were tokenized with {mixture.get('model')}'s tokenizer (fingerprint {recorded[:12]}), but "
               f"--model {model_name} has another one (fingerprint {mine[:12]}): the ids would mean other tokens")
    if allow:
        return f"{mixture_file}: {problem}; training on them anyway (--allow-tokenizer-mismatch)"
    raise BadFile(mixture_file, f"{problem}; run step 2 with --model {model_name}, or pass --allow-tokenizer-mismatch "
                                f"if the vocabularies are meant to differ")


def require_ids_in_vocabulary(ds, vocab_size: int, path) -> None:
    """Every input id and label must have a row in the model's embedding (else an IndexError mid-training, or a
    silent wrong lookup on some kernels). Arrow compute over the columns, no Python loop over rows."""
    import pyarrow.compute as pc

    for column in ("input_ids", "labels"):
        values = pc.list_flatten(ds.data.table.column(column))
        if column == "labels":
            values = pc.filter(values, pc.not_equal(values, IGNORE_INDEX))
        low, high = (pc.min_max(values).as_py() or {}).values()
        if high is not None and high >= vocab_size:
            raise BadFile(path, f"column {column!r} holds token ids up to {high}, but the model's vocabulary has "
                                f"{vocab_size} ids (0 to {vocab_size - 1}): the rows were made with another "
                                f"tokenizer; run step 2 with this --model")
        if low is not None and low < 0:
            raise BadFile(path, f"column {column!r} holds the negative token id {low}")


def require_label_tokens(ds, path) -> int:
    """Refuse rows that carry no label token at all: training on them "succeeds" at loss 0.0 and learns nothing.
    Counted with Arrow compute over the labels column (no Python loop over rows). Returns the label-token count."""
    import pyarrow.compute as pc

    labels = pc.list_flatten(ds.data.table.column("labels"))
    n_label = int(pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0)
    if n_label == 0:
        raise ValueError(f"{path}: no row has a label token (every label is {IGNORE_INDEX}): nothing to train on; "
                         f"step 2 with a larger --max-seq-len keeps the answers")
    return n_label


@dataclass(frozen=True)
class BatchPlan:
    """Which rows each rank reads at each micro-step: a pure function of the sizes, so resume needs only the step."""
    num_rows: int
    world_size: int
    batch_size: int
    grad_accum: int

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1 or self.world_size < 1:
            raise ValueError("batch size, grad accum and world size must be >= 1")
        if self.micro_steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_rows} training rows cannot fill one global micro-batch of world_size x batch_size = "
                f"{self.world_size} x {self.batch_size} rows; use a smaller --batch-size or fewer processes")

    @property
    def rows_per_micro_step(self) -> int:
        return self.world_size * self.batch_size

    @property
    def micro_steps_per_epoch(self) -> int:
        return self.num_rows // self.rows_per_micro_step

    @property
    def dropped_rows_per_epoch(self) -> int:
        return self.num_rows - self.micro_steps_per_epoch * self.rows_per_micro_step

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.micro_steps_per_epoch / self.grad_accum)

    def micro_steps_in(self, step_in_epoch: int) -> int:
        """Number of micro-batches of optimizer step ``step_in_epoch`` (the last step of an epoch may be shorter)."""
        return min(self.grad_accum, self.micro_steps_per_epoch - step_in_epoch * self.grad_accum)

    def rows(self, micro_step: int, rank: int) -> list[int]:
        """Row indices read by ``rank`` at micro-step ``micro_step`` (counted within the epoch)."""
        start = (micro_step * self.world_size + rank) * self.batch_size
        return list(range(start, start + self.batch_size))

    def batches(self, rank: int, start_step_in_epoch: int = 0) -> list[list[int]]:
        """This rank's micro-batches (row indices) from optimizer step ``start_step_in_epoch`` to the epoch's end."""
        first = start_step_in_epoch * self.grad_accum
        return [self.rows(m, rank) for m in range(first, self.micro_steps_per_epoch)]


class Collator:
    """Pads the rows of a micro-batch to the batch maximum, or flattens them into one row (padding-free).

    Padding: pad token id, label -100, language id -1 and position ids restarting at 0, so the padding is a document
    of its own that no real token attends to. Labels at every document start (position id 0) are set to -100: a
    document's first token cannot be predicted from inside that document (with the causal shift it would otherwise be
    predicted from the previous packed document's last token).

    ``flatten=True`` (flash-attention varlen on GPU) concatenates the rows into a single row of length sum(lengths)
    and adds ``cu_seq_lens_q/k`` and ``max_length_q/k``, the document boundaries transformers' flash-attention path
    takes directly (no per-layer inference from the position ids).
    """

    def __init__(self, pad_token_id: int, flatten: bool = False, with_language_ids: bool = False):
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token id (load it with src.models.loading.load_tokenizer)")
        self.pad_token_id = int(pad_token_id)
        self.flatten = flatten
        self.with_language_ids = with_language_ids

    def __call__(self, rows: list[dict]) -> dict:
        seqs = []
        for row in rows:
            ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels = torch.as_tensor(row["labels"], dtype=torch.long)
            n = ids.numel()
            if labels.numel() != n:
                raise ValueError(f"row with {n} input ids has {labels.numel()} labels")
            if row.get("position_ids") is not None:
                pos = torch.as_tensor(row["position_ids"], dtype=torch.long)
            else:  # an unpacked row: one document
                pos = torch.arange(n)
            if pos.numel() != n:
                raise ValueError(f"row with {n} input ids has {pos.numel()} position ids")
            labels = labels.masked_fill(pos == 0, IGNORE_INDEX)
            lang = None
            if self.with_language_ids:
                if row.get("language_ids") is None:
                    raise ValueError("an MoE model is trained but the rows have no language_ids column "
                                     "(step 2 writes it)")
                lang = torch.as_tensor(row["language_ids"], dtype=torch.long)
            seqs.append((ids, labels, pos, lang))
        out = self._flatten(seqs) if self.flatten else self._pad(seqs)
        # Real tokens and the sum of squared document lengths (padding excluded): the FLOPs estimate behind MFU.
        out["num_tokens"] = sum(s[0].numel() for s in seqs)
        out["doc_len_sq"] = sum(n * n for s in seqs for n in document_lengths(s[2]))
        return out

    def _pad(self, seqs) -> dict:
        width = max(s[0].numel() for s in seqs)
        b = len(seqs)
        out = {
            "input_ids": torch.full((b, width), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((b, width), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((b, width), dtype=torch.long),
        }
        if self.with_language_ids:
            out["language_ids"] = torch.full((b, width), PAD_LANGUAGE_ID, dtype=torch.long)
        for i, (ids, labels, pos, lang) in enumerate(seqs):
            n = ids.numel()
            out["input_ids"][i, :n] = ids
            out["labels"][i, :n] = labels
            out["position_ids"][i, :n] = pos
            out["position_ids"][i, n:] = torch.arange(width - n)  # padding: its own document
            if lang is not None:
                out["language_ids"][i, :n] = lang
        return out

    def _flatten(self, seqs) -> dict:
        out = {
            "input_ids": torch.cat([s[0] for s in seqs])[None],
            "labels": torch.cat([s[1] for s in seqs])[None],
            "position_ids": torch.cat([s[2] for s in seqs])[None],
        }
        if self.with_language_ids:
            out["language_ids"] = torch.cat([s[3] for s in seqs])[None]
        pos = out["position_ids"][0]
        starts = torch.nonzero(pos == 0).flatten()
        if starts.numel() == 0 or starts[0] != 0:
            starts = torch.cat([torch.zeros(1, dtype=starts.dtype), starts])
        bounds = torch.cat([starts, torch.tensor([pos.numel()])])
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = bounds.to(torch.int32)
        out["max_length_q"] = out["max_length_k"] = int((bounds[1:] - bounds[:-1]).max())
        return out


def document_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the documents of one row of position ids (a new document starts wherever the id is 0)."""
    starts = torch.nonzero(position_ids == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [position_ids.numel()]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
