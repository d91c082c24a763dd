"""MMedBench answers: the letters (possibly several) and the rationale read from a generation, two ways.

* ``robust`` (default): the letters after the last ``###Answer:`` marker (any case, full-width forms folded:
  ``###Answer: OPTION B IS CORRECT.``, ``(B)``, ``B and D``); else the last ``OPTION(S)`` followed by letters
  anywhere (``OPTION B, D``, ``Options A and C are correct``); else the project's XMedBench rules (``extract.py``)
  on the first non-empty line, one letter (not on a ``###Rationale:`` that never reached an answer). Correct when
  the set of letters equals the gold set. The rationale is the text before the last answer marker, without a
  leading ``###Rationale:``.
* ``reference``: MMedLM's scripts exactly. Its inference keeps the text after ``### Response:`` with the special
  tokens, stripped and with every newline removed; its accuracy script deletes ``"###Answer: OPTION "`` and
  ``"IS CORRECT.</s>"`` and strips; one gold letter must equal that string, several compare as sets split on ",".
  Our generations are decoded without special tokens, so ``</s>`` (the end token of MMedLM's Llama-family models)
  is put back when generation ended on the model's end token. Its rationale is the response before
  ``"###Answer: OPTION "`` with ``"###Rationale: "`` removed. On a with-rationale answer this rule never matches
  (the rationale stays in the string): MMedLM's accuracies come from answer-only prompts.

Every prediction carries both (``letter``/``correct`` robust, ``reference_answer``/``reference_correct``), so
``--parsing`` only chooses what score.json reports first; it never needs new generations.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from src.common.errors import UsageError
from src.evaluate.extract import extract
from src.prepare.mmedbench import TASK

REFERENCE_EOS = "</s>"
PARSINGS = ("robust", "reference")
MAX_NEW_TOKENS = 1000  # MMedLM's generation budget: room for a rationale
_MARKER = re.compile(r"#*[ \t]*answer[ \t]*:", re.IGNORECASE)
_RATIONALE_MARK = re.compile(r"^\s*#*[ \t]*rationale[ \t]*:[ \t]*", re.IGNORECASE)
_OPTION_WORD = re.compile(r"^\s*options?\b", re.IGNORECASE)
_CORRECT = re.compile(r"\s*\b(?:is|are)\s+(?:the\s+)?correct\b.*$", re.IGNORECASE | re.DOTALL)
_OPTION_PHRASE = re.compile(r"(?i:\boptions?)[ \t]+(?=[A-H](?![A-Za-z0-9]))")  # "OPTION B", "options A and C"
_BRACKETED = re.compile(r"[(\[]([A-Ha-h])[)\]]")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-H])(?![A-Za-z0-9])")  # not the C of "C3" nor the A of "Acute"
# A leading list of letters: "B", "B,D", "B, D", "B and D", "B y D", "A、C" ("B. Acute ..." gives B alone).
_LIST = re.compile(r"[A-H](?:\s*(?:[,/&;、，]|and|or|y|et|и|和|と)?\s*[A-H])*(?![A-Za-z0-9])")


@dataclass(frozen=True)
class Parsed:
    letters: tuple[str, ...]  # sorted, distinct; empty when nothing was found
    rule: str  # answer_marker, option_phrase, extract:<XMedBench rule>, or none
    rationale: str


def _letters_in(segment: str) -> tuple[str, ...]:
    """Option letters named in an answer segment: bracketed ones if any, else a leading list of capitals A-H, else
    the standalone capitals A-H anywhere in it."""
    segment = _CORRECT.sub("", _OPTION_WORD.sub("", segment)).strip()
    found = [m.upper() for m in _BRACKETED.findall(segment)]
    if not found:
        lead = _LIST.match(segment)
        found = _STANDALONE.findall(lead.group(0) if lead else segment)
    return tuple(sorted(set(found)))


def parse_robust(raw: str, letters=None) -> Parsed:
    """The default reading of one generation (see the module docstring). ``letters``: the item's option letters."""
    text = unicodedata.normalize("NFKC", raw or "")
    marks = list(_MARKER.finditer(text))
    rationale = text[:marks[-1].start()] if marks else text
    rationale = _RATIONALE_MARK.sub("", rationale).strip()
    if marks:
        segment = text[marks[-1].end():].lstrip().split("\n", 1)[0]
        found = _letters_in(segment)
        if found:
            return Parsed(found, "answer_marker", rationale)
    phrases = list(_OPTION_PHRASE.finditer(text))
    if phrases:
        return Parsed(tuple(sorted(set(_STANDALONE.findall(_LIST.match(text, phrases[-1].end()).group(0))))),
                      "option_phrase", rationale)
    if _RATIONALE_MARK.match(text):  # a rationale that never reached its answer (cut short): no letter to guess
        return Parsed((), "none", rationale)
    ex = extract(text, letters)
    if ex.letter is None:
        return Parsed((), "none", rationale)
    return Parsed((ex.letter,), f"extract:{ex.rule}", rationale)


