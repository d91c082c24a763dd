"""Decontamination speed and memory: our exact index vs the plain method, in the same run, in one process (one core).

The plain method (the baseline, timed): a Python set of every 64-character window of the normalised bench questions,
each training text looked up window by window. It does not check the whole-question rule for questions shorter than
64 characters (ours does); for the agreement check it is completed with ``in`` for those questions (very slow).
Speeds are MB of UTF-8 training text per second of CPU time of this process (per core: the machine may be shared),
wall seconds beside them.

Corpora: the real training slice (../shared/data/xmedbench/dataset_train.json; scanned twice by ours, the second
pass reported as its speed and the first, with the one-time costs, as ``ours_first_pass``) and a synthetic corpus of
``--synthetic-mb`` MB (random words taken from the real slice, with a piece of a bench question in about 1% of the
texts), generated batch by batch so it never sits in memory. The baseline runs on the real slice and on the first
``--baseline-mb`` MB of the synthetic corpus (it is slow), and both methods must find the same leaking texts there.
MB are megabytes of UTF-8 training text; memory is the growth of the resident set while building each index.

    python bench/decontaminate_speed.py                          # the issue's figures: 1 GB synthetic
    python bench/decontaminate_speed.py --synthetic-mb 5 --baseline-mb 2 --agree-mb 0.5   # a quick check that it runs
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.common.io import iter_json_array  # noqa: E402
from src.prepare.decontaminate import BATCH_CHARS, bench_questions  # noqa: E402
from src.prepare.leak_index import MIN_CHARS, BenchIndex, normalise  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class Baseline:
    def __init__(self, questions: list[str], m: int):
        self.m = m
        self.windows = {q[i:i + m] for q in questions if len(q) >= m for i in range(len(q) - m + 1)}
        self.short = [q for q in questions if len(q) < m]

    def window_leaks(self, texts: list[str]) -> set[int]:
        m, w = self.m, self.windows
        return {t for t, x in enumerate(texts) if any(x[i:i + m] in w for i in range(len(x) - m + 1))}

    def leaks(self, texts: list[str]) -> set[int]:
        """The full rule: the windows, and every short question by ``in``."""
        return self.window_leaks(texts) | {t for t, x in enumerate(texts) if any(q in x for q in self.short)}


def batches_of(texts: list[str]):
    batch, chars = [], 0
    for t in texts:
        batch.append(t)
        chars += len(t)
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def synthetic(vocab: list[str], questions: list[str], total_mb: float, seed: int = 0):
    """Batches of normalised texts (about 1.5 kB each) until total_mb MB of UTF-8 have been produced."""
    rng = random.Random(seed)
    done, target = 0, total_mb * 1e6
    while done < target:
        batch, chars = [], 0
        while chars < BATCH_CHARS and done < target:
            text = " ".join(rng.choices(vocab, k=220))
            if rng.random() < 0.01:
                q = rng.choice(questions)
                i = rng.randrange(max(1, len(q) - 80))
                text = text[:700] + " " + q[i:i + 80] + " " + text[700:]
            batch.append(text)
            chars += len(text)
            done += len(text.encode())
        yield batch


def timed_scan(method, batches) -> dict:
    mb, cpu, wall, found, texts = 0.0, 0.0, 0.0, 0, 0
    for batch in batches:
        mb += sum(len(x.encode()) for x in batch) / 1e6
        c0, w0 = time.process_time(), time.perf_counter()
        found += len(method(batch))
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        texts += len(batch)
    return {"mb": round(mb, 2), "cpu_seconds": round(cpu, 2), "wall_seconds": round(wall, 2),
            "mb_per_cpu_s": round(mb / cpu, 2) if cpu else None, "texts": texts, "leaking_texts": found}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data" / "xmedbench")
    p.add_argument("--synthetic-mb", type=float, default=1000)
    p.add_argument("--baseline-mb", type=float, default=50, help="synthetic MB the (slow) baseline scans")
    p.add_argument("--agree-mb", type=float, default=2, help="synthetic MB checked against the full plain rule")
    p.add_argument("--min-chars", type=int, default=MIN_CHARS)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args()

    bench = bench_questions([args.shared / "bench_test.json", args.shared / "bench_dev.json"])
    real = [normalise(t["value"]) for r in iter_json_array(args.shared / "dataset_train.json")
            for t in r["conversations"]]
    vocab = sorted({w for t in real[::7] for w in t.split()})
    res: dict = {"bench_items": bench.items, "unique_questions": len(bench.questions), "min_chars": args.min_chars}

    before, t0 = rss_mb(), time.perf_counter()
    ours = BenchIndex(bench.questions, args.min_chars)
    res["ours_index"] = {"seconds": round(time.perf_counter() - t0, 2), "rss_growth_mb": round(rss_mb() - before),
                         "array_mb": round(ours.nbytes() / 2**20)}
    before, t0 = rss_mb(), time.perf_counter()
    base = Baseline(bench.questions, args.min_chars)
    res["baseline_index"] = {"seconds": round(time.perf_counter() - t0, 2), "rss_growth_mb": round(rss_mb() - before)}

    def scan(batch):
        return set(ours.scan(batch))

    # The real slice is small (8 MB): its first pass also pays the one-time costs (the power tables grown to the
    # longest batch, fresh memory), which a 13.5 GB run spreads thin; the second pass is the steady speed.
    first = timed_scan(scan, batches_of(real))
    res["real_slice"] = {"ours": timed_scan(scan, batches_of(real)), "ours_first_pass": first,
                         "baseline_windows_only": timed_scan(base.window_leaks, batches_of(real))}
    res["synthetic"] = {
        "ours": timed_scan(scan, synthetic(vocab, bench.questions, args.synthetic_mb)),
        "baseline_windows_only": timed_scan(base.window_leaks, synthetic(vocab, bench.questions, args.baseline_mb))}
    # exactness: the same leaking texts as the full plain rule, on a small synthetic sample
    res["same_leaks_as_full_plain_rule"] = all(
        scan(b) == base.leaks(b) for b in synthetic(vocab, bench.questions, args.agree_mb, seed=1))
    for name in ("real_slice", "synthetic"):
        o, b = res[name]["ours"]["mb_per_cpu_s"], res[name]["baseline_windows_only"]["mb_per_cpu_s"]
        res[name]["speedup"] = round(o / b, 1) if o and b else None
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
