"""Step 2: priority-ordered, tokenized, packed training rows (docs/reference.md, "Priority sampling", done right).

Reads training records (release list, extracted dict or JSONL; several --data files are concatenated) and raw
pretraining text (--text, or --data with a *_text/.txt name: documents with the loss on every token, split into
--max-seq-len pieces when longer; records.py and tokenize_chat.py say how), gives every
source a priority and a number of epochs from one rule table (src/prepare/priorities.yaml, overridable), orders all
epoch copies by seeded exponential keys Exp(1)/priority (the reference's sequential weighted sampling, without its 2^24
cap), tokenizes them in the model's chat format with the loss on answers and the end string after each answer, and
packs them in that order into rows of at most --max-seq-len tokens with per-document position ids.

Writes into --out: train/ (datasets.load_from_disk; columns input_ids, labels, position_ids, language_ids; rows in
training order, not padded), mixture.json (what went in: entries, tokens and loss tokens per source, language and
family; priorities, epochs, seed, truncations, rejects, packing efficiency, the curriculum), curriculum.png (share of
pretrain-QA vs SFT tokens from the start to the end of training) and train_rejects.jsonl (records left out, with
reasons; not rejects.jsonl, which step 1 writes into the same folder).
The same inputs and seed give identical files, whatever --num-proc.

The outputs change as one unit: they are written into a scratch folder inside --out and moved into place at the end,
the earlier run's mixture.json (the mark of a complete folder) first out and the new one last in, with Ctrl-C held
back until all are in place. train/step2_rows.json and mixture.json record the same rows digest, and mixture.json
the tokenizer's fingerprint: step 3 refuses rows whose mixture.json is missing or belongs to other rows, and rows of
another tokenizer than its model's (src/train/data.py).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from src.common import cli
from src.common.chat_formats import FORMAT_NAMES, ChatFormat
from src.common.defaults import DEFAULT_MODEL, IGNORE_INDEX, ROOT, repo_relative
from src.common.io import write_json, write_jsonl, writing
from src.common.rerun import check_rerun, normalised
from src.common.languages import (
    PAD_LANGUAGE_ID,
    families,
    family_id,
    language_id,
    languages,
    parse_train_source,
    train_source_kind,
)
from src.models.loading import load_tokenizer_and_format, tokenizer_fingerprint
from src.prepare import mixture as mx
from src.prepare import mmedlm_prompts
from src.prepare.packing import (
    MIXTURE_FILE,
    ROW_SCHEMA,
    ROWS_MARKER,
    STEP2_FORMAT_VERSION,
    ListColumn,
    plan_rows,
    write_dataset_metadata,
    write_rows,
)
from src.prepare.config import (
    PAPER_MAX_SEQ_LEN,
    SAMPLE_MAX_SEQ_LEN,
    SAMPLE_TRAIN,
    TrainDataConfig,
    default_num_proc,
)
from src.prepare.records import ReadResult, read_records
from src.prepare.tokenize_chat import ChatEncoder

TOKENIZE_BATCH = 1000
MAX_EXAMPLES = 20  # truncated records listed by name in mixture.json (all are counted)
CLASS_OF_KIND = {"text": "text", "qa": "pretrain_qa", "sft": "sft"}  # mixture.json's by_class names
CLASS_LABELS = {"text": "text", "qa": "pretrain-QA", "sft": "SFT"}  # the curriculum plot's
TMP_PREFIX = ".step2-tmp-"
# What a run puts into --out, in the order it is moved into place: mixture.json last, it marks a complete folder.
OUTPUTS = ("train", "train_rejects.jsonl", "train_leaks.jsonl", "curriculum.png", MIXTURE_FILE)
# Test hook: stop while the outputs are being moved into place, right after train/ ("ctrl-c": as if Ctrl-C were
# pressed then; "crash": die there, as kill -9 would), to check that the folder changes as one unit.
STOP_IN_PUBLISH_ENV = "APOLLO_STEP2_STOP_IN_PUBLISH"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="2.data_process_train.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, action="append", default=None,
                   help="training records (repeatable); default: the embedded sample data/raw/sample/train.json. "
                        "A file named <category>_<lang>_text.json/.jsonl/.txt, or any .txt, is read as raw text")
    p.add_argument("--text", action="append", default=None, metavar="[SOURCE=]FILE",
                   help="raw pretraining text (repeatable; read after --data): a JSON list of strings (the release's "
                        "<category>_<lang>_text.json), .txt with documents separated by blank lines, or JSON Lines "
                        "of strings or {text[, source]} objects. SOURCE (<category>_<lang>_text) defaults to the "
                        "file name's stem. Loss on every token; documents longer than --max-seq-len are split")
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help=f"model folder: its tokenizer and chat format (default: {repo_relative(DEFAULT_MODEL)})")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: data/sample_<model> for the sample, else data/<data stem>_<model>)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help=f"tokens per row; longer conversations are truncated, longer text documents split "
                        f"(default: {PAPER_MAX_SEQ_LEN}, the paper's; "
                        f"{SAMPLE_MAX_SEQ_LEN} for the embedded sample)")
    p.add_argument("--seed", type=int, default=42, help="seed of the priority order (default: %(default)s)")
    p.add_argument("--priorities", type=Path, default=None,
                   help="YAML/JSON rule file tried before the defaults in src/prepare/priorities.yaml")
    p.add_argument("--num-proc", type=int, default=default_num_proc(),
                   help="tokenizer processes (default: half the cores, at most 8: %(default)s); output is identical")
    p.add_argument("--language-ids", choices=["family", "language"], default="family",
                   help="per-token language_ids: the 7-family id (default; the MoE expert) or the 50 per-language id")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="malformed records: stop with an error (default) or write them to train_rejects.jsonl and "
                        "go on")
    p.add_argument("--format", choices=FORMAT_NAMES, default=None, help="chat format (default: from the model)")
    p.add_argument("--prompt-style", choices=mmedlm_prompts.STYLES, default="fixed",
                   help="MMedBench training records (--data an MMedBench release): fixed (default) or mmedlm, the "
                        "prompt styles of step 1 (docs/mmedbench.md)")
    p.add_argument("--decontaminate-against", type=Path, action="append", default=None, metavar="BENCH",
                   help="bench items (repeatable): records leaking one of their questions are left out, counted in "
                        "mixture.json and listed in train_leaks.jsonl (the rule of scripts/decontaminate.sh)")
    p.add_argument("--leak-min-chars", type=int, default=64,
                   help="with --decontaminate-against: shared characters that make a leak (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out made with other settings (a rerun with the "
                        "same settings needs no flag: it writes the same files)")
    return p


def _per_record(tokenized) -> dict[str, np.ndarray]:
    """Per-record arrays from the tokenized Arrow table (small: a few numbers per record)."""
    ids = ListColumn(tokenized.column("input_ids"))
    spans_col = ListColumn(tokenized.column("label_spans"))
    spans = spans_col.gather(np.arange(len(spans_col.lengths))).astype(np.int64).reshape(-1, 2)
    pair_doc = np.repeat(np.arange(len(spans_col.lengths)), spans_col.lengths // 2)
    loss = np.bincount(pair_doc, weights=spans[:, 1] - spans[:, 0], minlength=len(ids.lengths)).astype(np.int64)
    return {
        "source": tokenized.column("source_id").to_numpy().astype(np.int32),
        "length": ids.lengths,
        "full_length": tokenized.column("full_length").to_numpy().astype(np.int64),
        "loss": loss,
        "split": tokenized.column("boundary_split").to_numpy(zero_copy_only=False),
        "piece": tokenized.column("piece").to_numpy().astype(np.int32),
    }


def _counts(keys: np.ndarray, weights, n: int) -> np.ndarray:
    return np.bincount(keys, weights=weights, minlength=n)


def run(config: TrainDataConfig) -> dict:
    t0 = time.time()
    if config.sample and not SAMPLE_TRAIN.is_file():
        raise FileNotFoundError(f"{SAMPLE_TRAIN}: the embedded sample is not there yet; run ./0.download_data.sh "
                                f"first (it copies assets/sample/) or pass --data")
    out = config.out
    table = mx.PriorityTable.load(config.priorities)

    tokenizer, fmt = load_tokenizer_and_format(config.model, config.format)
    encoder = ChatEncoder(tokenizer, fmt, config.max_seq_len)

    from src.common.locks import hold, release

    hold(out, "step 2")  # one writer per --out
    tmp = None
    try:
        check_rerun(out, MIXTURE_FILE, config.settings(), config.overwrite, "step 2")
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=TMP_PREFIX))
        timings = {"load tokenizer": time.time() - t0}
        with writing(out):  # a full disk in a writer that names no file is reported as --out at least
            report = _build(Build(config, tmp, table, tokenizer, fmt, encoder, timings))
        _publish(tmp / "outputs", out, tmp / "previous")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        release(out)
    timings["total"] = time.time() - t0
    _print_summary(report, out, timings)
    # timings are printed, not written: mixture.json stays byte-identical between runs
    return report | {"_timings": timings}


@dataclass
class Build:
    """What every step of one step-2 run needs: the settings, the loaded tokenizer and format, where to write."""
    config: TrainDataConfig  # config.inputs: the input files, --data ones in order, then --text ones
    tmp: Path  # scratch folder inside --out, removed at the end; the outputs are built in tmp/outputs
    table: mx.PriorityTable
    tokenizer: object
    fmt: ChatFormat
    encoder: ChatEncoder
    timings: dict  # step name -> seconds, filled by lap()
    clock: float = field(default_factory=time.time)

    @property
    def stage(self) -> Path:
        """Where the outputs are written before they are moved into --out as one unit (``_publish``)."""
        return self.tmp / "outputs"

    @property
    def data(self) -> list[Path]:
        """The input files' paths."""
        return [i.path for i in self.config.inputs]

    def lap(self, name: str) -> None:
        now = time.time()
        self.timings[name] = now - self.clock
        self.clock = now


