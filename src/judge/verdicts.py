"""From the judge's replies to per-pair outcomes: one pair is one question answered by one model and by the baseline.

A pair is judged in one order (``--orders 1``: the baseline shown first, as LLMZoo always does) or in both
(``baseline-first`` and ``model-first``). Each readable reply gives the model a verdict against the baseline (win, tie,
lose) and a value for the ratio: its score in score mode, LLMZoo's rank score 10 / rank in order mode (1st = 10, 2nd =
5). The pair's status is ``judged`` when every order was read, ``unreadable`` when a reply could not be read (counted,
never dropped), ``missing`` when a judgment was not made yet (a spent request budget). Its value is the mean over its
orders, its verdict their common one, or a tie when they disagree (stats.combine_orders).
"""
from __future__ import annotations

from src.judge.parse import parse
from src.judge.questions import Question
from src.judge.stats import combine_orders, verdict

ORDERS = ("baseline-first", "model-first")
RANK_SCORE = 10.0  # LLMZoo's order-mode score: RANK_SCORE / rank


def shown(order: str, baseline_answer: str, model_answer: str) -> list[str]:
    """The answers in the order the judge sees them."""
    return [baseline_answer, model_answer] if order == ORDERS[0] else [model_answer, baseline_answer]


def read_reply(reply: str, order: str, mode: str, parser: str, role: str) -> dict:
    """One judgment's outcome for the model: its verdict and values, or why the reply could not be read."""
    parsed = parse(reply, mode, parser, 2, role)
    if parsed.values is None:
        return {"failure": parsed.failure}
    values = parsed.values
    b, m = (0, 1) if order == ORDERS[0] else (1, 0)
    scores = values if mode == "score" else [RANK_SCORE / v for v in values]
    first = verdict(scores[0], scores[1])  # the answer shown first, against the second
    return {"values": values, "verdict": verdict(scores[m], scores[b]), "model_value": scores[m],
            "baseline_value": scores[b], "winner_position": {"win": 1, "lose": 2, "tie": 0}[first], "failure": None}


def build_pair(question: Question, model: str, replies: dict[str, str | None], mode: str, parser: str,
               role: str) -> dict:
    """``replies``: order -> the judge's reply (None: not judged yet)."""
    orders = {o: ({"missing": True} if r is None else read_reply(r, o, mode, parser, role))
              for o, r in replies.items()}
    pair = {"key": question.key, "language": question.language, "label": question.label, "model": model,
            "status": "judged", "verdict": None, "consistent": None, "model_value": None, "baseline_value": None,
            "orders": orders}
    if any(o.get("missing") for o in orders.values()):
        pair["status"] = "missing"
    elif any(o["failure"] for o in orders.values()):
        pair["status"] = "unreadable"
    else:
        pair["verdict"], pair["consistent"] = combine_orders([o["verdict"] for o in orders.values()])
        pair["model_value"] = sum(o["model_value"] for o in orders.values()) / len(orders)
        pair["baseline_value"] = sum(o["baseline_value"] for o in orders.values()) / len(orders)
    return pair
