"""Answer extraction: an ordered list of named rules, read on the first line of a generation.

**The first-line contract.** Only the first non-empty line of a generation is read: the first line with at least one
character (as in the reference, a line of spaces counts), or the whole text when no line has one.
``src.generation.stops.FIRST_LINE`` matches it, and it is complete once a newline follows it. ``first_line`` (what
the rules read) and ``stops.line_complete`` (step 4's stopping rule: nothing generated after that point can change the
letter) both use this one pattern.

**The rules** run in order on that line; each adds votes (letters, in the order counted). After a rule marked
``final``, if any votes were counted, the most-voted letter is the answer (a tie goes to the letter counted first,
as the reference's insertion-ordered dictionary does) and the names of the rules that voted are the ``rule``
(``bracketed+arabic`` when both did). Default mode, ``DEFAULT_RULES``:

1. ``bracketed``: every option letter in ASCII or full-width parentheses, ``(B)`` ``（b）``, either case.
2. ``arabic`` (final): each Arabic option letter that stands alone as the answer, ``(ج)`` ``ج)`` ``(ج``: touching a
   bracket as the reference requires (an optional opening bracket and one or more closing ones, or one or more
   opening brackets and an optional closing one), and never the first or last letter of a word (``(وهو`` is no F).
   One vote per letter however often it occurs. أ=A, ب=B, ج/س/ك=C, د=D, and for longer items ه=E (also ``هـ``), و=F,
   ز=G, ح=H (abjad order).
3. ``out_of_range`` (final): a bracketed letter that is not one of the item's letters (``(F)`` on a four-option
   item; a capital, or a lower-case a-h, so the ``(s)`` of "symptom(s)" is none), or a standalone Arabic option
   letter of an option the item does not have (``(هـ)`` on a four-option item), is an explicit answer: its Latin
   letter is recorded (upper-cased) and scored wrong, and the loose rule below does not run on that line.
4. ``loose`` (final): every capital option letter anywhere in the line (the "A" of "All" counts: the reference's
   fallback, kept for comparability).
5. ``yes_no`` (final): the line exactly ``Yes.`` is A, ``No.`` is B.
6. otherwise no letter (rule ``none``).

Reference mode, ``REFERENCE_RULES`` (``reference_extract``): the reference's own function exactly (REFERENCE_RULES is
``bracketed``, ``arabic_touching``, ``loose``, ``yes_no`` with letters A-F on every item): Arabic letters count when
they touch a bracket, also inside a word, ج is not among them, and a bracketed letter outside A-F falls through to the
loose rule. docs/eval.md lists the differences and why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

from src.generation.stops import FIRST_LINE

ALL_LETTERS = "ABCDEFGH"
REFERENCE_LETTERS = "ABCDEF"
# Arabic option letters per Latin letter. The reference has أ ب س|ك د; ج (the usual third letter) is added for C,
# and the abjad order continues for items with more than four options.
ARABIC = {"A": "أ", "B": "ب", "C": "جسك", "D": "د", "E": "ه", "F": "و", "G": "ز", "H": "ح"}
REFERENCE_ARABIC = {"A": "أ", "B": "ب", "C": "سك", "D": "د"}
_OPEN, _CLOSE = "（(", "）)"
_TATWEEL = "\u0640"  # the stretching stroke of "هـ", the usual way to write the letter he alone


# Every value ``Extraction.rule`` can take.
RULES = ("bracketed", "arabic", "bracketed+arabic", "out_of_range", "loose", "yes_no", "none")


@dataclass(frozen=True)
class Extraction:
    letter: str | None
    rule: str  # one of RULES
    votes: dict = field(default_factory=dict)  # letter -> votes, in the order they were counted
    tie: bool = False  # the winner shared the top count with another letter (first counted wins)
    line: str = ""  # the text the rules read (the first non-empty line)


def first_line(text: str) -> str:
    """What the rules read: the first line with at least one character, or the whole text when none has one."""
    m = FIRST_LINE.match(text)
    return m.group(1) if m else text


@dataclass(frozen=True)
class _Patterns:
    letters: str  # the item's option letters
    bracketed: re.Pattern
    any_bracketed: re.Pattern
    loose: re.Pattern
    arabic: tuple  # the item's Arabic option letters: (letter, standalone pattern, touching pattern)
    arabic_other: tuple  # the other mapped Arabic letters, standing alone: (letter, pattern)


@dataclass(frozen=True)
class Rule:
    name: str
    votes: Callable[[str, _Patterns], list[str]]  # letters voted for, in the order counted
    final: bool  # after this rule, any votes so far decide


def _bracketed(line: str, p: _Patterns) -> list[str]:
    return [m.upper() for m in p.bracketed.findall(line)]


def _arabic(line: str, p: _Patterns) -> list[str]:
    return [letter for letter, alone, _ in p.arabic if alone.search(line)]


def _arabic_touching(line: str, p: _Patterns) -> list[str]:
    return [letter for letter, _, touching in p.arabic if touching.search(line)]


def _out_of_range(line: str, p: _Patterns) -> list[str]:
    latin = [m.upper() for m in p.any_bracketed.findall(line) if m.upper() not in p.letters]
    return latin + [letter for letter, alone in p.arabic_other if alone.search(line)]


def _loose(line: str, p: _Patterns) -> list[str]:
    return p.loose.findall(line)


def _yes_no(line: str, p: _Patterns) -> list[str]:
    letter = {"Yes.": "A", "No.": "B"}.get(line)
    return [letter] if letter and letter in p.letters else []


RULE_LIST = (
    Rule("bracketed", _bracketed, final=False),
    Rule("arabic", _arabic, final=True),
    Rule("arabic_touching", _arabic_touching, final=True),
    Rule("out_of_range", _out_of_range, final=True),
    Rule("loose", _loose, final=True),
    Rule("yes_no", _yes_no, final=True),
)
_BY_NAME = {r.name: r for r in RULE_LIST}
DEFAULT_RULES = tuple(_BY_NAME[n] for n in ("bracketed", "arabic", "out_of_range", "loose", "yes_no"))
REFERENCE_RULES = tuple(_BY_NAME[n] for n in ("bracketed", "arabic_touching", "loose", "yes_no"))


def _normalise_letters(letters) -> str:
    if letters is None:
        return REFERENCE_LETTERS
    out = "".join(str(x).strip().upper() for x in letters)
    if not out or any(c not in ALL_LETTERS for c in out) or len(set(out)) != len(out):
        raise ValueError(f"option letters must be distinct letters from A-H, got {letters!r}")
    return "".join(c for c in ALL_LETTERS if c in out)  # canonical order for the cache key


@lru_cache(maxsize=256)
def _patterns(letters: str, arabic_items: tuple) -> _Patterns:
    cls = re.escape(letters) + re.escape(letters.lower())
    arabic, arabic_other = [], []
    for letter, chars in arabic_items:
        c = f"[{chars}]"
        # Standalone: no word character right before the letter nor right after it (a tatweel may follow).
        alone = f"(?<!\\w){c}{_TATWEEL}?(?!\\w)"
        standalone = re.compile(f"[{_OPEN}]?{alone}[{_CLOSE}]+|[{_OPEN}]+{alone}[{_CLOSE}]?")
        if letter in letters:
            arabic.append((letter, standalone, re.compile(f"[{_OPEN}]?{c}[{_CLOSE}]+|[{_OPEN}]+{c}[{_CLOSE}]?")))
        else:
            arabic_other.append((letter, standalone))
    # Out of range: any bracketed capital, but of the lower-case letters only the option alphabet a-h: "(s)" of
    # "symptom(s)" and the enumerator "(i)" are not answers.
    return _Patterns(letters, re.compile(f"[{_OPEN}]([{cls}])[{_CLOSE}]"),
                     re.compile(f"[{_OPEN}]([A-Za-h])[{_CLOSE}]"), re.compile(f"[{re.escape(letters)}]"),
                     tuple(arabic), tuple(arabic_other))


def run_rules(text: str, letters: str, arabic_map: dict, rules: tuple) -> Extraction:
    """Apply ``rules`` in order to the first line of ``text`` (see the module docstring)."""
    line = first_line(text)
    p = _patterns(letters, tuple(arabic_map.items()))
    votes: dict[str, int] = {}
    fired: list[str] = []
    for rule in rules:
        got = rule.votes(line, p)
        if got:
            fired.append(rule.name)
            for letter in got:
                votes[letter] = votes.get(letter, 0) + 1
        if rule.final and votes:
            top = max(votes.values())
            winners = [k for k, v in votes.items() if v == top]
            name = "+".join("arabic" if f == "arabic_touching" else f for f in fired)
            return Extraction(winners[0], name, votes if name != "yes_no" else {}, len(winners) > 1, line)
    return Extraction(None, "none", {}, False, line)


def extract(text: str, letters=None) -> Extraction:
    """Extract the answer letter from one generation. ``letters``: the item's option letters (default A-F, the
    reference's set). Returns the letter (or None), the rule that fired, the votes and whether a tie was broken."""
    return run_rules(text or "", _normalise_letters(letters), ARABIC, DEFAULT_RULES)


def reference_extract(text: str) -> str | None:
    """The reference's extractor exactly: letters A-F for every item, its Arabic rule without ج (for comparisons)."""
    return run_rules(text or "", REFERENCE_LETTERS, REFERENCE_ARABIC, REFERENCE_RULES).letter
