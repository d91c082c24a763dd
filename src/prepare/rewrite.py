"""The text side of QA rewriting: prompts per language, the dialogue parser and the checks on generated text.

Prompts live in ``rewrite_prompts.json`` beside this file (data, not code): the Apollo paper's English wording for the
question, the answer and the doctor-patient dialogue, and our own version of each for the 12 major languages. A
language without an entry gets the English wording with its English name as the target language, as the paper does
("other languages are similar").
"""
from __future__ import annotations

import difflib
import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

from src.common.languages import languages

PROMPTS_FILE = Path(__file__).with_name("rewrite_prompts.json")
_PLACEHOLDER = re.compile(r"\{(text|question|reference|language)\}")
MODES = ("qa", "dialogue")

# rejection reasons, in the order they are checked (report.json lists every one, zero or not)
REASONS = ("empty", "unparsed_dialogue", "too_short", "echoed_prompt", "not_in_language", "copied_question",
           "duplicate")


@lru_cache(maxsize=1)
def prompt_table() -> dict:
    return json.loads(PROMPTS_FILE.read_text(encoding="utf-8"))


def wording(language: str) -> dict:
    """The language's prompt entry (question, answer, dialogue, patient/doctor labels, stopwords); the English one,
    naming the language, for a language without its own."""
    table = prompt_table()["languages"]
    entry = table.get(language)
    if entry is not None:
        return {**entry, "own": True}
    return {**table["en"], "stopwords": [], "patient": table["en"]["patient"], "own": False}


def language_name(language: str) -> str:
    return languages().get(language, {}).get("name", language)


def render(template: str, **values: str) -> str:
    """Fill the placeholders in one pass (inserted text is never expanded again, so braces in a block are safe)."""
    def fill(m):
        return values[m[1]] if m[1] in values else m[0]
    return _PLACEHOLDER.sub(fill, template)


def question_prompt(language: str, text: str) -> str:
    return render(wording(language)["question"], text=text, language=language_name(language))


def answer_prompt(language: str, question: str, reference: str) -> str:
    return render(wording(language)["answer"], question=question, reference=reference,
                  language=language_name(language))


def dialogue_prompt(language: str, text: str) -> str:
    return render(wording(language)["dialogue"], text=text, language=language_name(language))


# ------------------------------------------------------------------------------------------------ cleaning replies
def _last_tag(template: str) -> str:
    """The tag a prompt ends with ('<question>:' -> 'question'), which models often echo."""
    m = re.search(r"<([^<>]+)>\s*[:：]?\s*$", template)
    return m[1] if m else ""


def clean_reply(text: str, template: str) -> str:
    """Strip what models add around the wanted text: the prompt's closing tag echoed back (``<question>: ...``),
    markdown bold on it, and quotes around the whole reply."""
    text = (text or "").strip()
    tag = _last_tag(template)
    if tag:
        text = re.sub(rf"^\**\s*<?\s*{re.escape(tag)}\s*>?\s*\**\s*[:：]\s*\**\s*", "", text, flags=re.IGNORECASE)
        text = re.sub(rf"</\s*{re.escape(tag)}\s*>\s*$", "", text, flags=re.IGNORECASE).strip()
    if len(text) > 2 and (text[0], text[-1]) in {('"', '"'), ("“", "”"), ("«", "»"), ("「", "」")}:
        text = text[1:-1].strip()
    return text


# ------------------------------------------------------------------------------------------------ dialogues
def speaker_labels(language: str) -> dict[str, list[str]]:
    """role -> labels accepted for it: the language's own and the English ones."""
    own, en = wording(language), prompt_table()["languages"]["en"]
    return {role: list(dict.fromkeys(own[role] + en[role])) for role in ("patient", "doctor")}


def dialogue_turns(text: str, language: str) -> tuple[list[tuple[str, str]], int, str | None]:
    """Alternating (role, text) turns of a dialogue reply, starting with the patient and ending with the doctor, the
    number of turns dropped, and None; or ([], dropped, reason) when no such turns can be read.

    Both the prompt's tag form (``<Patient>...</Patient> <Doctor>...</Doctor>``) and line labels (``Patient: ...``,
    ``**Doctor:** ...``, ``患者：...``) are read, in the block's language and in English. Text before the first label
    is dropped (an introduction), consecutive turns of one speaker are joined, a doctor turn before the first patient
    turn and a patient turn left without an answer at the end (a reply cut at the token limit) are dropped (counted)."""
    labels = speaker_labels(language)
    role_of = {lab.casefold(): role for role, labs in labels.items() for lab in labs}
    alt = "|".join(re.escape(lab) for lab in sorted(role_of, key=len, reverse=True))
    opening = re.compile(rf"<\s*(?P<tag>{alt})\s*>|^[ \t>*#\-–•\d.)]*\**_*\s*\[?(?P<line>{alt})\]?\s*\**_*\s*"
                         rf"(?:\([^)\n]{{0,40}}\))?\s*[:：]\s*\**_*", re.IGNORECASE | re.MULTILINE)
    closing = re.compile(rf"<\s*/\s*(?:{alt})\s*>", re.IGNORECASE)
    marks = list(opening.finditer(text or ""))
    if not marks:
        return [], 0, "no patient/doctor labels found"
    turns: list[tuple[str, str]] = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        role = role_of[(m["tag"] or m["line"]).casefold()]
        body = closing.sub("", text[m.end(): nxt.start() if nxt else len(text)]).strip()
        if not body:
            continue
        if turns and turns[-1][0] == role:
            turns[-1] = (role, turns[-1][1] + "\n\n" + body)
        else:
            turns.append((role, body))
    n = len(turns)
    while turns and turns[0][0] != "patient":
        turns.pop(0)
    if turns and turns[-1][0] == "patient":
        turns.pop()
    if not turns:
        return [], n, "no patient question followed by a doctor answer"
    return turns, n - len(turns), None


