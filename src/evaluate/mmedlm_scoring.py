"""score.json and score.md of an MMedBench run: per-language accuracy, the mean of six, rationale similarity.

* **Accuracy** per language: right / items, an item right when its letters equal the gold set (``--parsing robust``,
  the default) or by MMedLM's string rule (``--parsing reference``); both are always reported, the flag picks the
  headline. 95% Wilson intervals.
* **Mean of six**: the unweighted mean of the language accuracies, MMedLM's "Avg." column (its interval: a normal
  approximation over the languages' Agresti-Coull variances, as step 4's XMedBench averages). Languages with no
  items are listed as missing.
* **Rationale similarity** (with-rationale prompts only), on the items whose rationale a doctor checked and passed
  (``human_check_passed``; MMedLM's protocol, though its script filters nothing itself): per language the mean of
  BLEU and ROUGE over those items (``--rationale-metric``, src/evaluate/rationale.py), then the unweighted mean of
  the languages. The candidate rationale is the robust one, or MMedLM's with ``--rationale-metric reference``.
"""
from __future__ import annotations

import math
from collections import Counter

from src.evaluate import mmedlm, rationale
from src.evaluate.scoring import CI_METHOD, mean_component, proportion_variance, wilson
from src.prepare.mmedbench import LANGUAGES

NAMES = {code: name for name, code in LANGUAGES.items()}


def _accuracy(right: int, total: int) -> dict:
    return {"right": right, "total": total, "accuracy": right / total, "ci95": list(wilson(right, total)),
            "var": proportion_variance(right, total)}


def _candidate(pred: dict, mode: str) -> str:
    if mode == "reference":
        return mmedlm.reference_rationale(mmedlm.reference_response(pred.get("raw", ""), pred.get("stop")))
    return pred.get("rationale") or ""


def _rationale_scores(pairs: list[tuple[dict, dict]], mode: str, progress: bool) -> tuple[dict, dict]:
    """Per language: the mean of each metric over the eligible items; and the counts of items left out."""
    from tqdm import tqdm

    names = rationale.METRICS[mode]
    sums: dict = {}
    left_out = Counter()
    for rec, pred in tqdm(pairs, desc="rationale similarity", unit="item", disable=not progress, leave=False):
        if not rec["human_check_passed"]:
            left_out["not_passed_by_a_doctor"] += 1
            continue
        if not any(rec["rationale"].strip().split(".")):
            left_out["empty_gold_rationale"] += 1
            continue
        got = rationale.similarity(rec["rationale"].strip(), _candidate(pred, mode), rec["language"], mode)
        acc = sums.setdefault(rec["language"], {"items": 0, "empty_candidates": 0, **{m: [] for m in names}})
        acc["items"] += 1
        acc["empty_candidates"] += got["empty"]
        for m in names:
            acc[m].append(got[m])
    return {lang: {"items": a["items"], "empty_candidates": a["empty_candidates"],
                   **{m: _mean_ci(a[m]) for m in names}} for lang, a in sums.items()}, dict(left_out)


