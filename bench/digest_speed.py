"""What the weight digests cost: sha256 of a weight file as step 3 computes it at save and every loader before loading.

    python bench/digest_speed.py [--gib 1] [--dir /tmp] [--rounds 3]
    python bench/digest_speed.py --gib 0.05 --rounds 1                # a seconds-long smoke run

Writes a file of ``--gib`` GiB of random bytes into ``--dir`` (removed afterwards) and times ``io.file_sha256`` on it:
first right after writing (the bytes are in the page cache, as at save time and for a checkpoint read again soon),
then after asking the kernel to drop the file's cached pages (``posix_fadvise DONTNEED``; as for a checkpoint read
for the first time; the disk's own cache may still help). Prints seconds per GiB for both, the median of
``--rounds``. docs/reliability.md's figure is to come from this script, run on an idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_random(path: Path, size: int, chunk: int = 64 << 20) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def timed_hash(path: Path) -> float:
    from src.common.io import file_sha256

    t0 = time.perf_counter()
    file_sha256(path)
    return time.perf_counter() - t0


def drop_cache(path: Path) -> None:
    with path.open("rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="file size in GiB (default 1)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the file is written")
    p.add_argument("--rounds", type=int, default=3, help="timings per case; the median is printed")
    args = p.parse_args(argv)
    size = max(1, int(args.gib * (1 << 30)))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "weights.bin"
        write_random(path, size)
        cached = [timed_hash(path) for _ in range(args.rounds)]
        cold = []
        for _ in range(args.rounds):
            drop_cache(path)
            cold.append(timed_hash(path))
    gib = size / (1 << 30)
    for name, times in (("page cache", cached), ("after dropping the cache", cold)):
        print(f"sha256, {name}: {statistics.median(times) / gib:.2f} s per GiB ({gib:.2f} GiB, median of "
              f"{len(times)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
