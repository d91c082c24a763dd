"""MMedBench answer parsing (src/evaluate/mmedlm.py): the robust default and MMedLM's string rule, as tables."""
from __future__ import annotations

import pytest

from src.evaluate import mmedlm

LETTERS = list("ABCDE")


@pytest.mark.parametrize("raw,letters,rule", [
    # the target format MMedLM fine-tunes on, with and without a rationale
    ("###Answer: OPTION B IS CORRECT.", ("B",), "answer_marker"),
    ("###Rationale: Fever and flank pain.\n###Answer: OPTION B IS CORRECT.", ("B",), "answer_marker"),
    ("###Rationale: Both lower potassium.\n###Answer: OPTION A,C IS CORRECT.", ("A", "C"), "answer_marker"),
    ("###Answer: OPTION C,A IS CORRECT.", ("A", "C"), "answer_marker"),  # a set: order does not matter
    ("###Answer: OPTION A、C IS CORRECT.", ("A", "C"), "answer_marker"),  # the Japanese enumeration comma
    # other spellings of the marker and of the letters after it
    ("###answer：Ｂ", ("B",), "answer_marker"),  # any case, full-width colon and letter
    ("Answer: B and D", ("B", "D"), "answer_marker"),
    ("###Answer:\nE", ("E",), "answer_marker"),  # the letter on the next line
    ("###Answer: (D)", ("D",), "answer_marker"),
    ("###Answer: B. Acute pyelonephritis", ("B",), "answer_marker"),  # option text after the letter: B alone
    ("###Answer: A. Low serum C3", ("A",), "answer_marker"),  # the C of C3 is no letter
    ("###Answer: The correct option is D.", ("D",), "answer_marker"),
    ("The answer: A. Then ###Answer: OPTION E IS CORRECT.", ("E",), "answer_marker"),  # the last marker wins
    # no marker: an OPTION phrase anywhere
    ("OPTION B, D", ("B", "D"), "option_phrase"),
    ("Options A and C are correct.", ("A", "C"), "option_phrase"),
    ("I think OPTION C IS CORRECT. (A) is wrong", ("C",), "option_phrase"),
    ("###Answer: ?\nthen OPTION B", ("B",), "option_phrase"),  # the marker's line names no letter
    # neither: the XMedBench rules on the first non-empty line, one letter
    ("The answer is (C).", ("C",), "extract:bracketed"),
    ("B", ("B",), "extract:loose"),
    ("\n\nthe best option is D", ("D",), "extract:loose"),
    # a rationale cut short before its answer: no letter is guessed from its words
    ("###Rationale: A 45-year-old man with Both", (), "none"),
    ("", (), "none"),
    ("no idea", (), "none"),
])
def test_robust_letters(raw, letters, rule):
    got = mmedlm.parse_robust(raw, LETTERS)
    assert (got.letters, got.rule) == (letters, rule)


@pytest.mark.parametrize("raw,rationale", [
    ("###Rationale: Fever and flank pain.\n###Answer: OPTION B IS CORRECT.", "Fever and flank pain."),
    ("  ###rationale:  Both lower potassium.\n\n###Answer: OPTION A,C IS CORRECT.", "Both lower potassium."),
    ("Fever and flank pain.", "Fever and flank pain."),  # no marker at all: the whole text
    ("###Answer: OPTION B IS CORRECT.", ""),
])
def test_robust_rationale(raw, rationale):
    assert mmedlm.parse_robust(raw, LETTERS).rationale == rationale


# MMedLM's rule: its inference keeps the text after "### Response:" with special tokens ("</s>" at the end when the
# model stopped), strips it and removes every newline; its accuracy script then deletes "###Answer: OPTION " and
# "IS CORRECT.</s>" and strips. Rows: (generation, why it stopped, what the script compares, gold, correct).
@pytest.mark.parametrize("raw,stop,answer,gold,correct", [
    ("###Answer: OPTION B IS CORRECT.", "eos", "B", "B", True),
    ("\n###Answer: OPTION B IS CORRECT.\n", "eos", "B", "B", True),
    ("###Answer: OPTION B IS CORRECT.", "max_tokens", "B IS CORRECT.", "B", False),  # no "</s>": never matches
    ("###Answer: OPTION A,C IS CORRECT.", "eos", "A,C", "C,A", True),  # several answers compare as sets
    ("###Answer: OPTION A, C IS CORRECT.", "eos", "A, C", "A,C", False),  # " C" is not "C"
    ("###Answer: OPTION A IS CORRECT.", "eos", "A", "A,C", False),
    ("###Rationale: Fever.\n###Answer: OPTION B IS CORRECT.", "eos", "###Rationale: Fever.B", "B", False),
    ("B", "eos", "B</s>", "B", False),
    ("###Answer: OPTION B IS CORRECT.### Response:###Answer: OPTION C IS CORRECT.", "eos", "B IS CORRECT.", "B",
     False),  # cut at a repeated "### Response:", as its split is; the "</s>" went with the cut part
])
def test_reference_rule(raw, stop, answer, gold, correct):
    got = mmedlm.reference_answer(mmedlm.reference_response(raw, stop))
    assert got == answer
    assert mmedlm.reference_correct(got, gold) is correct


def test_reference_rationale_glues_lines_as_mmedlm_does():
    response = mmedlm.reference_response("###Rationale: Fever.\nFlank pain.\n###Answer: OPTION B IS CORRECT.", "eos")
    assert response == "###Rationale: Fever.Flank pain.###Answer: OPTION B IS CORRECT.</s>"
    assert mmedlm.reference_rationale(response) == "Fever.Flank pain."
    assert mmedlm.reference_rationale(mmedlm.reference_response("no marker", "eos")) == "no marker</s>"


def test_prediction_carries_both_readings():
    rec = {"id": "x", "task": "mmedbench", "source": "mmedbench-ja", "language": "ja", "answer": "A,C",
           "answers": ["A", "C"], "answer_idx": "A,C", "letters": LETTERS}
    pred = mmedlm.prediction(rec, "###Rationale: 理由。\n###Answer: OPTION C,A IS CORRECT.", 20, "eos")
    assert (pred["letter"], pred["correct"], pred["rule"]) == ("A,C", True, "answer_marker")
    assert (pred["reference_answer"], pred["reference_correct"]) == ("###Rationale: 理由。C,A", False)
    assert pred["rationale"] == "理由。" and pred["gold"] == "A,C" and pred["stop"] == "eos"
    only_one = mmedlm.prediction(rec, "###Answer: OPTION A IS CORRECT.", 9, "eos")
    assert (only_one["correct"], only_one["reference_correct"]) == (False, False)
    nothing = mmedlm.prediction(rec, "", 0, "max_tokens")
    assert (nothing["letter"], nothing["correct"], nothing["rule"]) == (None, False, "none")
