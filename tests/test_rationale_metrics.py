"""Rationale similarity (src/evaluate/rationale.py): the words MMedLM compares, BLEU and ROUGE against values worked
out by hand, and the reference mode against MMedLM's own script."""
from __future__ import annotations

import math

import pytest

from src.evaluate import mmedlm, rationale


# nltk.word_tokenize's documented outputs (NLTK's own doctests, nltk/test/tokenize.doctest): the same tokens with the
# Punkt tables taken from the PyPI package instead of NLTK's downloaded data. "Dr." stays one token only when the
# English Punkt model is really there (its abbreviation list); without sentence splitting "Jones." would stay glued.
@pytest.mark.parametrize("text,tokens", [
    ("I called Dr. Jones. I called Dr. Jones.", ["I", "called", "Dr.", "Jones", ".", "I", "called", "Dr.", "Jones", "."]),
    ("Ich muss unbedingt daran denken, Mehl, usw. fur einen Kuchen einzukaufen. Ich muss.",
     ["Ich", "muss", "unbedingt", "daran", "denken", ",", "Mehl", ",", "usw", ".", "fur", "einen", "Kuchen",
      "einzukaufen", ".", "Ich", "muss", "."]),
    ("On a $50,000 mortgage of 30 years at 8 percent, the monthly payment would be $366.88.",
     ["On", "a", "$", "50,000", "mortgage", "of", "30", "years", "at", "8", "percent", ",", "the", "monthly",
      "payment", "would", "be", "$", "366.88", "."]),
    ("It's more'n enough.", ["It", "'s", "more", "'n", "enough", "."]),
    ("\"We beat some pretty good teams to get here,\" Slocum said.",
     ["``", "We", "beat", "some", "pretty", "good", "teams", "to", "get", "here", ",", "''", "Slocum", "said", "."]),
])
def test_word_tokenize_is_nltks(text, tokens):
    assert rationale.word_tokenize(text) == tokens


def test_segmenters_for_chinese_and_japanese():
    # jieba's default dictionary and Janome's system dictionary, as MMedLM uses them
    assert rationale.words("患者出现发热和咳嗽。", "zh") == ["患者", "出现", "发热", "和", "咳嗽", "。"]
    assert rationale.words("患者は発熱と咳を訴えた。", "ja") == ["患者", "は", "発熱", "と", "咳", "を", "訴え", "た", "。"]
    assert rationale.words("肺炎を疑う。", "ja") == ["肺炎", "を", "疑う", "。"]


# BLEU-1 = BP * (clipped unigram matches / candidate words), BP = exp(1 - r/c) when the candidate (c words) is shorter
# than the reference (r words), else 1. ROUGE-1 F (the rouge package) = 2PR/(P+R+1e-8) over the SETS of words, the
# text split into sentences at "." and into words at spaces (zh/ja: the segmenter's words joined by spaces).
@pytest.mark.parametrize("language,ref,cand,bleu1,p,r", [
    # en words: ref The patient has fever . Treat with antibiotics . (9); cand The patient has a fever . (6);
    # matches The patient has fever . = 5 of 6, BP = exp(1 - 9/6). ROUGE on the raw text: ref words {The patient has
    # fever Treat with antibiotics} (7), cand {The patient has a fever} (5), shared 4: P = 4/5, R = 4/7
    ("en", "The patient has fever. Treat with antibiotics.", "The patient has a fever.", 5 / 6 * math.exp(1 - 9 / 6),
     4 / 5, 4 / 7),
    # zh words: ref 患者 出现 发热 和 咳嗽 。 (6); cand 患者 出现 高热 ， 考虑 肺炎 。 (7); shared 患者 出现 。 = 3;
    # c > r: BP = 1
    ("zh", "患者出现发热和咳嗽。", "患者出现高热，考虑肺炎。", 3 / 7, 3 / 7, 3 / 6),
    # ja words: ref 患者 は 発熱 と 咳 を 訴え た 。 (9); cand 肺炎 を 疑う 。 (4); shared を 。 = 2; BP = exp(1 - 9/4)
    ("ja", "患者は発熱と咳を訴えた。", "肺炎を疑う。", 2 / 4 * math.exp(1 - 9 / 4), 2 / 4, 2 / 9),
])
def test_bleu1_and_rouge1_by_hand(language, ref, cand, bleu1, p, r):
    assert rationale.bleu(ref, cand, language, "bleu1") == pytest.approx(bleu1, abs=1e-12)
    assert rationale.rouge(ref, cand, language, "rouge1") == pytest.approx(2 * p * r / (p + r + 1e-8), abs=1e-12)


def test_empty_candidate_scores_zero_and_is_flagged():
    for mode in rationale.METRICS:
        got = rationale.similarity("The patient has fever.", "", "en", mode)
        assert got["empty"] is True and all(got[m] == 0.0 for m in rationale.METRICS[mode])
    assert rationale.rouge("The patient has fever.", "...", "en") is None  # nothing but sentence dots


# The reference mode against MMedLM's metrics/rationale_similarity.py: its cal_similarity was run once (METRIC "BLEU",
# then "Rouge") on the lines below, as its inference script writes them ("</s>" where the model stopped), its
# word_tokenize given the tokenizer tested above; the numbers are what it printed. Items written for this test.
REFERENCE_CASES = [
    ("en", "###Rationale: Flank pain and fever suggest pyelonephritis. White cell casts place it in the kidney.\n"
           "###Answer: OPTION B IS CORRECT.",
     "Fever, flank pain and costovertebral angle tenderness point to pyelonephritis. White blood cell casts place "
     "the infection in the kidney.", 0.19770074816697586, 0.6060606011753903),
    ("zh", "###Rationale: 空腹痛、进食后缓解提示十二指肠溃疡。\n###Answer: OPTION B IS CORRECT.",
     "空腹痛、进食后缓解及夜间痛醒是十二指肠溃疡的典型节律。", 0.3286316809332554, 0.6923076875739645),
    ("ja", "###Rationale: 眼球突出と甲状腺腫はバセドウ病を示す。\n###Answer: OPTION B IS CORRECT.",
     "びまん性甲状腺腫、眼球突出、動悸と体重減少の組み合わせはバセドウ病に特徴的である。", 0.04904768696567901,
     0.4242424197979798),
]


@pytest.mark.parametrize("language,raw,gold,bleu4,rouge_l", REFERENCE_CASES)
def test_reference_mode_matches_mmedlms_script(language, raw, gold, bleu4, rouge_l):
    candidate = mmedlm.reference_rationale(mmedlm.reference_response(raw, "eos"))
    got = rationale.similarity(gold, candidate, language, "reference")
    assert got["bleu4"] == pytest.approx(bleu4, abs=1e-12)
    assert got["rougeL"] == pytest.approx(rouge_l, abs=1e-12)
    # the README's metrics on the same pair are other numbers (BLEU-1 >= cumulative BLEU-4)
    readme = rationale.similarity(gold, candidate, language, "readme")
    assert readme["bleu1"] > got["bleu4"]


def test_rouge_l_on_a_long_rationale_passes_the_default_recursion_limit():
    import sys

    text = " ".join(f"w{i}" for i in range(1100))
    before = sys.getrecursionlimit()
    assert rationale.rouge(text, text, "en", "rougeL") == pytest.approx(1.0, abs=1e-7)
    assert sys.getrecursionlimit() == before  # raised only for the call