@dataclass
class Records:
    """Step 1 of the build: the validated records (in tmp/records.arrow) and their sources' rules."""
    read: ReadResult
    screen: object  # the decontamination Screen, or None
    rules: list  # mx.Rule per source id
    parsed: list  # (category, language, is_qa) per source id
    kinds: list  # 'text', 'qa' or 'sft' per source id


@dataclass
class Tokens:
    """Step 2: the tokenized table and its per-record numbers."""
    dataset: object  # the datasets.Dataset the table belongs to (kept alive while the table is read)
    table: object  # its Arrow table: input_ids, label_spans, ...
    rec: dict  # per-record arrays (_per_record); a text document split at max_len is one "record" per piece
    truncated: np.ndarray  # bool per record
    truncated_examples: list


@dataclass
class Order:
    """Step 3: the entries in training order."""
    order: np.ndarray  # record index of each entry, in training order
    src_is_pretrain: np.ndarray  # text or pretrain-QA (the curriculum's first class) per source id
    src_lang_id: np.ndarray


@dataclass
class Rows:
    """Step 4: how the entries were packed into rows."""
    lengths: np.ndarray  # tokens of each entry, in order
    bounds: np.ndarray  # row r holds entries bounds[r]:bounds[r + 1]
    digest: str

    @property
    def n_rows(self) -> int:
        return len(self.bounds) - 1