def _mean_ci(values: list[float]) -> dict:
    """Mean and a normal-approximation 95% interval over items."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    half = 1.959963984540054 * sd / math.sqrt(n)
    return {"mean": round(mean, 6), "ci95": [round(max(0.0, mean - half), 6), round(min(1.0, mean + half), 6)]}


def score(preds: list[dict], records: list[dict], parsing: str = "robust", rationale_metric: str = "readme",
          progress: bool = False) -> dict:
    """The content of score.json from the predictions of step 1 MMedBench ``records`` (matched by id)."""
    by_id = {p["id"]: p for p in preds}
    pairs = [(r, by_id[r["id"]]) for r in records if r["id"] in by_id]
    key = "correct" if parsing == "robust" else "reference_correct"
    languages = {}
    for code in LANGUAGES.values():
        mine = [(r, p) for r, p in pairs if r["language"] == code]
        if not mine:
            continue
        entry = _accuracy(sum(bool(p.get(key)) for _, p in mine), len(mine))
        entry.update(name=NAMES[code],
                     robust=round(sum(bool(p.get("correct")) for _, p in mine) / len(mine), 6),
                     reference=round(sum(bool(p.get("reference_correct")) for _, p in mine) / len(mine), 6),
                     no_answer=sum(not p.get("letter") for _, p in mine),
                     several_answers=sum(len(r["answers"]) > 1 for r, _ in mine))
        languages[code] = entry
    result = {"benchmark": "mmedbench", "items": len(pairs), "parsing": parsing,
              "mean_of_six": _mean_of_six(languages), "languages": languages,
              "rules": dict(sorted(Counter(p.get("rule") or "none" for _, p in pairs).items())),
              "stops": dict(sorted(Counter(p.get("stop") or "none" for _, p in pairs).items())),
              "ci_method": CI_METHOD}
    with_rationale = [(r, p) for r, p in pairs if r["with_rationale"]]
    result["rationale"] = _rationale_section(with_rationale, rationale_metric, progress)
    for e in languages.values():
        e.pop("var")
        e["accuracy"] = round(e["accuracy"], 6)
        e["ci95"] = [round(x, 6) for x in e["ci95"]]
    return result


def _mean_of_six(languages: dict) -> dict | None:
    if not languages:
        return None
    est = mean_component(list(languages.values()))
    k = len(languages)
    return {"accuracy": round(est["accuracy"], 6), "ci95": [round(x, 6) for x in est["ci95"]],
            "robust": round(sum(e["robust"] for e in languages.values()) / k, 6),
            "reference": round(sum(e["reference"] for e in languages.values()) / k, 6),
            "languages": list(languages), "missing": [c for c in LANGUAGES.values() if c not in languages]}


def _rationale_section(pairs: list[tuple[dict, dict]], mode: str, progress: bool) -> dict | None:
    """None for answer-only prompts (no rationale was asked for)."""
    if not pairs:
        return None
    per_lang, left_out = _rationale_scores(pairs, mode, progress)
    names = rationale.METRICS[mode]
    average = {m: round(sum(e[m]["mean"] for e in per_lang.values()) / len(per_lang), 6) if per_lang else None
               for m in names}
    return {"metric": mode, "metrics": {m: rationale.LABELS[m] for m in names},
            "items_scored": sum(e["items"] for e in per_lang.values()), "left_out": left_out,
            "languages": {c: per_lang[c] for c in LANGUAGES.values() if c in per_lang},
            "average": {**average, "languages": [c for c in LANGUAGES.values() if c in per_lang]}}


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def format_table(result: dict) -> str:
    """score.json as markdown: one row per language, then the mean of six (MMedLM's table: percentages)."""
    rat = result.get("rationale")
    names = list(rat["metrics"]) if rat else []
    head = ["language", "items", "right", f"accuracy % ({result['parsing']})", "95% CI", "robust %",
            "reference rule %", "no answer"] + ([f"{rat['metrics'][m]} %" for m in names] + ["rationales"]
                                                 if rat else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for code, e in result["languages"].items():
        row = [f"{e['name']} ({code})", str(e["total"]), str(e["right"]), _pct(e["accuracy"]),
               f"[{_pct(e['ci95'][0])}, {_pct(e['ci95'][1])}]", _pct(e["robust"]), _pct(e["reference"]),
               str(e["no_answer"])]
        if rat:
            r = rat["languages"].get(code)
            row += [_pct(r[m]["mean"]) if r else "-" for m in names] + [str(r["items"]) if r else "0"]
        lines.append("| " + " | ".join(row) + " |")
    m6 = result.get("mean_of_six")
    if m6:
        row = ["**mean of six**" + (f" (missing: {', '.join(m6['missing'])})" if m6["missing"] else ""), "", "",
               _pct(m6["accuracy"]), f"[{_pct(m6['ci95'][0])}, {_pct(m6['ci95'][1])}]", _pct(m6["robust"]),
               _pct(m6["reference"]), ""]
        if rat:
            row += [_pct(rat["average"][m]) for m in names] + [str(rat["items_scored"])]
        lines.append("| " + " | ".join(row) + " |")
    notes = [f"answer rules: {', '.join(f'{k} {v}' for k, v in result['rules'].items())}",
             f"generation stops: {', '.join(f'{k} {v}' for k, v in result['stops'].items())}"]
    if rat:
        empty = sum(e["empty_candidates"] for e in rat["languages"].values())
        notes.append(f"rationale similarity ({rat['metric']}) on doctor-passed rationales; left out: "
                     + (", ".join(f"{k} {v}" for k, v in rat["left_out"].items()) or "none")
                     + f"; empty model rationales (scored 0): {empty}")
    else:
        notes.append("no rationale similarity: the prompts asked for the answer only")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"
