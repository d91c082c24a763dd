"""Cutting medical text into blocks for QA rewriting (``scripts/make_qa.sh``; docs/make_qa.md).

Text arrives as documents (one string of a release ``*_text.json`` list, one ``.txt`` file, one JSON Lines record).
A document is cut at its semantic units, the paragraphs (text between blank lines); adjacent paragraphs of the same
document are merged while the result stays within the block size; a paragraph longer than the block size is cut into
blocks of at most that size, at the strongest boundary available:

1. sentence ends: ``. ! ? …`` followed by a space or a line end, the CJK ``。！？``, the Arabic ``؟`` and ``۔``, the
   Devanagari danda ``।``/``॥``, and single line breaks;
2. clause marks: ``, ; :`` followed by a space, and ``，、；：`` (scripts written without spaces);
3. spaces between words;
4. nowhere else available: a hard cut at the size (a run of characters with no boundary at all).

The size depends on the language, as the Apollo paper chose it by knowledge density (2048 for en, es, fr, hi; 256 for
zh; 128 for ar): it is the ``block_size`` of the language's entry in ``rewrite_prompts.json`` (ja, written largely
with the same characters as zh: 256), and ``DEFAULT_BLOCK_SIZE`` (2048, the alphabetic scripts' value) for a language
without one. Sizes are in characters by default; with ``unit="tokens"`` the same numbers count a tokenizer's tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

DEFAULT_BLOCK_SIZE = 2048
UNITS = ("chars", "tokens")

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v\u00a0\u3000]*\n\s*")
# Each level's pattern matches the boundary *after* which a cut may go (the boundary stays with the left piece).
_LEVELS = [
    re.compile(r"(?:[.!?…؟۔]+[\"'”’»)\]]*(?=\s)|[。！？।॥]+[\"'”’」』）)]*|\n)\s*"),  # sentence ends
    re.compile(r"(?:[,;:،؛](?=\s)|[，、；：])\s*"),  # clause marks
    re.compile(r"\s+"),  # word boundaries
]


def block_size(language: str, override: int | None = None) -> int:
    """The block size for a language: ``override`` when given, else its entry's in the rewriting prompts, else the
    default."""
    if override is not None:
        if override < 1:
            raise ValueError(f"--block-size must be at least 1, got {override}")
        return override
    from src.prepare.rewrite import prompt_table

    return prompt_table()["languages"].get(language, {}).get("block_size") or DEFAULT_BLOCK_SIZE


def paragraphs(text: str) -> list[str]:
    """The non-empty paragraphs of a text (separated by blank lines), stripped."""
    return [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]


def _pieces(text: str, level: int) -> list[str]:
    """``text`` cut after every boundary of ``level``; the pieces join back to ``text``."""
    out, start = [], 0
    for m in _LEVELS[level].finditer(text):
        if m.end() > start and m.end() < len(text):
            out.append(text[start:m.end()])
            start = m.end()
    out.append(text[start:])
    return [p for p in out if p]


def _hard_cut(text: str, size: int, measure: Callable[[str], int]) -> list[str]:
    out = []
    while text:
        if measure(text) <= size:
            out.append(text)
            break
        lo, hi = 1, len(text)  # the longest prefix that fits (at least one character)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if measure(text[:mid]) <= size:
                lo = mid
            else:
                hi = mid - 1
        out.append(text[:lo])
        text = text[lo:]
    return out


def split_unit(text: str, size: int, measure: Callable[[str], int] = len, level: int = 0) -> list[str]:
    """Cut one unit (a paragraph) into pieces of at most ``size``, at the strongest boundaries available; pieces
    between boundaries are packed greedily. The pieces join back to ``text`` (whitespace included)."""
    if measure(text) <= size:
        return [text]
    if level == len(_LEVELS):
        return _hard_cut(text, size, measure)
    parts = _pieces(text, level)
    if len(parts) == 1:
        return split_unit(text, size, measure, level + 1)
    out: list[str] = []
    current = ""
    for part in parts:
        if measure(part) > size:  # too long on its own: flush, cut it at a weaker boundary
            if current:
                out.append(current)
                current = ""
            out += split_unit(part, size, measure, level + 1)
            continue
        if current and measure(current + part) > size:
            out.append(current)
            current = ""
        current += part
    if current:
        out.append(current)
    return out


def cut_document(text: str, size: int, measure: Callable[[str], int] = len, merge: bool = True) -> list[str]:
    """The blocks of one document: its paragraphs, adjacent short ones merged (joined by a blank line) while they fit
    in ``size`` (unless ``merge`` is False), long ones cut by ``split_unit``. Blocks are stripped, never empty."""
    blocks: list[str] = []
    current = ""
    for para in paragraphs(text):
        if measure(para) > size:
            if current:
                blocks.append(current)
                current = ""
            blocks += [b.strip() for b in split_unit(para, size, measure) if b.strip()]
            continue
        joined = f"{current}\n\n{para}" if current else para
        if current and (not merge or measure(joined) > size):
            blocks.append(current)
            joined = para
        current = joined
    if current:
        blocks.append(current)
    return blocks


@dataclass(frozen=True)
class Block:
    text: str
    language: str
    category: str
    file: str  # input file
    document: str  # the document's place in its file: "3" (list or JSON Lines index) or "" (a .txt file)
    index: int  # the block's number within its document

    @property
    def where(self) -> str:
        return f"{self.file}" + (f"[{self.document}]" if self.document else "") + f"#{self.index}"


def token_measure(tokenizer) -> Callable[[str], int]:
    """Length in the tokenizer's tokens (no special tokens)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)
