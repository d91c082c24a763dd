"""When a generation ends: the one stop-token rule, and the first-line rule of step 4.

* ``stop_token_ids``: the chat format's end token, the tokenizer's EOS and the generation config's EOS ids (what HF
  generate would stop on). Every backend and every caller (step 4, the chats, the QA rewriting) uses this set.
* The first non-empty line (``FIRST_LINE``): optional leading newlines, the line, and the newline that completes it.
  Step 4's extractor reads only that line, so a generation whose first line is complete (``line_complete``) can stop:
  nothing after it changes the letter. ``newline_tokens``/``completes_line`` decide it from token ids, decoding only
  when a token brings a newline; ``stop_reason`` is the per-token rule of every engine that decodes token by token.
"""
from __future__ import annotations

import re
import weakref

# The first-line contract: optional leading newlines, the line, and the newline that completes it. A text of
# newlines only has no such line (then src/evaluate/extract.py reads the whole text).
FIRST_LINE = re.compile(r"\n*([^\n]+)(\n)?")
_COMPLETE = re.compile(r"[^\n]\n")  # the end of the first non-empty line


def stop_token_ids(tokenizer, fmt=None, model=None) -> list[int]:
    """Token ids that end a generation: the chat format's end token, the tokenizer's EOS and the EOS ids of the
    model's generation config (``model``: anything with a ``generation_config``, or None)."""
    ids: list[int] = []
    if fmt is not None:
        ids.append(fmt.stop_token(tokenizer))
    ids.append(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += eos if isinstance(eos, (list, tuple)) else [eos]
    out = []
    for i in ids:
        if i is not None and int(i) >= 0 and int(i) not in out:
            out.append(int(i))
    return out


def folder_stop_token_ids(model_path, tokenizer, fmt) -> list[int]:
    """``stop_token_ids`` for a model folder without loading its weights (its generation_config.json, if any)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json in the folder
        gen = None
    return stop_token_ids(tokenizer, fmt, SimpleNamespace(generation_config=gen))


def line_complete(text: str) -> bool:
    """True once the first non-empty line of ``text`` is complete: nothing generated after this point can change what
    step 4's extractor reads."""
    m = FIRST_LINE.match(text)
    return bool(m and m.group(2))


def cut_first_line(text: str) -> tuple[str, bool]:
    """``text`` up to and including the newline that completes its first non-empty line, and whether there is one."""
    m = _COMPLETE.search(text)
    return (text[:m.end()], True) if m else (text, False)


_NEWLINE_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def newline_tokens(tokenizer) -> bytearray:
    """table[t] = 1 when token t's text contains a newline. A row's first non-empty line can only become complete
    at a step whose token brings a newline (decoding appends text; a newline byte is never part of a multi-byte
    character), so only those rows are decoded to check ``line_complete``. Cached per tokenizer."""
    try:
        return _NEWLINE_TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    texts = [tokenizer.decode([t], skip_special_tokens=True) for t in range(len(tokenizer))]
    table = bytearray("\n" in text for text in texts)
    try:
        _NEWLINE_TABLES[tokenizer] = table
    except TypeError:  # a tokenizer that cannot be weakly referenced: not cached
        pass
    return table


def completes_line(gen: list[int], tok: int, newline: bytearray | None, tokenizer) -> bool:
    """True when ``tok``, just appended to ``gen``, completes the first non-empty line (``newline``: the table of
    ``newline_tokens``; None = no early stop). The text is decoded only when the token brings a newline: nothing
    else completes a line."""
    return newline is not None and (tok >= len(newline) or bool(newline[tok])) \
        and line_complete(tokenizer.decode(gen, skip_special_tokens=True))


def stop_reason(gen: list[int], tok: int, stops: set[int], max_new_tokens: int, newline: bytearray | None,
                tokenizer) -> str | None:
    """Why a row stops once ``tok`` is appended to its tokens ``gen`` (None: it goes on): "eos" (a stop token),
    "max_tokens", or "line" (``completes_line``)."""
    if tok in stops:
        return "eos"
    if len(gen) >= max_new_tokens:
        return "max_tokens"
    if completes_line(gen, tok, newline, tokenizer):
        return "line"
    return None
