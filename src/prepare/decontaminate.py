"""Remove training records that leak benchmark questions (``scripts/decontaminate.sh``; docs/decontamination.md).

A record is leaked when one of its turns (questions and answers alike), after normalisation, contains a bench item's
whole question or shares at least ``--min-chars`` (64) consecutive characters with one (the Apollo paper's rule).
The matching is exact (src/prepare/leak_index.py). Inputs are streamed record by record; batches of records are
screened in ``--num-proc`` worker processes and written back in input order, so the outputs are the same whatever
the number of processes.

Writes into --out: one file per input with the kept records (same name and format: release list, extracted dict or
JSON Lines), ``leaks.jsonl`` (one line per removed record) and ``report.json`` (read, kept and removed per file and
per source, the settings).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from src.common.defaults import ROOT, SAMPLE_DIR
from src.common.errors import UsageError
from src.common.io import dumps, write_json, write_jsonl
from src.prepare.bench_items import iter_questions
from src.prepare.leak_index import MIN_CHARS, BenchIndex, normalise
from src.prepare.config import DECONTAMINATED_SAMPLE, SAMPLE_TRAIN, DecontaminateConfig
from src.prepare.records import Input, parsed_elements

BATCH_CHARS = 2_000_000  # characters screened per numpy pass: large enough to amortise, small enough for memory
QUESTION_START = 80  # characters of the bench question quoted in leaks.jsonl
NORMALISATION = ("whitespace runs (any Unicode whitespace) collapsed to one space, ends stripped, NUL to space; "
                 "case kept unless --fold-case (str.casefold)")


@dataclass
class Bench:
    """The unique normalised questions of the bench files, each with the first item that has it."""
    files: list[str]
    items: int
    questions: list[str]
    origin: list[dict]  # per question: bench_source, bench_file, bench_index, the question's start


def bench_questions(paths: list[Path], fold_case: bool = False) -> Bench:
    """The bench files' unique normalised questions (read through src/prepare/bench_items.py's checks)."""
    seen: dict[str, int] = {}
    questions, origin, items = [], [], 0
    for path in paths:
        for i, source, question in iter_questions(path):
            items += 1
            q = normalise(question, fold_case)
            if not q or q in seen:
                continue
            seen[q] = len(questions)
            questions.append(q)
            origin.append({"bench_source": source, "bench_file": str(path), "bench_index": i,
                           "bench_question": question[:QUESTION_START]})
    return Bench([str(p) for p in paths], items, questions, origin)


class Screen:
    """Checks batches of records (lists of turns) against a bench; used here and by step 2's --decontaminate-against."""

    def __init__(self, bench: Bench, min_chars: int = MIN_CHARS, fold_case: bool = False,
                 min_question_chars: int = 1):
        self.bench, self.min_chars, self.fold_case = bench, min_chars, fold_case
        self.min_question_chars = min_question_chars
        self.index = BenchIndex(bench.questions, min_chars, min_question_chars)

    def check(self, records: list[list[str]]) -> list[dict | None]:
        """Per record: None when clean, else the first leak (turn, rule, span and the bench item it came from)."""
        texts, owner = [], []
        for r, turns in enumerate(records):
            for j, turn in enumerate(turns):
                texts.append(normalise(turn, self.fold_case))
                owner.append((r, j))
        out: list[dict | None] = [None] * len(records)
        for t, leak in self.index.scan(texts).items():
            r, j = owner[t]
            if out[r] is None:  # scan returns texts in order, so this is the record's first leaking turn
                out[r] = {"turn": j, "rule": leak.rule, "span": leak.span, **self.bench.origin[leak.item]}
        return out

    def settings(self) -> dict:
        return {"min_chars": self.min_chars, "min_question_chars": self.min_question_chars,
                "fold_case": self.fold_case, "normalisation": NORMALISATION,
                "bench_files": self.bench.files, "bench_items": self.bench.items,
                "unique_questions": len(self.bench.questions), "questions_ge_min_chars": self.index.n_long,
                "questions_lt_min_chars": self.index.n_short}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/decontaminate.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, action="append", default=None,
                   help="bench items (a JSON list; repeatable); default: the sample's bench_test.json and "
                        "bench_dev.json in data/raw/sample/")
    p.add_argument("--data", type=Path, action="append", default=None,
                   help="training records (repeatable); default: data/raw/sample/train.json. As in step 2, a file "
                        "named <category>_<lang>_text.json/.jsonl/.txt, or any .txt, is raw text")
    p.add_argument("--text", action="append", default=None, metavar="[SOURCE=]FILE",
                   help="raw pretraining text (repeatable), as step 2's --text: a JSON list of strings, JSON Lines "
                        "or .txt documents separated by blank lines; kept documents are written in the same format")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: {DECONTAMINATED_SAMPLE.relative_to(ROOT)})")
    p.add_argument("--min-chars", type=int, default=MIN_CHARS,
                   help="shared consecutive characters that make a leak (default: %(default)s, the paper's)")
    p.add_argument("--min-question-chars", type=int, default=1,
                   help="questions shorter than this are not matched whole (default: %(default)s, the paper's rule: "
                        "every question; the 64-character rule is unaffected)")
    p.add_argument("--fold-case", action="store_true", help="compare case-insensitively (default: case kept)")
    p.add_argument("--num-proc", type=int, default=1, help="screening processes (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    return p


_WORKER: Screen | None = None  # the screen of a forked worker (inherited, not pickled)


def _work(batch: list[list[str]]) -> list[dict | None]:
    return _WORKER.check(batch)


@dataclass
class Counts:
    read: int = 0
    kept: int = 0
    removed: int = 0
    by_source: dict = field(default_factory=dict)

    def add(self, source: str, leaked: bool) -> None:
        s = self.by_source.setdefault(source, {"read": 0, "kept": 0, "removed": 0})
        self.read += 1
        self.removed += leaked
        self.kept += not leaked
        s["read"] += 1
        s["removed" if leaked else "kept"] += 1


class RecordWriter:
    """Writes kept records in their input file's format: JSON list, dict of lists, or JSON Lines (atomic rename)."""

    def __init__(self, path: Path, jsonl: bool, txt: bool = False):
        self.path, self.jsonl, self.txt = path, jsonl, txt
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.f = self.tmp.open("w", encoding="utf-8", newline="\n")
        self.key: str | None = None
        self.count = self.in_key = 0

    def write(self, key: str | None, raw) -> None:
        if self.txt:  # plain text: documents separated by a blank line, as they were read
            self.f.write(("\n\n" if self.count else "") + raw)
        elif self.jsonl:
            self.f.write(dumps(raw) + "\n")
        elif key is None:
            self.f.write(("[\n" if not self.count else ",\n") + dumps(raw))
        else:
            if key != self.key:  # the dict format's keys arrive one after the other
                self.f.write(("{\n" if self.key is None else "\n],\n") + dumps(key) + ": [\n")
                self.key, self.in_key = key, 0
            self.f.write((",\n" if self.in_key else "") + dumps(raw))
            self.in_key += 1
        self.count += 1

    def close(self, dict_format: bool) -> None:
        if self.txt:
            self.f.write("\n" if self.count else "")
        elif self.jsonl:
            pass
        elif self.key is not None:
            self.f.write("\n]\n}\n")
        elif self.count:
            self.f.write("\n]\n")
        else:  # nothing kept (or an empty input): an empty container of the input's kind
            self.f.write("{}\n" if dict_format else "[]\n")
        self.f.close()
        self.tmp.replace(self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def _is_dict_file(path: Path) -> bool:
    with path.open(encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    return head.startswith("{")


def _batches(inp: Input):
    """(index, key, raw, source, turns) of every record (or text document: one turn) of a file, grouped into
    batches of about BATCH_CHARS."""
    batch, chars = [], 0
    for index, key, raw, source, turns, _, error in parsed_elements(inp):
        if error is not None:  # a malformed record is an error here (nothing is dropped silently)
            raise error
        batch.append((index, key, raw, source, turns))
        chars += sum(len(t) for t in turns)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def screen_file(inp: Input, out_path: Path, screen: Screen, pool, leaks: list, bar, in_flight: int = 0) -> Counts:
    """Screen one file into ``out_path``; batches go to the pool (at most a few in flight) and come back in order."""
    counts = Counts()
    path = inp.path
    dict_format = path.suffix not in (".jsonl", ".txt") and _is_dict_file(path)
    writer = RecordWriter(out_path, jsonl=path.suffix == ".jsonl", txt=path.suffix == ".txt")
    pending: deque = deque()

    def drain(limit: int) -> None:
        while len(pending) > limit:
            batch, result = pending.popleft()
            for (index, key, raw, source, _), leak in zip(batch, result.get() if pool else result):
                counts.add(source, leak is not None)
                if leak is None:
                    writer.write(key, raw)
                else:
                    leaks.append({"file": str(path), "index": index, "source": source, **leak})
            bar.update(len(batch))

    try:
        for batch in _batches(inp):
            turns = [b[4] for b in batch]
            pending.append((batch, pool.apply_async(_work, (turns,)) if pool else screen.check(turns)))
            drain(in_flight)  # bounded: a few batches in memory whatever the file size
        drain(0)
    except BaseException:
        writer.abort()
        raise
    writer.close(dict_format)
    return counts


def _check_paths(config: DecontaminateConfig) -> None:
    """Refuse, before anything is written: a missing embedded sample, input names that would collide in --out, an
    --out that would overwrite an input or an earlier run (without --overwrite), a missing input file."""
    if config.sample and not SAMPLE_TRAIN.is_file():
        raise FileNotFoundError(f"{SAMPLE_DIR}: the embedded sample is not there yet; run ./0.download_data.sh "
                                f"first or pass --bench and --data")
    names = [inp.path.name for inp in config.inputs]
    if len(set(names)) < len(names) or {"leaks.jsonl", "report.json"} & set(names):
        raise ValueError(f"--data/--text file names must be distinct and not leaks.jsonl/report.json: {names}")
    out = config.out
    for inp in config.inputs:  # the screened copy of an input in --out would replace the input itself
        if (out / inp.path.name).resolve() == inp.path.resolve():
            raise UsageError("--out", f"{out} holds the input {inp.path}: its screened copy would replace it; "
                                      f"choose another --out")
    if not config.overwrite and any((out / n).exists() for n in names + ["report.json", "leaks.jsonl"]):
        raise FileExistsError(f"{out} already holds the outputs of a run; pass --overwrite or another --out")


def run(config: DecontaminateConfig) -> dict:
    global _WORKER
    from tqdm import tqdm

    t0 = time.time()
    _check_paths(config)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    for inp in config.inputs:
        if not inp.path.is_file():
            raise FileNotFoundError(f"{inp.path}: file not found")

    bench = bench_questions(config.bench, config.fold_case)
    screen = _WORKER = Screen(bench, config.min_chars, config.fold_case, config.min_question_chars)
    t_index = time.time() - t0
    leaks: list[dict] = []
    per_file = []
    # fork: the workers inherit the index (hundreds of MB for the real bench) instead of pickling it
    pool = mp.get_context("fork").Pool(config.num_proc) if config.num_proc > 1 else None
    try:
        with tqdm(desc="screening", unit="record", disable=None) as bar:
            for inp in config.inputs:
                per_file.append((inp.path, screen_file(inp, out / inp.path.name, screen, pool, leaks, bar,
                                                       2 * config.num_proc if pool else 0)))
    finally:
        if pool:
            pool.close()
            pool.join()
    report = _report(screen, per_file, leaks)
    write_jsonl(out / "leaks.jsonl", leaks)
    write_json(out / "report.json", report)
    _print_summary(report, out, t_index, time.time() - t0)
    return report


def _report(screen: Screen, per_file: list, leaks: list) -> dict:
    by_source: dict = {}
    for _, c in per_file:
        for s, v in c.by_source.items():
            agg = by_source.setdefault(s, {"read": 0, "kept": 0, "removed": 0})
            for k in agg:
                agg[k] += v[k]
    by_bench: dict = {}
    by_rule: dict = {}
    for leak in leaks:
        by_bench[leak["bench_source"]] = by_bench.get(leak["bench_source"], 0) + 1
        by_rule[leak["rule"]] = by_rule.get(leak["rule"], 0) + 1
    read = sum(c.read for _, c in per_file)
    removed = sum(c.removed for _, c in per_file)
    return {
        "format_version": 1,
        "settings": screen.settings(),
        "inputs": [{"file": str(p), "read": c.read, "kept": c.kept, "removed": c.removed} for p, c in per_file],
        "totals": {"read": read, "kept": read - removed, "removed": removed,
                   "removed_share": round(removed / read, 6) if read else 0.0},
        "removed_by_rule": dict(sorted(by_rule.items())),
        "by_source": {s: v | {"removed_share": round(v["removed"] / v["read"], 6)}
                      for s, v in sorted(by_source.items())},
        "removed_by_bench_source": dict(sorted(by_bench.items())),
        "leaks_file": "leaks.jsonl",
    }


def _print_summary(report: dict, out: Path, t_index: float, total: float) -> None:
    s, t = report["settings"], report["totals"]
    print(f"[decontaminate] {s['bench_items']} bench items ({s['unique_questions']} unique questions) from "
          f"{len(s['bench_files'])} file(s), min_chars {s['min_chars']}, fold_case {s['fold_case']} -> {out}")
    print(f"  read {t['read']} records, kept {t['kept']}, removed {t['removed']} ({t['removed_share']:.2%}) "
          f"by rule {report['removed_by_rule'] or '{}'}; skipped none (a malformed record is an error)")
    for src, v in report["by_source"].items():
        if v["removed"]:
            print(f"  {src}: removed {v['removed']} of {v['read']}")
    print(f"  time: index {t_index:.1f}s; done in {total:.1f}s")


def main(argv: list[str] | None = None) -> int:
    """Errors are raised; ``cli.run`` (below) turns them into one line and an exit code, as for every step."""
    run(DecontaminateConfig.from_args(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
