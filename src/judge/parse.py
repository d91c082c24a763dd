"""Reading the judge's reply: the scores (score mode) or the ranking (order mode) of the answers it was shown.

Two parsers, chosen with ``--parser`` (replies are kept, so switching re-reads them without asking the judge again):

* ``robust`` (default) reads what our prompts ask for and the usual variations on it:
  - scores: the first line with a digit in it, when it holds exactly one number per answer (``8 7``, ``8, 7``,
    ``8/10 7/10``, ``**Scores:** 8 7``; a heading without digits before it is passed over); failing that,
    ``Assistant 1: 8`` ... for every answer anywhere in the reply (``Assistant 1's score: 8/10`` too; one answer
    given two different scores is ambiguous). Scores outside 1-10 are refused.
  - ranking: the last chain that names every answer once, such as ``Assistant 2 > Assistant 1`` or
    ``Assistant 1 = Assistant 2`` (spacing, case, markdown, ``>=``, ``<`` and full-width signs allowed).
* ``llmzoo`` applies the rules of LLMZoo's review script as published, quirks included: scores from the reply's last
  line when it holds only digits, dots and spaces, else from the digits at the very end of the reply, else from
  ``Assistant i: x``; the ranking from the FIRST ``Assistant i [>=] Assistant j`` chain (single spaces, single
  digits) with as many ``Assistant`` mentions as answers, even if one is named twice; no range check.

Both return the values in the order the answers were shown: scores, or competition ranks (1 = best; ``A1 = A2 > A3``
gives 1, 1, 3). A reply that cannot be read gives ``values=None`` and the reason.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PARSERS = ("robust", "llmzoo")
SCORE_RANGE = (1.0, 10.0)
_NUMBER = r"\d+(?:\.\d+)?"
_MARKUP = re.compile(r"[*_`#]")
# A label before the scores ("Scores:", "评分："): no digit in it, so "Assistant 1:" is not one.
_LEADING_LABEL = re.compile(r"^[^\W\d_][^\d:：]{0,30}[:：]\s*")
_SIGNS = {"≥": ">", ">=": ">", "=>": ">", ">>": ">", "＞": ">", "≤": "<", "<=": "<", "=<": "<", "<<": "<",
          "＜": "<", "＝": "=", "==": "="}


@dataclass(frozen=True)
class Parsed:
    values: list[float] | None
    failure: str | None = None


def parse(reply: str, mode: str, parser: str, n: int = 2, role: str = "Assistant") -> Parsed:
    if not reply.strip():
        return Parsed(None, "empty reply")
    if parser == "llmzoo":
        return llmzoo_scores(reply, n) if mode == "score" else llmzoo_ranks(reply, n)
    return robust_scores(reply, n, role) if mode == "score" else robust_ranks(reply, n, role)


# -- robust -----------------------------------------------------------------------------------------------------------
def robust_scores(reply: str, n: int, role: str = "Assistant") -> Parsed:
    text = _MARKUP.sub("", reply)
    first = next((line.strip() for line in text.splitlines() if re.search(r"\d", line)), "")
    first = _LEADING_LABEL.sub("", first)
    first = re.sub(r"\s*/\s*10(?!\d)", "", first).rstrip(" .。")
    parts = [p for p in re.split(r"[\s,;，；、]+", first) if p]
    if len(parts) == n and all(re.fullmatch(_NUMBER, p) for p in parts):
        return _in_range([float(p) for p in parts])
    named = _named_scores(text, n, role)
    if isinstance(named, Parsed):
        return named
    return Parsed(None, f"no scores: the first line with a digit is not {n} numbers, and not every {role} 1-{n} "
                        f"is given '{role} N: score'")


def _named_scores(text: str, n: int, role: str) -> Parsed | None:
    scores = []
    for i in range(1, n + 1):
        pattern = rf"{re.escape(role)}\s*{i}(?!\d)[^\n\d:：=]{{0,20}}[:：=]\s*({_NUMBER})(?:\s*/\s*10(?!\d))?"
        found = {float(v) for v in re.findall(pattern, text, flags=re.IGNORECASE)}
        if not found:
            return None
        if len(found) > 1:
            several = ", ".join(f"{v:g}" for v in sorted(found))
            return Parsed(None, f"ambiguous: {role} {i} is given several scores ({several})")
        scores.append(found.pop())
    return _in_range(scores)


def _in_range(scores: list[float]) -> Parsed:
    low, high = SCORE_RANGE
    bad = [s for s in scores if not low <= s <= high]
    if bad:
        return Parsed(None, f"score {bad[0]:g} outside {low:g}-{high:g}")
    return Parsed(scores)


def robust_ranks(reply: str, n: int, role: str = "Assistant") -> Parsed:
    text = _MARKUP.sub("", reply)
    for sign, plain in _SIGNS.items():
        text = text.replace(sign, plain)
    name = rf"{re.escape(role)}\s*\d+"
    chains = list(re.finditer(rf"{name}(?:\s*[<>=]\s*{name})+", text, flags=re.IGNORECASE))
    for chain in reversed(chains):  # the prompt asks for the ranking last
        numbers = [int(x) for x in re.findall(rf"{re.escape(role)}\s*(\d+)", chain.group(0), flags=re.IGNORECASE)]
        signs = re.findall(r"[<>=]", chain.group(0))
        if sorted(numbers) != list(range(1, n + 1)) or ("<" in signs and ">" in signs):
            continue
        if "<" in signs:  # "A1 < A2" is "A2 > A1"
            numbers, signs = numbers[::-1], [">" if s == "<" else s for s in signs[::-1]]
        return Parsed([float(r) for r in competition_ranks(numbers, signs, n)])
    if chains:
        return Parsed(None, f"no ranking names each of {role} 1-{n} exactly once in one direction")
    return Parsed(None, f"no ranking ('{role} i > {role} j' or '{role} i = {role} j')")


def competition_ranks(numbers: list[int], signs: list[str], n: int) -> list[int]:
    """Ranks by position from an ordered chain: ``numbers`` best first, ``signs`` ('>' or '=') between them. This is
    the published code's arithmetic, indexing included (LLMZoo's parser feeds it unchecked chains: an assistant 0 lands
    on the last position, one named twice keeps its last rank and leaves another at 0)."""
    ranks, rank, equal = [0] * n, 1, 0
    ranks[numbers[0] - 1] = rank
    for sign, number in zip(signs, numbers[1:]):
        if sign == ">":
            rank, equal = rank + equal + 1, 0
        else:
            equal += 1
        ranks[number - 1] = rank
    return ranks


# -- LLMZoo's rules ---------------------------------------------------------------------------------------------------
def llmzoo_scores(reply: str, n: int) -> Parsed:
    stripped = reply.strip()
    last = stripped.split("\n")[-1]
    if re.match(r"^[ \d.]+$", last):
        parts = last.split(" ")
    elif re.search(r"([ \d.]+)$", stripped):
        tail = re.search(r"([ \d.]+)$", reply)  # the unstripped reply, as published: no match after a blank line
        if tail is None:
            return Parsed(None, "llmzoo: the trailing numbers are followed by a blank line")
        parts = tail.group(1).strip(" .").split(" ")
    else:
        parts = []
        for i in range(1, n + 1):
            named = re.search(rf"Assistant {i}: ([0-9.]+)", reply)
            if named is None:
                return Parsed(None, f"llmzoo: no trailing scores and no 'Assistant {i}: x'")
            parts.append(named.group(1))
    if len(parts) != n:
        return Parsed(None, f"llmzoo: {len(parts)} values where {n} scores were expected ({' '.join(parts)!r})")
    try:
        return Parsed([float(p) for p in parts])
    except ValueError:
        return Parsed(None, f"llmzoo: not numbers: {parts!r}")


def llmzoo_ranks(reply: str, n: int) -> Parsed:
    text = reply.replace(">=", ">").replace(">>", ">").strip()
    chains = [m.group(0) for m in re.finditer(r"Assistant \d(?: [>=] Assistant \d)+", text)]
    chosen = next((c for c in chains if c.count("Assistant") == n), None)
    if chosen is None:
        return Parsed(None, f"llmzoo: no 'Assistant i > Assistant j' chain with {n} assistants")
    numbers = [int(x) for x in re.findall(r"\d", chosen)]
    signs = re.findall(r"[>=]", chosen)
    try:
        ranks = competition_ranks(numbers, signs, n)
    except IndexError:
        return Parsed(None, f"llmzoo: the chain names an assistant above {n}: {chosen!r}")
    if 0 in ranks:  # an assistant named twice: LLMZoo keeps it, and its metric script then divides by zero
        return Parsed(None, f"llmzoo: the chain names an assistant twice, leaving one unranked: {chosen!r}")
    return Parsed([float(r) for r in ranks])

