"""The results of one mode: ``results.json`` (every number, per model, overall, per language and per label, and every
unreadable judgment with its reason), ``results.md`` (the same as tables) and ``pairs.jsonl`` (one line per question
and model: each order's parsed values and verdict, the pair's outcome)."""
from __future__ import annotations

from pathlib import Path

from src.common.io import write_json, write_jsonl, write_text
from src.judge.stats import summarise

REPLY_SHOWN = 160  # characters of an unreadable reply quoted in results.md


def group_numbers(pairs: list[dict], resamples: int, seed: int, model: str) -> dict:
    """Overall, per language and per label (in the order they first appear)."""
    def by(field: str) -> dict:
        names = list(dict.fromkeys(p[field] for p in pairs))
        return {name: summarise([p for p in pairs if p[field] == name], resamples, seed, f"{model}/{field}/{name}")
                for name in names}

    return {"overall": summarise(pairs, resamples, seed, model), "languages": by("language"), "labels": by("label")}


def unreadable(pairs: list[dict], rows: dict) -> list[dict]:
    out = []
    for p in pairs:
        for order, outcome in p["orders"].items():
            if outcome.get("failure"):
                reply = rows[(p["key"], p["model"], order)]["reply"]
                out.append({"key": p["key"], "model": p["model"], "order": order, "reason": outcome["failure"],
                            "reply_start": reply[:REPLY_SHOWN]})
    return out


def write_results(mode_dir: Path, meta: dict, pairs: list[dict], rows: dict, resamples: int, seed: int) -> dict:
    models = list(dict.fromkeys(p["model"] for p in pairs))
    results = {**meta, "models": {m: group_numbers([p for p in pairs if p["model"] == m], resamples, seed, m)
                                  for m in models},
               "unreadable": unreadable(pairs, rows)}
    write_json(mode_dir / "results.json", results)
    write_text(mode_dir / "results.md", markdown(results))
    write_jsonl(mode_dir / "pairs.jsonl", pairs)
    return results


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


COLUMNS = ("group | pairs | judged | unreadable | missing | mean model | mean baseline | ratio % | 95% CI | win | tie "
           "| lose | LLMZoo share | wins/(wins+losses) | disagreement")


def _row(name: str, n: dict) -> str:
    ci = "–" if n["ratio_ci"] is None else f"{n['ratio_ci'][0]:.1f}-{n['ratio_ci'][1]:.1f}"
    cells = [name, n["pairs"], n["judged"], n["unreadable"], n["missing"], _num(n["mean_model"], 2),
             _num(n["mean_baseline"], 2), _num(n["ratio"]), ci, n["wins"], n["ties"], n["losses"],
             _pct(n["llmzoo_share"]), _pct(n["beat_rate"]), _pct(n["disagreement_rate"])]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Judged open answers: {s['mode']} mode", "",
             f"Judge {s['judge'] or '(the server default)'}, prompt {s['prompt']}, parser {s['parser']}, "
             f"orders {', '.join(s['orders'])}; baseline {s['baseline']}; {results['counts']['questions']} questions "
             f"({', '.join(results['languages'])}).", "",
             "Complete." if results["complete"] else
             f"**Incomplete**: {results['counts']['missing_judgments']} judgments not made yet (request budget); "
             f"rerun to continue.", "", _answers_line(results["counts"]), ""]
    for model, groups in results["models"].items():
        overall = groups["overall"]
        lines += [f"## {model} against {s['baseline']}", "", f"| {COLUMNS} |",
                  "|" + "---|" * (COLUMNS.count("|") + 1), _row("all", overall)]
        lines += [_row(f"language {k}", v) for k, v in groups["languages"].items()]
        lines += [_row(f"label {k}", v) for k, v in groups["labels"].items()]
        lines += ["", f"Readable judgments won by the answer shown first: {overall['first_shown_wins']}, by the one "
                      f"shown second: {overall['second_shown_wins']}, ties: {overall['position_ties']}.", ""]
    bad = results["unreadable"]
    lines += [f"## Unreadable judgments: {len(bad)}", ""]
    if bad:
        lines += ["| question | model | order | reason | reply starts |", "|---|---|---|---|---|"]
        lines += [f"| {b['key']} | {b['model']} | {b['order']} | {_cell(b['reason'])} | {_cell(b['reply_start'])} |"
                  for b in bad]
    return "\n".join(lines) + "\n"


def _answers_line(counts: dict) -> str:
    models = "; ".join(f"{m} {n['answers']} ({n['empty']} empty, {n['cut_at_max_new_tokens']} cut at "
                       f"--max-new-tokens)" for m, n in counts["answers_per_model"].items())
    left_out = left_out_text(counts["skipped_questions"])
    return f"Answers: {models}." + (f" Questions left out: {left_out}." if counts["skipped_questions"] else "")


def left_out_text(skipped: dict) -> str:
    """'55 over --limit, 5 label math (--skip-label)', or 'none'."""
    return ", ".join(f"{n} {why}" for why, n in skipped.items()) or "none"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")
