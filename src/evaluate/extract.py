"""Answer extraction: the reference's rules (REFERENCE.md 5.2), generalised to each item's own option letters.

The rules, applied to one generation:

1. If the text contains a newline, only its first non-empty line is read. "Non-empty" means at least one character,
   as in the reference (a line of spaces counts as non-empty); when every line is empty the whole text is read.
2. ``bracketed``: every option letter in ASCII or full-width parentheses, ``(B)`` ``（b）``, in either case, is a vote.
3. ``arabic``: each Arabic option letter that touches a bracket (an optional opening bracket before it and one or more
   closing brackets after it, or one or more opening brackets before it) adds one vote to its letter, however many
   times it occurs. أ=A, ب=B, ج/س/ك=C, د=D, and for items with more options ه=E, و=F, ز=G, ح=H (abjad order).
4. ``loose``: when rules 2-3 found nothing, every capital option letter anywhere in the line is a vote (so the "A" of
   "All" counts: the reference's fallback, kept for comparability).
5. ``yes_no``: when nothing was found at all, the line ``Yes.`` means A and ``No.`` means B.
6. ``none``: otherwise no letter.

The letter with the most votes wins; a tie goes to the letter counted first (bracketed and loose votes in the order
they appear in the line, then the Arabic votes in letter order, exactly as the reference's dictionary does).

Differences from the reference (documented in docs/eval.md): the letter set is the item's own letters (A-H) instead of
a fixed A-F, so "(E)" is not a vote on a four-option item and items with G or H can be scored; ج counts for C (the
reference forgot the usual third Arabic letter). ``reference_extract`` keeps the reference's exact behaviour.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

ALL_LETTERS = "ABCDEFGH"
REFERENCE_LETTERS = "ABCDEF"
# Arabic option letters per Latin letter. The reference has أ ب س|ك د; ج (the usual third letter) is added for C,
# and the abjad order continues for items with more than four options.
ARABIC = {"A": "أ", "B": "ب", "C": "جسك", "D": "د", "E": "ه", "F": "و", "G": "ز", "H": "ح"}
REFERENCE_ARABIC = {"A": "أ", "B": "ب", "C": "سك", "D": "د"}
_OPEN, _CLOSE = "（(", "）)"

RULES = ("bracketed", "arabic", "bracketed+arabic", "loose", "yes_no", "none")


@dataclass(frozen=True)
class Extraction:
    letter: str | None
    rule: str  # one of RULES
    votes: dict = field(default_factory=dict)  # letter -> votes, in the order they were counted
    tie: bool = False  # the winner shared the top count with another letter (first counted wins)
    line: str = ""  # the text the rules read (the first non-empty line)


def first_line(text: str) -> str:
    """The reference's cut: the first line with at least one character, or the whole text when none has one."""
    if "\n" in text:
        for line in text.split("\n"):
            if len(line):
                return line
    return text


def line_complete(text: str) -> bool:
    """True once the first non-empty line of ``text`` is complete: nothing generated after this point can change what
    ``extract`` reads. This is the stopping rule of step 4's generation (a newline after a non-newline character)."""
    return _COMPLETE.search(text) is not None


_COMPLETE = re.compile(r"[^\n]\n")


def _normalise_letters(letters) -> str:
    if letters is None:
        return REFERENCE_LETTERS
    out = "".join(str(x).strip().upper() for x in letters)
    if not out or any(c not in ALL_LETTERS for c in out) or len(set(out)) != len(out):
        raise ValueError(f"option letters must be distinct letters from A-H, got {letters!r}")
    return "".join(c for c in ALL_LETTERS if c in out)  # canonical order for the cache key


@lru_cache(maxsize=256)
def _patterns(letters: str, arabic_items: tuple) -> tuple:
    cls = re.escape(letters) + re.escape(letters.lower())
    strict = re.compile(f"[{_OPEN}]([{cls}])[{_CLOSE}]")
    loose = re.compile(f"[{re.escape(letters)}]")
    arabic = []
    for letter, chars in arabic_items:
        c = f"[{chars}]"
        arabic.append((letter, re.compile(f"[{_OPEN}]?{c}[{_CLOSE}]+|[{_OPEN}]+{c}[{_CLOSE}]?")))
    return strict, loose, tuple(arabic)


def _extract(text: str, letters: str, arabic_map: dict) -> Extraction:
    line = first_line(text)
    arabic_items = tuple((k, v) for k, v in arabic_map.items() if k in letters)
    strict, loose, arabic = _patterns(letters, arabic_items)
    votes: dict[str, int] = {}
    for m in strict.findall(line):
        votes[m.upper()] = votes.get(m.upper(), 0) + 1
    n_strict = len(votes)
    arabic_hit = False
    for letter, pattern in arabic:
        if pattern.search(line):
            votes[letter] = votes.get(letter, 0) + 1
            arabic_hit = True
    if votes:
        rule = "bracketed+arabic" if n_strict and arabic_hit else ("bracketed" if n_strict else "arabic")
    else:
        for m in loose.findall(line):
            votes[m] = votes.get(m, 0) + 1
        rule = "loose"
        if not votes:
            if line == "Yes." and "A" in letters:
                return Extraction("A", "yes_no", {}, False, line)
            if line == "No." and "B" in letters:
                return Extraction("B", "yes_no", {}, False, line)
            return Extraction(None, "none", {}, False, line)
    top = max(votes.values())
    winners = [k for k, v in votes.items() if v == top]
    return Extraction(winners[0], rule, votes, len(winners) > 1, line)


def extract(text: str, letters=None) -> Extraction:
    """Extract the answer letter from one generation. ``letters``: the item's option letters (default A-F, the
    reference's set). Returns the letter (or None), the rule that fired, the votes and whether a tie was broken."""
    return _extract(text or "", _normalise_letters(letters), ARABIC)


def reference_extract(text: str) -> str | None:
    """The reference's extractor exactly: letters A-F for every item, no ج (for comparisons)."""
    return _extract(text or "", REFERENCE_LETTERS, REFERENCE_ARABIC).letter
