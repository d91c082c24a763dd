"""Scores from predictions: per source, per language (docs/reference.md, "Scores"), major and minor averages, 95% intervals.

How each number is made:

* A **source** is scored by its pooled counts: accuracy = right / total.
* A **language** follows the original collector (docs/reference.md, "Scores"; ``src.common.languages.score_method``): 'macro' languages (en, zh and the
  single-source ones) take the unweighted mean of their source accuracies; 'micro' languages (de, fr, it, pt) pool the
  counts of their sources. A language with one source gets exactly that source's accuracy either way.
* The **major average** is the unweighted mean of the major languages present (the paper's "Major"/"Avg." column when
  all 12 are present); the **minor average** the mean of the minor languages present.
* Every source present in the predictions is reported, also when nothing in it was answered correctly (the
  reference dropped such sources from score.json).
* By default every source counts, as in the reference's collector (en and zh: the mean of all four sources, pubmedqa,
  cmb-single and cmexam included, although the reference's README calls those three "not used in the paper").
  ``exclude_sources`` leaves sources out of every number; how many predictions each removed is reported.

95% confidence intervals (they describe the sampling noise of the test items only; sources and languages are taken
as fixed, not sampled):

* pooled proportions (a source, a 'micro' language): the Wilson score interval;
* means of proportions (a 'macro' language with several sources, the major and minor averages): a normal
  approximation, mean +/- 1.96 * sqrt(sum_i var_i) / k, where each of the k components contributes the variance of
  its own estimate; a pooled proportion's variance is the Agresti-Coull one, p~(1-p~)/(n+z^2) with
  p~ = (x+z^2/2)/(n+z^2), so a 0% or 100% component does not claim zero variance. Intervals are clipped to [0, 1].
* A language with a single source (or a mean over one language) reuses its component's interval unchanged.
"""
from __future__ import annotations

import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from src.common.languages import is_major, major_languages, score_method, source_language

Z = 1.959963984540054  # two-sided 95%

CI_METHOD = ("pooled proportions (sources, micro languages): Wilson score interval; means (macro languages, "
             "major/minor averages): normal approximation, mean +/- 1.96*sqrt(sum of component variances)/k with "
             "Agresti-Coull variances for pooled components; item sampling noise only, clipped to [0,1]")