def _build(ctx: Build) -> dict:
    recs = _read(ctx)
    tok = _tokenize(ctx, recs)
    order = _order(ctx, recs, tok)
    rows = _pack(ctx, tok, order)
    del tok.dataset, tok.table
    report = _report(ctx, recs, tok, order, rows)
    _write_report(ctx, recs, report, order, rows)
    ctx.lap("report")
    return report


def _read(ctx: Build) -> Records:
    """Read and validate every input, streamed into an Arrow file (leaks screened out when asked)."""
    screen = None
    if ctx.config.decontaminate_against:
        from src.prepare.decontaminate import Screen, bench_questions
        screen = Screen(bench_questions(ctx.config.decontaminate_against), ctx.config.leak_min_chars)
    with writing(ctx.tmp / "records.arrow"):
        read = read_records(ctx.config.inputs, ctx.tmp / "records.arrow", skip_errors=ctx.config.on_error == "skip",
                            screen=screen)
    if read.records == 0:
        raise ValueError(f"no valid training records in {', '.join(map(str, ctx.data))}")
    rules = ctx.table.resolve(read.sources)
    ctx.lap("read + validate")
    return Records(read, screen, rules, [parse_train_source(s) for s in read.sources],
                   [train_source_kind(s) for s in read.sources])


def _tokenize(ctx: Build, recs: Records) -> Tokens:
    """Tokenize in parallel into Arrow cache files (map keeps the record order whatever num_proc)."""
    import datasets
    from datasets.table import MemoryMappedTable

    records = datasets.Dataset(MemoryMappedTable.from_file(str(ctx.tmp / "records.arrow")),
                               fingerprint="step2-records")
    num_proc = ctx.config.num_proc if ctx.config.num_proc > 1 else None
    with writing(ctx.tmp / "tokenized.arrow"):
        tokenized = records.with_format("arrow").map(
            ctx.encoder, batched=True, batch_size=TOKENIZE_BATCH, num_proc=num_proc,
            remove_columns=records.column_names,  # a text document may become several rows (pieces)
            cache_file_name=str(ctx.tmp / "tokenized.arrow"), new_fingerprint="step2-tokenized", desc="tokenizing")
    ctx.lap("tokenize")
    rec = _per_record(tokenized.data.table)
    truncated = rec["full_length"] > rec["length"]
    _require_loss_tokens(rec, truncated, ctx.config.max_seq_len)
    return Tokens(tokenized, tokenized.data.table, rec, truncated,
                  _truncated_examples(ctx, recs, tokenized, rec, truncated))


