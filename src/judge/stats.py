"""The numbers of a judged comparison, from per-pair outcomes (one pair = one question, one model against the
baseline): the score ratio with a bootstrap interval, win/tie/lose with both win rates, and the position-bias counts.

* ratio = mean model score / mean baseline score x 100 over the pairs the judge rated (LLMZoo's "%model", the sum of
  the model's scores over the sum of the baseline's); 95% percentile bootstrap interval from resampling those pairs
  with replacement, seeded;
* llmzoo_share = wins / all pairs judged, ties and unreadable judgments included in the denominator (LLMZoo's
  ``%model`` of its winning table); beat_rate = wins / (wins + losses), ties and unreadable ones left out;
* disagreement_rate = the share of pairs judged in both orders whose two verdicts differ (such pairs count as ties).
"""
from __future__ import annotations

import zlib

import numpy as np

LEVEL = 0.95
VERDICTS = ("win", "tie", "lose")


def verdict(model_value: float, baseline_value: float) -> str:
    """The model's outcome against the baseline from two scores (higher is better; ranks come as 10 / rank)."""
    if model_value == baseline_value:
        return "tie"
    return "win" if model_value > baseline_value else "lose"


def combine_orders(verdicts: list[str]) -> tuple[str, bool | None]:
    """One verdict from the verdicts of the orders a pair was judged in, and whether they agreed (None for one order).
    Orders that disagree (win and lose, or a win or loss and a tie) make a tie: the judge's preference then depends
    on where the answers were shown, not on what they say."""
    if len(verdicts) == 1:
        return verdicts[0], None
    if len(set(verdicts)) == 1:
        return verdicts[0], True
    return "tie", False


def ratio(model: list[float], baseline: list[float]) -> float | None:
    total = float(np.sum(baseline)) if baseline else 0.0
    return 100.0 * float(np.sum(model)) / total if total else None


def bootstrap_interval(model: list[float], baseline: list[float], resamples: int, seed: int,
                       stream: str = "") -> list[float] | None:
    """The 95% percentile interval of ``ratio`` over ``resamples`` resamples of the pairs. ``stream`` (the group's
    name) picks an independent seeded stream per group, so a group's interval does not depend on the others."""
    if not model or resamples <= 0:
        return None
    m, b = np.asarray(model, dtype=float), np.asarray(baseline, dtype=float)
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode())])
    picks = rng.integers(0, len(m), size=(resamples, len(m)))
    sums = b[picks].sum(axis=1)
    ratios = 100.0 * m[picks].sum(axis=1)[sums > 0] / sums[sums > 0]
    if not len(ratios):
        return None
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return [round(float(low), 4), round(float(high), 4)]


def win_rates(wins: int, ties: int, losses: int, unreadable: int) -> dict:
    judged = wins + ties + losses + unreadable
    return {"llmzoo_share": wins / judged if judged else None,
            "beat_rate": wins / (wins + losses) if wins + losses else None}


def summarise(pairs: list[dict], resamples: int, seed: int, stream: str = "") -> dict:
    """The numbers of one group of pairs (as built by verdicts.build_pairs)."""
    done = [p for p in pairs if p["status"] == "judged"]
    unreadable = sum(p["status"] == "unreadable" for p in pairs)
    counts = {v: sum(p["verdict"] == v for p in done) for v in VERDICTS}
    both = [p for p in done if p["consistent"] is not None]
    inconsistent = sum(not p["consistent"] for p in both)
    model = [p["model_value"] for p in done]
    baseline = [p["baseline_value"] for p in done]
    return {
        "pairs": len(pairs), "judged": len(done), "unreadable": unreadable,
        "missing": sum(p["status"] == "missing" for p in pairs),
        "wins": counts["win"], "ties": counts["tie"], "losses": counts["lose"],
        **win_rates(counts["win"], counts["tie"], counts["lose"], unreadable),
        "inconsistent": inconsistent if both else None,
        "disagreement_rate": inconsistent / len(both) if both else None,
        "mean_model": float(np.mean(model)) if model else None,
        "mean_baseline": float(np.mean(baseline)) if baseline else None,
        "ratio": ratio(model, baseline),
        "ratio_ci": bootstrap_interval(model, baseline, resamples, seed, stream),
        **position_counts(pairs),
    }


def position_counts(pairs: list[dict]) -> dict:
    """Over every readable judgment: how often the answer shown first won, the one shown second won, or neither. With
    answers of equal quality an unbiased judge favours both places equally."""
    shown = [o for p in pairs for o in p["orders"].values() if o.get("winner_position") is not None]
    return {"first_shown_wins": sum(o["winner_position"] == 1 for o in shown),
            "second_shown_wins": sum(o["winner_position"] == 2 for o in shown),
            "position_ties": sum(o["winner_position"] == 0 for o in shown)}