def parse_dialogue(text: str, language: str) -> tuple[list[tuple[str, str]], str | None]:
    """``dialogue_turns`` without the count: (turns, None) or ([], reason)."""
    turns, _, problem = dialogue_turns(text, language)
    return turns, problem


# ------------------------------------------------------------------------------------------------ checks
def _script(ch: str) -> str | None:
    if not ch.isalpha():
        return None
    try:
        name = unicodedata.name(ch).split(" ")[0]
    except ValueError:
        return None
    return "CJK" if name in ("CJK", "HIRAGANA", "KATAKANA") else name


def script_shares(text: str) -> dict[str, float]:
    """Share of a text's letters in each script (Unicode character names: LATIN, CJK incl. kana, ARABIC, ...)."""
    counts: dict[str, int] = {}
    for ch in text:
        s = _script(ch)
        if s:
            counts[s] = counts.get(s, 0) + 1
    total = sum(counts.values())
    return {s: n / total for s, n in sorted(counts.items(), key=lambda kv: -kv[1])} if total else {}


def kana_share(text: str) -> float:
    """Share of a text's letters that are hiragana or katakana: what tells Japanese from Chinese, both CJK here
    (Japanese prose is mostly kana: particles, endings; Chinese has none)."""
    letters = [ch for ch in text if _script(ch)]
    kana = sum(unicodedata.name(ch, "").startswith(("HIRAGANA", "KATAKANA")) for ch in letters)
    return kana / len(letters) if letters else 0.0


def _kana_problem(reply: str, language: str, bounds: list[float]) -> str | None:
    """The reply's kana share outside the language's ``kana_share`` [least, most) bounds: it reads as the other
    language that shares the script (the entry whose bounds it falls in, named when there is one)."""
    share = kana_share(reply)
    if _within(share, bounds):
        return None
    other = next((code for code, e in prompt_table()["languages"].items()
                  if code != language and e.get("kana_share") and _within(share, e["kana_share"])), "another language")
    return f"reads as {other} ({share:.0%} of its letters are kana)"


def _within(share: float, bounds: list[float]) -> bool:
    least, most = bounds
    return least <= share < most or (most >= 1.0 and share >= least)


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W\d_]+", text.casefold())


def language_problem(reply: str, block: str, language: str, min_share: float = 0.5) -> str | None:
    """Why a reply is not in the block's language, or None. The reply's letters must be mostly (``min_share``) in the
    block's main script; for languages with ``kana_share`` bounds (ja, zh) the reply's kana share must lie within
    them; for languages with a stopword list
    (Latin-script ones) the reply must not read clearly as another listed language (at least 3 stopword hits, more
    than twice its own language's)."""
    block_scripts = script_shares(block)
    if block_scripts:
        script = next(iter(block_scripts))
        share = script_shares(reply).get(script, 0.0)
        if share < min_share:
            return f"{share:.0%} of its letters are {script}, the block's script"
    entry = wording(language)
    if entry.get("kana_share"):
        return _kana_problem(reply, language, entry["kana_share"])
    own = entry.get("stopwords") or []
    if own:
        words = _words(reply)
        hits = {code: sum(w in set(e["stopwords"]) for w in words)
                for code, e in prompt_table()["languages"].items() if e.get("stopwords")}
        mine = hits.get(language, 0)
        best = max((c for c in hits if c != language), key=lambda c: hits[c], default=None)
        if best is not None and hits[best] >= 3 and hits[best] > 2 * mine:
            return f"reads as {best} ({hits[best]} common {best} words, {mine} {language})"
    return None


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


ECHO_CHARS = 24  # a reply holding this many characters of the instruction's own wording repeats the prompt


def echoed_instruction(reply: str, language: str, prompt: str) -> str | None:
    """A piece of the instruction wording of ``prompt`` ("question", "answer" or "dialogue") that the reply repeats
    (small models often echo their prompt instead of answering it), or None. Only the fixed wording counts, never
    the block or question put into it, so an answer that quotes the text is not caught here."""
    reply_n = normalise(reply)
    for piece in _PLACEHOLDER.split(render(wording(language)[prompt], language=language_name(language))):
        for line in piece.splitlines():
            line = normalise(line)
            if len(line) < ECHO_CHARS or line in ("text", "question", "reference", "language"):
                continue
            for i in range(0, len(line) - ECHO_CHARS + 1, ECHO_CHARS // 2):
                if line[i:i + ECHO_CHARS] in reply_n:
                    return line[i:i + ECHO_CHARS]
    return None


def copied_from(question: str, block: str, share: float = 0.6, min_run: int = 12) -> bool:
    """The question is (mostly) a piece of the block: its longest run shared with the block covers ``share`` of it
    and at least ``min_run`` characters, or all of it."""
    q, b = normalise(question), normalise(block)
    if not q:
        return False
    if q in b:
        return True
    m = difflib.SequenceMatcher(None, q, b, autojunk=False).find_longest_match(0, len(q), 0, len(b))
    return m.size >= max(min_run, share * len(q))