def _truncated_examples(ctx: Build, recs: Records, tokenized, rec: dict, truncated: np.ndarray) -> list[dict]:
    """The first MAX_EXAMPLES truncated records by name (a few row lookups, no table copy)."""
    meta = tokenized.with_format(None).select_columns(["file", "index", "source_id", "full_length"])
    examples = []
    for i in np.flatnonzero(truncated)[:MAX_EXAMPLES].tolist():
        r = meta[i]
        examples.append({"file": str(ctx.data[r["file"]]), "index": r["index"],
                         "source": recs.read.sources[r["source_id"]], "tokens": r["full_length"],
                         "kept": int(rec["length"][i])})
    return examples


def _order(ctx: Build, recs: Records, tok: Tokens) -> Order:
    """Every epoch copy is an entry; entries sorted by seeded exponential keys Exp(1)/priority."""
    source = tok.rec["source"]
    src_prio = np.array([r.priority for r in recs.rules], dtype=np.float32)
    src_is_pretrain = np.array([k != "sft" for k in recs.kinds], dtype=bool)
    lang_of = family_id if ctx.config.language_ids == "family" else language_id
    src_lang_id = np.array([lang_of(lang) for _, lang, _ in recs.parsed], dtype=np.int32)
    entry_record = mx.build_entries(source, [r.epochs for r in recs.rules])
    perm = mx.exponential_order(src_prio[source[entry_record]], ctx.config.seed)
    order = entry_record[perm]
    if len(order) == 0:
        raise ValueError("every source has epochs 0: nothing to train on")
    ctx.lap("order")
    return Order(order, src_is_pretrain, src_lang_id)


def _pack(ctx: Build, tok: Tokens, order: Order) -> Rows:
    """Pack the entries next-fit in order and write the rows as train/ (moved into --out by ``_publish``), with the
    rows' digest in train/step2_rows.json (mixture.json records it too: step 3 checks that the two belong together)."""
    lengths = tok.rec["length"][order.order]
    bounds = plan_rows(lengths, ctx.config.max_seq_len)
    hasher = hashlib.sha256()
    train = ctx.stage / "train"
    shards = write_rows(tok.table, order.order, bounds, order.src_lang_id[tok.rec["source"]], train, hasher=hasher)
    digest = hasher.hexdigest()
    write_dataset_metadata(train, shards, fingerprint=digest[:32])
    write_json(train / ROWS_MARKER, {"format_version": STEP2_FORMAT_VERSION, "rows_sha256": digest})
    ctx.lap("pack + write rows")
    return Rows(lengths, bounds, digest)