def reference_response(raw: str, stop: str | None) -> str:
    """What MMedLM's inference script writes for this generation: the text after ``### Response:`` (cut at a
    repeated marker, as its split does), with ``</s>`` when generation ended on the end token, stripped, newlines
    removed."""
    text = (raw or "") + (REFERENCE_EOS if stop == "eos" else "")
    return text.split("### Response:")[0].strip().replace("\n", "")


def reference_answer(response: str) -> str:
    """MMedLM's accuracy script's reading of a response."""
    return response.replace("###Answer: OPTION ", "").replace("IS CORRECT.</s>", "").strip()


def reference_correct(answer: str, gold: str) -> bool:
    """MMedLM's comparison: a one-character gold must equal the answer; a longer one compares as sets split on ","."""
    if len(gold) == 1:
        return answer == gold
    return set(answer.split(",")) == set(gold.split(","))


def reference_rationale(response: str) -> str:
    """MMedLM's rationale of a response (its similarity script)."""
    return response.split("###Answer: OPTION ")[0].replace("###Rationale: ", "").strip()


def prediction(rec: dict, raw: str, new_tokens: int, stop: str) -> dict:
    """The prediction of one MMedBench record (every generation backend writes it through
    ``engine.generation_prediction``). ``letter`` holds the robust letters joined by "," (None when none)."""
    parsed = parse_robust(raw, rec.get("letters"))
    ref = reference_answer(reference_response(raw, stop))
    gold = rec.get("answers") or [rec.get("answer")]
    return {"id": rec.get("id"), "source": rec.get("source"), "language": rec.get("language"), "raw": raw,
            "letter": ",".join(parsed.letters) or None, "rule": parsed.rule, "gold": rec.get("answer"),
            "correct": bool(parsed.letters) and set(parsed.letters) == set(gold),
            "reference_answer": ref, "reference_correct": reference_correct(ref, rec.get("answer_idx")
                                                                            or rec.get("answer") or ""),
            "rationale": parsed.rationale, "tie": False, "new_tokens": new_tokens, "stop": stop}


def is_mmedbench(rec: dict) -> bool:
    return rec.get("task") == TASK


def configure_run(args, records: list[dict]) -> bool:
    """Step 4's settings for its records: True for MMedBench (all records; a mix is refused), with its defaults
    filled in (``--max-new-tokens`` 1000, ``--parsing robust``, ``--rationale-metric readme``) and the flags it cannot
    take refused; False for XMedBench records, which take no MMedBench flag."""
    kinds = {is_mmedbench(r) for r in records}
    if kinds == {True, False}:
        raise UsageError("--input", "mixes MMedBench and XMedBench records; score them in separate runs")
    if kinds != {True}:
        for flag, value in (("--parsing", args.parsing), ("--rationale-metric", args.rationale_metric)):
            if value is not None:
                raise UsageError(flag, "is for MMedBench records only")
        return False
    if args.mode != "generate":
        raise UsageError("--mode", "MMedBench answers are generated (MMedLM's protocol; some items have several "
                                   "answers, which one-letter log-likelihood cannot score)")
    if args.exclude_source:
        raise UsageError("--exclude-source", "is for XMedBench sources; MMedBench scores its six languages")
    if args.max_new_tokens is None:
        args.max_new_tokens = MAX_NEW_TOKENS
    args.parsing = args.parsing or "robust"
    args.rationale_metric = args.rationale_metric or "readme"
    return True