def wilson(right: int, total: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval of right/total (0..1). (0, 1) when total is 0."""
    if total <= 0:
        return (0.0, 1.0)
    p = right / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion_variance(right: int, total: int, z: float = Z) -> float:
    """Agresti-Coull variance of a pooled proportion (never 0, also at 0% or 100%)."""
    n = total + z * z
    p = (right + z * z / 2) / n
    return p * (1 - p) / n


def mean_component(components: list[dict]) -> dict:
    """Unweighted mean of components, each {accuracy, var, ci95}; one component passes through unchanged."""
    k = len(components)
    if k == 1:
        c = components[0]
        return {"accuracy": c["accuracy"], "ci95": list(c["ci95"]), "var": c["var"]}
    mean = sum(c["accuracy"] for c in components) / k
    var = sum(c["var"] for c in components) / (k * k)
    half = Z * math.sqrt(var)
    return {"accuracy": mean, "ci95": [max(0.0, mean - half), min(1.0, mean + half)], "var": var}


def _round(x: float) -> float:
    return round(x, 6)


def _public(entry: dict) -> dict:
    out = {k: v for k, v in entry.items() if k != "var"}
    out["accuracy"] = _round(out["accuracy"])
    out["ci95"] = [_round(x) for x in out["ci95"]]
    return out


def score(predictions: list[dict], exclude_sources=()) -> dict:
    """The content of score.json from a list of predictions ({id, source, language, letter, rule, correct, ...}).

    Duplicate ids are counted once (the first); how many were dropped is reported. Predictions of the sources in
    ``exclude_sources`` are left out (the count per named source is reported, 0 for a name not present).
    """
    preds, excluded, duplicates = _kept(predictions, exclude_sources)
    t = _tally(preds)
    sources = _by_source(t)
    languages = _by_language(t, sources)
    major = [lg for lg in languages if languages[lg]["major"]]
    minor = [lg for lg in languages if not languages[lg]["major"]]
    n_items, n_right = sum(t.total.values()), sum(t.right.values())
    return {
        "items": n_items,
        "right": n_right,
        "accuracy_items": _round(n_right / n_items) if n_items else None,
        "major_average": _maybe_public(_average(languages, major, major_languages())),
        "minor_average": _maybe_public(_average(languages, minor, None)),
        "languages": {lg: _public(e) for lg, e in languages.items()},
        "sources": {s: _public(e) for s, e in sources.items()},
        "zero_correct_sources": [s for s in sources if t.right[s] == 0],
        "no_letter": {"total": sum(t.no_letter.values()), "by_source": {s: t.no_letter[s] for s in sources
                                                                       if t.no_letter[s]}},
        "rules": dict(sorted(t.rules.items())),
        "ties_broken": t.ties,
        "duplicates_dropped": duplicates,
        "excluded_sources": excluded,
        "ci_method": CI_METHOD,
        "language_method": "the original collector: macro = mean of source accuracies, micro = pooled counts",
    }


def _kept(predictions: list[dict], exclude_sources) -> tuple[list[dict], dict[str, int], int]:
    """The predictions that count (first of each id, excluded sources left out), the excluded counts per named
    source, and how many duplicates were dropped."""
    excluded = {name: 0 for name in exclude_sources}
    seen: set = set()
    preds = []
    for p in predictions:
        if p["source"] in excluded:
            excluded[p["source"]] += 1
            continue
        key = p.get("id")
        if key is not None and key in seen:
            continue
        seen.add(key)
        preds.append(p)
    return preds, excluded, len(predictions) - len(preds) - sum(excluded.values())


@dataclass
class _Tally:
    right: Counter = field(default_factory=Counter)
    total: Counter = field(default_factory=Counter)
    no_letter: Counter = field(default_factory=Counter)
    rules: Counter = field(default_factory=Counter)
    lang_of: dict = field(default_factory=dict)
    ties: int = 0


def _tally(preds: list[dict]) -> _Tally:
    t = _Tally()
    for p in preds:
        src = p["source"]
        lang = source_language(src, p.get("language"))
        if t.lang_of.setdefault(src, lang) != lang:
            raise ValueError(f"source {src!r} appears with two languages: {t.lang_of[src]!r} and {lang!r}")
        t.total[src] += 1
        t.right[src] += bool(p.get("correct"))
        t.rules[p.get("rule") or "none"] += 1
        t.ties += bool(p.get("tie"))
        t.no_letter[src] += p.get("letter") is None
    return t


def _by_source(t: _Tally) -> dict[str, dict]:
    sources: dict[str, dict] = OrderedDict()
    for src in sorted(t.total, key=lambda s: (_lang_rank(t.lang_of[s]), t.lang_of[s], s.lower())):
        r, n = t.right[src], t.total[src]
        sources[src] = {"language": t.lang_of[src], "right": r, "total": n, "accuracy": r / n,
                        "ci95": list(wilson(r, n)), "no_letter": t.no_letter[src], "var": proportion_variance(r, n)}
    return sources


def _by_language(t: _Tally, sources: dict[str, dict]) -> dict[str, dict]:
    """Each language's accuracy by its method: micro pools the counts, macro averages its sources."""
    languages: dict[str, dict] = OrderedDict()
    for lang in sorted(set(t.lang_of.values()), key=lambda lg: (_lang_rank(lg), lg)):
        srcs = [s for s in sources if t.lang_of[s] == lang]
        method = score_method(lang)
        r = sum(t.right[s] for s in srcs)
        n = sum(t.total[s] for s in srcs)
        if method == "micro" or len(srcs) == 1:
            est = {"accuracy": r / n, "ci95": list(wilson(r, n)), "var": proportion_variance(r, n)}
        else:
            est = mean_component([sources[s] for s in srcs])
        languages[lang] = {"method": method, "major": is_major(lang), "sources": srcs, "right": r, "total": n, **est}
    return languages


def _average(languages: dict[str, dict], langs: list[str], expected: list[str] | None) -> dict | None:
    if not langs:
        return None
    est = mean_component([languages[lg] for lg in langs])
    out = {"accuracy": est["accuracy"], "ci95": est["ci95"], "languages": langs, "n_languages": len(langs),
           "var": est["var"]}
    if expected is not None:
        out["missing"] = [lg for lg in expected if lg not in languages]
    return out


def _maybe_public(entry: dict | None) -> dict | None:
    return None if entry is None else _public(entry)


def _lang_rank(lang: str) -> int:
    order = major_languages()
    return order.index(lang) if lang in order else len(order)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(ci) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _cell(text) -> str:
    """A name as one markdown table cell or list item: a "|" would end the cell and a line break the row (score.json
    keeps the name as it is)."""
    return "<br>".join(str(text).replace("\\", "\\\\").replace("|", "\\|").splitlines())


def format_table(score: dict) -> str:
    """score.json as markdown: the averages, one row per language (paper order, then minor ones), one per source."""
    lines = ["| average | accuracy % | 95% CI | languages |", "|---|---:|---|---|"]
    for name in ("major_average", "minor_average"):
        e = score.get(name)
        if e:
            extra = f" (missing: {', '.join(e['missing'])})" if e.get("missing") else ""
            lines.append(f"| {name.split('_')[0]} | {_pct(e['accuracy'])} | {_ci(e['ci95'])} | "
                         f"{e['n_languages']}{extra} |")
    lines.append(f"| all items (pooled) | {_pct(score.get('accuracy_items'))} | | {score['items']} items |")
    lines += ["", "| language | method | sources | right/total | accuracy % | 95% CI |",
              "|---|---|---:|---:|---:|---|"]
    for lg, e in score["languages"].items():
        lines.append(f"| {_cell(lg)}{'' if e['major'] else ' (minor)'} | {e['method']} | {len(e['sources'])} | "
                     f"{e['right']}/{e['total']} | {_pct(e['accuracy'])} | {_ci(e['ci95'])} |")
    lines += ["", "| source | language | right/total | accuracy % | 95% CI | no letter |",
              "|---|---|---:|---:|---|---:|"]
    for s, e in score["sources"].items():
        lines.append(f"| {_cell(s)} | {_cell(e['language'])} | {e['right']}/{e['total']} | {_pct(e['accuracy'])} | "
                     f"{_ci(e['ci95'])} | {e['no_letter']} |")
    notes = []
    if score.get("zero_correct_sources"):
        notes.append(f"sources with zero correct: {', '.join(map(_cell, score['zero_correct_sources']))}")
    if score.get("rules"):
        notes.append("rules: " + ", ".join(f"{k} {v}" for k, v in score["rules"].items()))
    if score.get("ties_broken"):
        notes.append(f"ties broken by first vote: {score['ties_broken']}")
    if score.get("excluded_sources"):
        notes.append("excluded sources (predictions left out): "
                     + ", ".join(f"{_cell(k)} {v}" for k, v in score["excluded_sources"].items()))
    if score.get("duplicates_dropped"):
        notes.append(f"duplicate ids dropped: {score['duplicates_dropped']}")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