def _remove_stale(out: Path) -> None:
    """Scratch folders of an earlier run of step 2 that was killed (this run holds --out's lock: none is in use)."""
    for stale in [*out.glob(f"{TMP_PREFIX}*"), out / ".train.partial"]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _publish(stage: Path, out: Path, previous: Path) -> None:
    """Move the new outputs into --out as one unit. The earlier run's mixture.json goes first and the new one comes
    last: in between, --out holds no complete run (a kill -9 there leaves train/ without its mixture.json, which
    step 3 refuses). Ctrl-C waits until every file is in place. The earlier run's files go to ``previous`` (removed
    with the scratch folder), so no stale file of it stays beside the new ones (a train_leaks.jsonl, say)."""
    previous.mkdir()
    with cli.ctrl_c_deferred():
        (out / MIXTURE_FILE).unlink(missing_ok=True)
        for name in OUTPUTS:
            if (out / name).exists():
                os.replace(out / name, previous / name)
            if (stage / name).exists():
                os.replace(stage / name, out / name)
            if name == "train" and os.environ.get(STOP_IN_PUBLISH_ENV):
                _stop_in_publish(os.environ[STOP_IN_PUBLISH_ENV])


def _stop_in_publish(how: str) -> None:
    import signal

    print(f"[step 2] {STOP_IN_PUBLISH_ENV}={how}: stopping while the outputs are moved into place", flush=True)
    if how == "crash":
        os._exit(17)
    signal.raise_signal(signal.SIGINT)  # as if Ctrl-C were pressed now


def _by_source(recs: Records, tok: Tokens, order: Order) -> dict:
    """Per-source counts of records, entries, tokens, loss tokens and truncations, and their mean position."""
    rec, truncated, n_src = tok.rec, tok.truncated, len(recs.read.sources)
    entry_source = rec["source"][order.order]
    copies = np.bincount(order.order, minlength=len(rec["length"]))  # entries per record
    n_entries = len(order.order)
    pos = np.arange(n_entries, dtype=np.float64) / max(n_entries - 1, 1)
    mean_pos = _counts(entry_source, pos, n_src) / np.maximum(_counts(entry_source, None, n_src), 1)
    per_src = {
        "records": _counts(rec["source"], rec["piece"] == 0, n_src),
        "pieces": _counts(rec["source"], None, n_src),
        "split_records": _counts(rec["source"], rec["piece"] == 1, n_src),
        "entries": _counts(rec["source"], copies, n_src),
        "tokens": _counts(rec["source"], copies * rec["length"], n_src),
        "loss_tokens": _counts(rec["source"], copies * rec["loss"], n_src),
        "truncated_records": _counts(rec["source"], truncated, n_src),
        "truncated_entries": _counts(rec["source"], copies * truncated, n_src),
        "entries_without_loss": _counts(rec["source"], copies * (rec["loss"] == 0), n_src),
    }
    by_source = {}
    for s in sorted(range(n_src), key=lambda i: recs.read.sources[i]):
        category, lang, qa = recs.parsed[s]
        rule = recs.rules[s]
        by_source[recs.read.sources[s]] = {
            "category": category, "language": lang, "family": family_id(lang), "kind": recs.kinds[s],
            "pretrain_qa": qa,
            "rule": rule.pattern, "priority": rule.priority, "epochs": rule.epochs,
            **{k: int(v[s]) for k, v in per_src.items()},
            "mean_position": round(float(mean_pos[s]), 4) if per_src["entries"][s] else None,
        }
    return by_source


def _totals(recs: Records, tok: Tokens, order: Order, rows: Rows, max_len: int) -> dict:
    read, rec, truncated = recs.read, tok.rec, tok.truncated
    copies = np.bincount(order.order, minlength=len(rec["length"]))
    n_entries, n_rows = len(order.order), rows.n_rows
    tot_tokens = int(rows.lengths.sum())
    row_tokens = np.add.reduceat(rows.lengths, rows.bounds[:-1])
    return {
        "records_read": sum(read.read_per_file),
        "records": read.records,
        "rejected": len(read.rejects),
        "leaked": len(read.leaks),
        "entries": n_entries,
        "rows": n_rows,
        "tokens": tot_tokens,
        "loss_tokens": int(rec["loss"][order.order].sum()),
        "truncated_records": int(truncated.sum()),
        "truncated_entries": int(copies[truncated].sum()),
        "split_records": int((rec["piece"] == 1).sum()),
        "pieces": len(rec["piece"]),
        "truncated_tokens_dropped": int(((rec["full_length"] - rec["length"]) * copies).sum()),
        "entries_without_loss": int(copies[rec["loss"] == 0].sum()),
        "boundary_splits": int(rec["split"].sum()),
        "packing_efficiency": round(tot_tokens / (n_rows * max_len), 4),
        "mean_row_tokens": round(tot_tokens / n_rows, 1),
        "max_row_tokens": int(row_tokens.max()),
        "mean_documents_per_row": round(n_entries / n_rows, 2),
    }


