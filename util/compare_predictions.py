"""Do two step 4 runs extract the same letters? Used by scripts/moe_pipeline.sh to check that the stock export of a
Post-MoE checkpoint scores exactly like the project's own folder.

    python -m util.compare_predictions results/a/predictions.jsonl results/b/predictions.jsonl

Compares the extracted letter of every item id (both files must hold the same ids); prints how many items were
read, how many letters match and the first differing ids; exits 1 on any difference.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.common.errors import BadFile, DataError
from src.common.io import iter_jsonl

SHOWN = 5  # differing ids listed in the report


def letters(path: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n, pred in enumerate(iter_jsonl(path)):
        for field in ("id", "letter"):
            if field not in pred:
                raise DataError(path, n, field, "missing")
        if pred["id"] in out:
            raise DataError(path, n, "id", f"{pred['id']!r} appears twice")
        out[pred["id"]] = pred["letter"]
    if not out:
        raise BadFile(path, "no predictions: the file is empty (step 4 writes one per line)")
    return out


def compare(a: Path, b: Path) -> list[str]:
    """Report lines; the last one starts with OK or DIFFERENT."""
    first, second = letters(a), letters(b)
    only = sorted(first.keys() ^ second.keys())
    differ = sorted(i for i in first.keys() & second.keys() if first[i] != second[i])
    lines = [f"[compare] read {len(first)} predictions from {a} and {len(second)} from {b}"]
    if only:
        lines.append(f"[compare] {len(only)} ids are in one file only, e.g. {only[:SHOWN]}")
    for i in differ[:SHOWN]:
        lines.append(f"[compare] {i}: {first[i]!r} vs {second[i]!r}")
    same = len(first.keys() & second.keys()) - len(differ)
    verdict = "OK" if not only and not differ else "DIFFERENT"
    lines.append(f"{verdict}: {same} identical letters, {len(differ)} different, {len(only)} unmatched ids")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m util.compare_predictions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    lines = compare(args.first, args.second)
    print("\n".join(lines))
    return 0 if lines[-1].startswith("OK") else 1


if __name__ == "__main__":
    import sys

    from src.common import cli

    sys.exit(cli.run(main))
