"""Results across runs: several step 4 result folders -> one table (markdown and CSV) and a bar chart (PNG).

    python -m util.collect_results results/run_a results/run_b [--names A B] [--out results/summary]

Each folder holds a ``score.json`` written by step 4. The table has one row per run and the paper's columns: the major
average, the minor average, the 12 major languages in the paper's order (ar, de, en, es, fr, hi, it, ja, ko, pt, ru,
zh), then every minor language any run has. Cells are accuracy in %; "-" where a run has no items of that language.
The chart shows per-language accuracy with the runs side by side and their 95% intervals as error bars.
Writes OUT.md, OUT.csv and OUT.png.

``--exclude-source NAME`` (repeatable) recomputes every run's scores without those sources, as step 4's flag of the
same name does: from the folder's ``predictions.jsonl`` when it has one, else from the per-source counts in its
``score.json`` (the run folders themselves are not changed). By default every source counts, as in the reference's
collector.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from src.common.io import iter_jsonl, read_json
from src.common.languages import major_languages, minor_languages
from src.evaluate.scoring import score as score_predictions


def load_scores(dirs: list[Path], exclude_sources=()) -> list[dict]:
    out = []
    for d in dirs:
        path = d / "score.json" if d.is_dir() else d
        if not path.is_file():
            raise SystemExit(f"{path}: no score.json (run 4.eval.sh with --out {d})")
        score = read_json(path)
        if not isinstance(score, dict) or "languages" not in score:
            raise SystemExit(f"{path}: not a step 4 score.json (no 'languages')")
        if score.get("benchmark") == "mmedbench":
            raise SystemExit(f"{path}: an MMedBench score (its score.md is the table, docs/mmedbench.md); this tool "
                             f"compares XMedBench runs")
        if exclude_sources:
            score = rescore(path, score, exclude_sources)
        out.append(score)
    return out


def rescore(path: Path, score: dict, exclude_sources) -> dict:
    """The run's scores without ``exclude_sources``: from its predictions.jsonl, else from score.json's counts (one
    stand-in prediction per item; the accuracies and intervals are the same, rule statistics are not kept)."""
    preds_file = path.parent / "predictions.jsonl"
    if preds_file.is_file():
        # Step 4 writes the items it scored first (in input order), then any other items an earlier run of the
        # folder predicted (a larger --limit): keep the ones score.json counted.
        n = score["items"] + sum((score.get("excluded_sources") or {}).values())
        return score_predictions(list(iter_jsonl(preds_file))[:n], exclude_sources)
    preds = []
    for src, e in score["sources"].items():
        preds += [{"id": None, "source": src, "language": e["language"], "correct": k < e["right"], "letter": "A"}
                  for k in range(e["total"])]
    return score_predictions(preds, exclude_sources)


def columns(scores: list[dict]) -> list[str]:
    present = set().union(*(s["languages"].keys() for s in scores)) if scores else set()
    minor = [lg for lg in minor_languages() if lg in present]
    return major_languages() + minor


def table_rows(names: list[str], scores: list[dict]) -> tuple[list[str], list[list[str]]]:
    langs = columns(scores)
    header = ["model", "major", "minor"] + langs
    rows = []
    for name, s in zip(names, scores):
        row = [name]
        for key in ("major_average", "minor_average"):
            e = s.get(key)
            row.append("-" if not e else f"{100 * e['accuracy']:.1f}")
        for lg in langs:
            e = s["languages"].get(lg)
            row.append("-" if e is None else f"{100 * e['accuracy']:.1f}")
        rows.append(row)
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(names: list[str], scores: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = [lg for lg in columns(scores) if any(lg in s["languages"] for s in scores)]
    n = max(1, len(names))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(langs) * max(1, n / 2) + 2), 4.5))
    for k, (name, s) in enumerate(zip(names, scores)):
        xs, ys, lo, hi = [], [], [], []
        for j, lg in enumerate(langs):
            e = s["languages"].get(lg)
            if e is None:
                continue
            xs.append(j + (k - (n - 1) / 2) * width)
            ys.append(100 * e["accuracy"])
            lo.append(100 * (e["accuracy"] - e["ci95"][0]))
            hi.append(100 * (e["ci95"][1] - e["accuracy"]))
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=name)
    ax.set_xticks(range(len(langs)))
    ax.set_xticklabels(langs)
    ax.set_ylabel("accuracy % (95% CI)")
    ax.set_ylim(0, 100)
    ax.set_title("XMedBench accuracy per language")
    ax.grid(axis="y", alpha=0.3)
    if n > 1 or names:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m util.collect_results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, help="step 4 result folders (or score.json files)")
    p.add_argument("--names", nargs="+", default=None, help="one label per folder (default: folder names)")
    p.add_argument("--out", type=Path, default=Path("results/summary"), help="output prefix (default %(default)s)")
    p.add_argument("--exclude-source", action="append", default=[], metavar="NAME",
                   help="recompute every run without this source (repeatable)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    names = args.names or [d.name if d.is_dir() else d.parent.name for d in args.dirs]
    if len(names) != len(args.dirs):
        raise SystemExit("--names needs one label per folder")
    scores = load_scores(args.dirs, args.exclude_source)
    header, rows = table_rows(names, scores)
    md = to_markdown(header, rows)
    if args.exclude_source:
        md += f"\nSources left out of every number: {', '.join(args.exclude_source)}.\n"
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    with out.with_suffix(".csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    plot(names, scores, out.with_suffix(".png"))
    print(md, end="")
    print(f"-> {out.with_suffix('.md')}, {out.with_suffix('.csv')}, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