def _report(ctx: Build, recs: Records, tok: Tokens, order: Order, rows: Rows) -> dict:
    """mixture.json: what went in, how it was ordered and packed, and what was left out."""
    config, read, tokenizer = ctx.config, recs.read, ctx.tokenizer
    by_source = _by_source(recs, tok, order)
    return {
        "format_version": STEP2_FORMAT_VERSION,
        "settings": normalised(config.settings()),
        "inputs": [{"file": str(i.path), "kind": i.kind, "records_read": n}
                   for i, n in zip(ctx.config.inputs, read.read_per_file)],
        "model": repo_relative(config.model),
        "tokenizer": {"fingerprint": tokenizer_fingerprint(tokenizer), "size": len(tokenizer)},
        "chat_format": ctx.fmt.to_dict(),
        "stop_token_id": ctx.fmt.stop_token(tokenizer),
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "max_seq_len": ctx.config.max_seq_len,
        "seed": config.seed,
        "language_ids": config.language_ids,
        "num_language_ids": len(families()) if config.language_ids == "family" else len(languages()),
        "pad_language_id": PAD_LANGUAGE_ID,
        "ignore_index": IGNORE_INDEX,
        "columns": ROW_SCHEMA.names,
        "rows_sha256": rows.digest,
        "order": "every epoch copy is an entry; entries sorted by Exp(1)/priority (float64 keys, numpy PCG64 seeded "
                 "by seed, stable argsort); packed next-fit in that order; rows stored in training order, unpadded, "
                 "position_ids restart per document",
        "priority_table": {"default": str(mx.DEFAULT_PRIORITIES.relative_to(ROOT)),
                           "override": str(config.priorities) if config.priorities else None,
                           "rules": [{k: v for k, v in r.items() if k != "origin"} | {"from": repo_relative(r["origin"])}
                                     for r in ctx.table.to_list()],
                           "unused_patterns": ctx.table.unused(read.sources)},
        "totals": _totals(recs, tok, order, rows, ctx.config.max_seq_len),
        "by_source": by_source,
        "by_language": _group(by_source, "language", {"family": family_id, "language_id": language_id}),
        "by_family": {str(k): {"name": families()[k], **v}
                      for k, v in sorted(_group(by_source, "family", {}).items())},
        "by_class": _group({k: {**v, "class": CLASS_OF_KIND[v["kind"]]} for k, v in by_source.items()},
                           "class", {}, mean_position=True),
        "rejects": {"count": len(read.rejects), "file": "train_rejects.jsonl",
                    "by_field": _tally(r["field"] for r in read.rejects),
                    "by_reason": _tally(r["reason"].split(":")[0] for r in read.rejects)},
        "truncated_examples": tok.truncated_examples,
        "decontamination": _decontamination(recs.screen, read.leaks),
        "curriculum": mx.curriculum(rows.lengths, order.src_is_pretrain[tok.rec["source"][order.order]]),
    }


def _write_report(ctx: Build, recs: Records, report: dict, order: Order, rows: Rows) -> None:
    """mixture.json, train_rejects.jsonl, train_leaks.jsonl (with a screen) and curriculum.png, into the stage."""
    out, by_source = ctx.stage, report["by_source"]
    write_json(out / MIXTURE_FILE, report)
    write_jsonl(out / "train_rejects.jsonl", recs.read.rejects)
    if recs.screen is not None:
        write_jsonl(out / "train_leaks.jsonl", recs.read.leaks)
    kinds = [k for k in CLASS_LABELS if any(v["kind"] == k for v in by_source.values())]
    classes = "; ".join(
        f"{CLASS_LABELS[k]}: " + ", ".join(sorted({f"priority {v['priority']:g}, {v['epochs']:g} epoch(s)"
                                                   for v in by_source.values() if v["kind"] == k}))
        for k in kinds)
    tot_tokens = report["totals"]["tokens"]
    pretrain_share = sum(report["by_class"].get(CLASS_OF_KIND[k], {}).get("tokens", 0) for k in ("text", "qa"))
    label = "pretrain-QA (*_qa)" if "text" not in kinds else \
        "raw text (*_text)" if "qa" not in kinds else "pretraining (*_text, *_qa)"
    with writing(out / "curriculum.png"):
        mx.plot_curriculum(report["curriculum"], out / "curriculum.png",
                           f"Token share over training: seed {ctx.config.seed}, {len(order.order)} entries, "
                           f"{tot_tokens:,} tokens\n{classes}", overall_qa_share=pretrain_share / tot_tokens,
                           label=label)


