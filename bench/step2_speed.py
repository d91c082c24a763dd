"""Step 2 benchmark: tokenize + order + pack throughput and peak memory, and the ordering alone at 50M entries.

    python bench/step2_speed.py                      # 10k and 100k synthetic records x 1 and 2 processes, 50M order
    python bench/step2_speed.py --records 2000 --order-entries 1000000   # a quick look

Each measurement runs in a fresh subprocess. Memory is sampled every 50 ms over the process tree (the step and its
--num-proc workers) as PSS, so pages shared with forked workers count once: peak PSS (all resident pages, including
the memory-mapped Arrow files the step reads and writes, which the kernel can drop at will) and peak anonymous PSS
(memory the processes own); plus the kernel's exact peak RSS of the main process (ru_maxrss, file pages included).
Throughput = tokens written in rows / wall time of the whole step
(reading, tokenizing, ordering, packing, saving, report; tokenizer loading included).

Synthetic records: list format, 40% pretrain-QA sources (1 epoch) and 60% SFT sources (2 epochs) over 8 languages,
questions of 5-30 words and answers of 15-100 words (random words in Latin, CJK and Cyrillic script), one record in
five with a second exchange: about 430 tokens per entry with SmolLM2's tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.common.defaults import DEFAULT_MODEL  # noqa: E402

QA_SOURCES = ["medicalWiki_en_qa", "medicalWeb_zh_qa", "medicalBook_ru_qa", "medicalPaper_fr_qa"]
SFT_SOURCES = ["general_en", "medicalExam_es", "medicalPatient_zh", "general_ar", "general_sw", "medicalExam_ko"]


def _words(rnd: random.Random, n: int) -> list[str]:
    latin = "abcdefghijklmnopqrstuvwxyzéè"
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 2000)]
    cyr = [chr(c) for c in range(0x430, 0x450)]
    words = []
    for i in range(n):
        kind = i % 10
        if kind < 7:
            words.append("".join(rnd.choice(latin) for _ in range(rnd.randint(2, 10))))
        elif kind < 9:
            words.append("".join(rnd.choice(cjk) for _ in range(rnd.randint(1, 3))))
        else:
            words.append("".join(rnd.choice(cyr) for _ in range(rnd.randint(3, 9))))
    return words


def make_records(n: int, path: Path, seed: int = 0) -> Path:
    if path.is_file():
        return path
    rnd = random.Random(seed)
    vocab = _words(rnd, 5000)

    def text(lo, hi):
        return " ".join(rnd.choices(vocab, k=rnd.randint(lo, hi))) + rnd.choice([".", "?", "!"])

    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            source = rnd.choice(QA_SOURCES) if rnd.random() < 0.4 else rnd.choice(SFT_SOURCES)
            turns = [text(5, 30), text(15, 100)]
            if rnd.random() < 0.2:
                turns += [text(5, 20), text(10, 60)]
            rec = {"conversations": [{"from": "human" if j % 2 == 0 else "gpt", "value": t}
                                     for j, t in enumerate(turns)], "source": source, "class": "major"}
            f.write(("," if i else "") + json.dumps(rec, ensure_ascii=False))
        f.write("]")
    tmp.rename(path)
    return path


class MemorySampler(threading.Thread):
    """Peak memory of this process and all its descendants (the --num-proc workers), sampled.

    Sums PSS (proportional set size: a page shared by k processes counts 1/k in each, so forked workers are not
    double counted) over the tree: ``pss`` = all resident pages, ``anon`` = anonymous pages only (memory the
    processes own, as opposed to memory-mapped file pages, which the kernel can drop and re-read at will).
    """

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.peak_pss = self.peak_anon = 0
        self.stop = threading.Event()

    @staticmethod
    def _rollup(pid: int) -> tuple[int, int]:
        pss = anon = 0
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
                    elif line.startswith("Pss_Anon:"):
                        anon = int(line.split()[1]) * 1024
        except OSError:
            pass
        return pss, anon

    def sample(self):
        pids = [self.proc.pid]
        try:
            pids += [c.pid for c in self.proc.children(recursive=True)]
        except Exception:  # noqa: BLE001 (a child may vanish while listed)
            pass
        pss = anon = 0
        for pid in pids:
            p, a = self._rollup(pid)
            pss, anon = pss + p, anon + a
        self.peak_pss, self.peak_anon = max(self.peak_pss, pss), max(self.peak_anon, anon)

    def run(self):
        while not self.stop.is_set():
            self.sample()
            time.sleep(self.interval)


def _maxrss_mib(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def child_step2(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()
    from src.prepare import train_data

    sampler = MemorySampler()
    sampler.start()
    argv = ["--data", args.data, "--model", args.model, "--out", args.out, "--num-proc", str(args.num_proc),
            "--max-seq-len", str(args.max_seq_len)]
    t0 = time.time()
    report = train_data.run(train_data.TrainDataConfig.from_args(train_data.build_parser().parse_args(argv)))
    wall = time.time() - t0
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    t = report["totals"]
    return {"records": t["records"], "entries": t["entries"], "rows": t["rows"], "tokens": t["tokens"],
            "wall_s": round(wall, 2), "tokens_per_s": round(t["tokens"] / wall),
            "phases_s": {k: round(v, 2) for k, v in report["_timings"].items()},
            "peak_pss_mib": round(sampler.peak_pss / 2**20, 1), "peak_anon_mib": round(sampler.peak_anon / 2**20, 1),
            "main_maxrss_mib": round(_maxrss_mib(resource.RUSAGE_SELF), 1),
            "worker_maxrss_mib": round(_maxrss_mib(resource.RUSAGE_CHILDREN), 1)}


def child_order(args) -> dict:
    import numpy as np

    from src.prepare import mixture as mx

    sampler = MemorySampler()
    sampler.start()
    # records so that 40% pretrain-QA (1 epoch) + 60% SFT (2 epochs) give the wanted number of entries
    n_rec = int(args.entries / 1.6)
    rng = np.random.default_rng(0)
    record_source = (rng.random(n_rec) >= 0.4).astype(np.int32)  # source 0 = QA, 1 = SFT
    base = _maxrss_mib(resource.RUSAGE_SELF)
    t0 = time.time()
    entry_record = mx.build_entries(record_source, [1, 2])
    t1 = time.time()
    weights = np.array([16, 2], dtype=np.float32)[record_source[entry_record]]
    perm = mx.exponential_order(weights, 42)
    order = entry_record[perm]
    t2 = time.time()
    sampler.sample()
    order_peak = sampler.peak_pss
    del perm, weights, entry_record
    lengths = rng.integers(50, 1500, size=len(order)).astype(np.int32)
    t3 = time.time()
    from src.prepare.packing import plan_rows

    bounds = plan_rows(lengths, 4096)
    t4 = time.time()
    sampler.stop.set()
    sampler.join()
    return {"entries": int(len(order)), "build_entries_s": round(t1 - t0, 2), "order_s": round(t2 - t1, 2),
            "order_total_s": round(t2 - t0, 2), "plan_rows_s": round(t4 - t3, 2), "rows": int(len(bounds) - 1),
            "inputs_mib": round(base, 1), "order_peak_pss_mib": round(order_peak / 2**20, 1),
            "peak_pss_mib": round(sampler.peak_pss / 2**20, 1),
            "main_maxrss_mib": round(_maxrss_mib(resource.RUSAGE_SELF), 1)}


def spawn(kind: str, **kw) -> dict:
    cmd = [sys.executable, __file__, f"--child-{kind}"] + [x for k, v in kw.items() for x in (f"--{k}", str(v))]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.stderr.write(res.stdout[-3000:] + res.stderr[-5000:])
        raise SystemExit(f"benchmark child failed: {' '.join(cmd)}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--order-entries", type=int, default=50_000_000, help="0 skips the ordering benchmark")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--max-seq-len", type=int, default=4096)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "step2_bench")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    # internal: one measurement in this (fresh) process
    p.add_argument("--child-step2", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-order", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--entries", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_step2:
        args.num_proc = args.num_proc[0]
        print(json.dumps(child_step2(args)))
        return 0
    if args.child_order:
        print(json.dumps(child_order(args)))
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{os.cpu_count()} cores", "step2": [], "order": None}
    print(f"step 2 benchmark on {os.cpu_count()} cores; max_seq_len {args.max_seq_len}; model {args.model}")
    print(f"{'records':>8} {'procs':>5} {'entries':>8} {'tokens':>11} {'wall s':>7} {'tokens/s':>9} "
          f"{'tokenize s':>10} {'peak PSS':>9} {'peak anon':>9} {'main maxrss':>11}  (MiB)")
    for n in args.records:
        data = make_records(n, args.workdir / f"records_{n}.json")
        for procs in args.num_proc:
            r = spawn("step2", data=data, out=args.workdir / f"out_{n}_{procs}", model=args.model,
                      **{"num-proc": procs, "max-seq-len": args.max_seq_len})
            r |= {"records_in": n, "num_proc": procs}
            results["step2"].append(r)
            print(f"{n:>8} {procs:>5} {r['entries']:>8} {r['tokens']:>11,} {r['wall_s']:>7} {r['tokens_per_s']:>9,} "
                  f"{r['phases_s']['tokenize']:>10} {r['peak_pss_mib']:>9} {r['peak_anon_mib']:>9} "
                  f"{r['main_maxrss_mib']:>11}", flush=True)
    if len(args.records) >= 2:
        lo, hi = min(args.records), max(args.records)
        for procs in args.num_proc:
            a = next(r for r in results["step2"] if r["records_in"] == lo and r["num_proc"] == procs)
            b = next(r for r in results["step2"] if r["records_in"] == hi and r["num_proc"] == procs)
            ratios = {k: round(b[k] / a[k], 2) for k in ("peak_pss_mib", "peak_anon_mib", "main_maxrss_mib")}
            results.setdefault("memory_ratio", {})[f"{hi}/{lo} records, {procs} proc"] = ratios
            print(f"peak memory {hi} / {lo} records, {procs} proc: PSS x{ratios['peak_pss_mib']}, "
                  f"anon x{ratios['peak_anon_mib']}, main maxrss x{ratios['main_maxrss_mib']} (target < 2)")
    if args.order_entries:
        r = spawn("order", entries=args.order_entries)
        results["order"] = r
        print(f"ordering {r['entries']:,} entries: build entries {r['build_entries_s']} s + exponential keys and "
              f"argsort {r['order_s']} s = {r['order_total_s']} s (target < 60 s), "
              f"peak PSS {r['order_peak_pss_mib']} MiB "
              f"(inputs {r['inputs_mib']} MiB); then the next-fit row plan: {r['plan_rows_s']} s for {r['rows']:,} "
              f"rows, peak PSS {r['peak_pss_mib']} MiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
