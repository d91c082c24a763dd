"""The 50 ApolloMoE languages, their language families and the bench source registry.

The facts live in ``languages.json`` beside this file (data, not code); this module only answers questions
about them. Everything that needs a language, a family id or a per-language id asks here.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

_DATA = Path(__file__).with_name("languages.json")
# Minor-language bench sources are named "<something>-<code>" with a 2-3 letter code (docs/reference.md, "Data formats").
_MINOR_SUFFIX = re.compile(r"-([a-z]{2,3})$")
PAD_LANGUAGE_ID = -1  # language id carried by padding tokens: belongs to no language and no expert


@lru_cache(maxsize=1)
def _registry() -> dict:
    return json.loads(_DATA.read_text(encoding="utf-8"))


def languages() -> dict[str, dict]:
    """code -> {name, family, major, language_id, score} for all 50 languages."""
    return _registry()["languages"]


def families() -> dict[int, str]:
    """family id -> family name (7 families, ids as in the reference's data prep)."""
    return {int(k): v for k, v in _registry()["families"].items()}


def major_languages() -> list[str]:
    """The 12 major languages in the paper's column order (ar, de, en, ... zh)."""
    return list(_registry()["major_column_order"])


def minor_languages() -> list[str]:
    return [code for code, e in languages().items() if not e["major"]]


def canonical(code: str) -> str:
    """Normalise a language code ('mn' -> 'ne' as the release data spells it); ValueError if unknown."""
    code = _registry()["aliases"].get(code, code)
    if code not in languages():
        raise ValueError(f"unknown language code {code!r}; known: {', '.join(sorted(languages()))}")
    return code


def is_major(code: str) -> bool:
    return languages()[canonical(code)]["major"]


def family_id(code: str) -> int:
    """The 7-family id of a language (the expert index of the Post-MoE models)."""
    return languages()[canonical(code)]["family"]


def language_id(code: str) -> int:
    """The per-language id: 0-11 for the major languages (alphabetical), 12-49 for the minor ones."""
    return languages()[canonical(code)]["language_id"]


def score_method(code: str) -> str:
    """'macro' (mean of source accuracies) or 'micro' (pooled counts): how the original collector scores the language (docs/reference.md, "Scores")."""
    return languages()[canonical(code)]["score"]


def known_sources() -> dict[str, str]:
    """The reference's major bench source names -> language."""
    return dict(_registry()["sources"])


def source_language(source: str, language: str | None = None) -> str:
    """Language of a bench item: its own ``language`` field wins, then the registry, then a minor ``-<code>`` suffix.

    Raises ValueError naming the source when none of these applies.
    """
    if language:
        return canonical(language)
    if source in _registry()["sources"]:
        return _registry()["sources"][source]
    m = _MINOR_SUFFIX.search(source)
    if m:
        try:
            return canonical(m.group(1))
        except ValueError:
            pass
    raise ValueError(
        f"unknown bench source {source!r}: not in the source registry (src/common/languages.json), no "
        f"'-<language code>' suffix, and the item has no 'language' field")


_TRAIN_KEY = re.compile(r"^(?P<category>[A-Za-z0-9]+)_(?P<lang>[a-z]{2,3})(?P<kind>_qa|_text)?$")
SOURCE_KINDS = ("text", "qa", "sft")  # raw pretraining text, pretraining text rewritten as QA, SFT conversations


def parse_train_source(key: str) -> tuple[str, str, bool]:
    """Split a training source key '<category>_<lang>[_qa|_text]' into (category, language, is_pretrain_qa).

    Raises ValueError when the key does not follow that grammar or names an unknown language. ``_text`` keys (raw
    pretraining text, the release's ``{source}_{lang}_text.json`` files) are valid and not pretrain-QA; tell them
    apart with ``train_source_kind``.
    """
    m = _TRAIN_KEY.match(key)
    if not m:
        raise ValueError(f"source key {key!r} is not of the form <category>_<lang>[_qa|_text]")
    return m["category"], canonical(m["lang"]), m["kind"] == "_qa"


def train_source_kind(key: str) -> str:
    """'text' (``*_text``: raw documents), 'qa' (``*_qa``: pretrain-derived QA) or 'sft' (any other valid key)."""
    parse_train_source(key)
    return "text" if key.endswith("_text") else "qa" if key.endswith("_qa") else "sft"