def _require_loss_tokens(rec: dict, truncated: np.ndarray, max_len: int) -> None:
    """Rows without a single loss token train on nothing (loss 0.0): refuse them, and say why they are empty."""
    if int(rec["loss"].sum()) > 0:
        return
    lost = int((truncated & (rec["loss"] == 0)).sum())
    reason = (f"{lost} of {len(rec['loss'])} records lost all their answer tokens to truncation at --max-seq-len "
              f"{max_len} (their prompts alone fill it: raise --max-seq-len)")
    if lost < len(rec["loss"]):
        reason += f"; {len(rec['loss']) - lost} records have no answer tokens at all"
    raise ValueError(f"no training row has a loss token: {reason}")


def _decontamination(screen, leaks: list[dict]) -> dict | None:
    """What --decontaminate-against removed (None without it), as scripts/decontaminate.sh reports it."""
    if screen is None:
        return None
    return {**screen.settings(), "removed": len(leaks), "file": "train_leaks.jsonl",
            "removed_by_source": _tally(leak["source"] for leak in leaks),
            "removed_by_bench_source": _tally(leak["bench_source"] for leak in leaks)}


def _tally(values) -> dict:
    return dict(sorted(Counter(str(v) for v in values).items()))


def _group(by_source: dict, key: str, extra: dict, mean_position: bool = False) -> dict:
    fields = ["records", "entries", "tokens", "loss_tokens", "truncated_entries"]
    out: dict = {}
    for v in by_source.values():
        g = out.setdefault(v[key], {**{name: f(v[key]) for name, f in extra.items()}, "sources": 0,
                                    **{f: 0 for f in fields}})
        g["sources"] += 1
        for f in fields:
            g[f] += v[f]
        if mean_position and v["mean_position"] is not None:
            g["_pos"] = g.get("_pos", 0.0) + v["mean_position"] * v["entries"]
    for g in out.values():
        if mean_position:
            g["mean_position"] = round(g.pop("_pos", 0.0) / g["entries"], 4) if g["entries"] else None
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def _print_summary(report: dict, out: Path, timings: dict) -> None:
    t = report["totals"]
    print(f"[step 2] format={report['chat_format']['name']} max_seq_len={report['max_seq_len']} "
          f"seed={report['seed']} language_ids={report['language_ids']} -> {out}")
    print(f"  records: read {t['records_read']}, kept {t['records']}, rejected {t['rejected']}"
          + (f" (see {out / 'train_rejects.jsonl'})" if t["rejected"] else "")
          + (f", leaked {t['leaked']} (see {out / 'train_leaks.jsonl'})" if report["decontamination"] else ""))
    print(f"  entries {t['entries']} -> rows {t['rows']}: {t['tokens']} tokens ({t['loss_tokens']} with loss), "
          f"packing efficiency {t['packing_efficiency']:.1%}, {t['mean_documents_per_row']} documents/row")
    print(f"  truncated: {t['truncated_records']} records ({t['truncated_entries']} entries, "
          f"{t['truncated_tokens_dropped']} tokens dropped); entries without loss tokens: {t['entries_without_loss']}")
    if t["split_records"]:
        print(f"  split: {t['split_records']} text documents longer than {report['max_seq_len']} tokens, cut into "
              f"pieces ({t['pieces']} pieces in all, none dropped)")
    for name, c in report["by_class"].items():
        print(f"  {name}: {c['entries']} entries, {c['tokens']} tokens, mean position {c['mean_position']}")
    if report["priority_table"]["unused_patterns"]:
        print(f"  note: priority rules matching no source: {', '.join(report['priority_table']['unused_patterns'])}")
    print("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total")
          + f"; done in {timings['total']:.1f}s")


def main(argv: list[str] | None = None) -> int:
    """Errors are raised; ``cli.run`` (below) turns them into one line and an exit code, as for every step."""
    run(TrainDataConfig.from_args(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
