"""Judged open answers, the parts that need no model: reading the judge's replies (both parsers, realistic and
malformed replies), the judge's messages, the arithmetic (ratio, bootstrap interval, win/tie/lose and both win
rates), the both-orders rule, question validation and resume of the answers (tiny in-process models)."""
import json

import pytest

from src.common.errors import DataError
from src.judge.parse import competition_ranks, parse
from src.judge.prompts import DEFAULT_PROMPTS, JudgePrompt, load_prompt
from src.judge.stats import bootstrap_interval, combine_orders, ratio, summarise, verdict, win_rates
from src.judge.verdicts import build_pair

EXPLAIN = "Assistant 1 lists the main signs and says to call emergency services. Assistant 2 is vague."

# (reply, expected scores or None) for the robust parser, two answers
ROBUST_SCORES = [
    (f"8 7\n{EXPLAIN}", [8, 7]),
    (f"8, 7\n\n{EXPLAIN}", [8, 7]),
    (f"**Scores:** 9 6\n\n{EXPLAIN}", [9, 6]),
    (f"8/10 7/10\n{EXPLAIN}", [8, 7]),
    (f"7.5 8\n{EXPLAIN}", [7.5, 8]),
    (f"评分：8 7\n{EXPLAIN}", [8, 7]),
    (f"### Scores\n6 9\n{EXPLAIN}", [6, 9]),  # a heading without digits is passed over
    (f"Here is my evaluation.\nAssistant 1: 8\nAssistant 2: 6\n{EXPLAIN}", [8, 6]),
    ("Assistant 1's score: 9/10. Assistant 2's score: 4/10.", [9, 4]),
    ("Assistant 1: 8, Assistant 2: 7", [8, 7]),
    ("assistant 1 = 7\nassistant 2 = 9", [7, 9]),
    ("**Assistant 1**: 3\n**Assistant 2**: 10", [3, 10]),
    ("Assistant 1 receives 8 and Assistant 2 receives 6.", None),  # no 'Assistant N: x', first line not 2 numbers
    (f"8\n{EXPLAIN}", None),  # one score only
    (f"8 7 6\n{EXPLAIN}", None),
    (f"11 7\n{EXPLAIN}", None),  # outside 1-10
    (f"0 5\n{EXPLAIN}", None),
    ("Assistant 1: 8\nOn reflection:\nAssistant 1: 6\nAssistant 2: 7", None),  # two scores for one answer
    ("   \n", None),
    ("The early warning signs of a stroke are often subtle but can be\n\n[", None),  # a small model's non-answer
]

ROBUST_RANKS = [
    (f"{EXPLAIN}\nAssistant 2 > Assistant 1", [2, 1]),
    (f"{EXPLAIN}\nAssistant 1 = Assistant 2", [1, 1]),
    ("Assistant 1 > Assistant 2 in detail, but on accuracy...\n\nAssistant 2 > Assistant 1", [2, 1]),  # the last
    ("**Assistant 1** > **Assistant 2**", [1, 2]),
    ("Assistant 1>=Assistant 2", [1, 2]),
    ("Assistant 1 < Assistant 2", [2, 1]),
    ("assistant 2 ＞ assistant 1", [2, 1]),
    (f"{EXPLAIN}\nAssistant 1 > Assistant 2. Both were polite.", [1, 2]),
    ("Assistant 1 > Assistant 1", None),
    ("Assistant 1 > Assistant 3", None),
    ("Assistant 1 is better than Assistant 2.", None),
    ("", None),
]

LLMZOO_SCORES = [
    (f"{EXPLAIN}\n8 7", [8, 7]),
    (f"8 7\n{EXPLAIN}", None),  # the published rule reads the end: a trailing '.' leaves no scores
    ("Assistant 1: 8\nAssistant 2: 6\nOverall, Assistant 1 is better", [8, 6]),
    ("Scores: 8 7", [8, 7]),
    (f"{EXPLAIN}\n8  7", None),  # two spaces make an empty value
    (f"{EXPLAIN}\n80 70", [80, 70]),  # no range check
    (f"{EXPLAIN}\n9 8\n\n", [9, 8]),
    (f"{EXPLAIN} Scores are 8 7\n\n", None),  # the trailing numbers are searched in the unstripped reply
    ("Assistant 1: 8, Assistant 2: 6 overall", [8, 6]),  # ends in a letter: the named scores are read
]

LLMZOO_RANKS = [
    ("Assistant 1 > Assistant 2", [1, 2]),
    (f"Assistant 2 > Assistant 1 in detail.\n{EXPLAIN}\nAssistant 1 > Assistant 2", [2, 1]),  # the FIRST chain
    ("Assistant 1>Assistant 2", None),  # single spaces only
    ("Assistant 1 >= Assistant 2", [1, 2]),
    ("Assistant 2 = Assistant 1", [1, 1]),
    ("Assistant 1 > Assistant 1", None),  # accepted by the published parser, leaving a rank 0
    ("**Assistant 1** > Assistant 2", None),
    ("Assistant 1 < Assistant 2", None),
]


@pytest.mark.parametrize("reply,expected", ROBUST_SCORES)
def test_robust_scores(reply, expected):
    got = parse(reply, "score", "robust")
    assert got.values == expected, got.failure
    assert (got.failure is None) == (expected is not None)


@pytest.mark.parametrize("reply,expected", ROBUST_RANKS)
def test_robust_ranks(reply, expected):
    got = parse(reply, "order", "robust")
    assert got.values == expected, got.failure
    assert (got.failure is None) == (expected is not None)


@pytest.mark.parametrize("reply,expected", LLMZOO_SCORES)
def test_llmzoo_scores(reply, expected):
    assert parse(reply, "score", "llmzoo").values == expected


@pytest.mark.parametrize("reply,expected", LLMZOO_RANKS)
def test_llmzoo_ranks(reply, expected):
    assert parse(reply, "order", "llmzoo").values == expected


def test_failures_say_why():
    assert "outside 1-10" in parse("11 7", "score", "robust").failure
    assert "ambiguous" in parse("Assistant 1: 8\nAssistant 1: 6\nAssistant 2: 7", "score", "robust").failure
    assert parse("", "order", "robust").failure == "empty reply"
    assert "exactly once" in parse("Assistant 1 > Assistant 1", "order", "robust").failure
    assert "twice" in parse("Assistant 1 > Assistant 1", "order", "llmzoo").failure


def test_rankings_of_three_answers():
    assert parse("Assistant 2 > Assistant 1 = Assistant 3", "order", "robust", n=3).values == [2, 1, 2]
    assert parse("Assistant 1 = Assistant 2 > Assistant 3", "order", "robust", n=3).values == [1, 1, 3]
    assert parse("Assistant 1 > Assistant 2 < Assistant 3", "order", "robust", n=3).values is None  # no one order
    assert competition_ranks([3, 1, 2], [">", ">"], 3) == [2, 3, 1]
    assert parse("Reviewer 2 > Reviewer 1", "order", "robust", role="Reviewer").values == [2, 1]


def test_judge_messages_layout():
    prompt = JudgePrompt("Assistant", "Compare the {num_str} answers, Assistant 1 - Assistant {num}.", "t")
    system, user = prompt.messages("Q?", ["first answer", "second answer"])
    assert system == {"role": "system",
                      "content": "You are a helpful and precise assistant for checking the quality of the answer."}
    assert user["role"] == "user"
    assert user["content"] == ("[Question]\nQ?\n\n[Assistant 1]\nfirst answer\n\n[End of Assistant 1]\n\n"
                               "[Assistant 2]\nsecond answer\n\n[End of Assistant 2]\n\n"
                               "[System]\nCompare the two answers, Assistant 1 - Assistant 2.\n\n")


def test_prompt_files(tmp_path):
    ours = {key: load_prompt(DEFAULT_PROMPTS, key) for key in ("score", "order")}
    assert "1 to 10" in ours["score"].instruction(2) and "first line" in ours["score"].instruction(2)
    assert "'>'" in ours["order"].instruction(2) and "last line" in ours["order"].instruction(2)
    # a file in LLMZoo's layout (several dimensions, a description field) is read as it is
    other = tmp_path / "prompt_all.json"
    other.write_text(json.dumps({"general": {"role": "Assistant", "prompt": "Rank the {num_str} ({num}).",
                                             "description": "x"}}), encoding="utf-8")
    assert load_prompt(other, "general").instruction(2) == "Rank the two (2)."
    with pytest.raises(DataError, match=r"prompt_all.json: record relevance: no such prompt entry \(the file has: "
                                        r"general\)"):
        load_prompt(other, "relevance")
    other.write_text(json.dumps({"general": {"prompt": "Rank {these}."}}), encoding="utf-8")
    with pytest.raises(DataError, match=r"record general, field 'prompt': only \{num\} and \{num_str\}"):
        load_prompt(other, "general")


# -- arithmetic -------------------------------------------------------------------------------------------------------
def _pair(verdict_, model_value=None, baseline_value=None, status="judged", consistent=None, winners=()):
    orders = {f"o{i}": {"winner_position": w, "failure": None} for i, w in enumerate(winners)}
    return {"status": status, "verdict": verdict_, "model_value": model_value, "baseline_value": baseline_value,
            "consistent": consistent, "orders": orders}


def test_ratio_and_win_rates_by_hand():
    assert ratio([8, 6, 7], [9, 9, 6]) == pytest.approx(87.5)  # 21 / 24
    assert ratio([], []) is None
    # 4 wins, 3 ties, 2 losses, 1 unreadable: LLMZoo's share 4/10, wins/(wins+losses) 4/6
    assert win_rates(4, 3, 2, 1) == {"llmzoo_share": pytest.approx(0.4), "beat_rate": pytest.approx(4 / 6)}
    assert win_rates(0, 2, 0, 1) == {"llmzoo_share": 0.0, "beat_rate": None}
    pairs = ([_pair("win", 8, 6, consistent=True, winners=(2, 1))] * 4 + [_pair("tie", 5, 5, consistent=True)] * 2
             + [_pair("tie", 7, 7, consistent=False, winners=(1, 1))] + [_pair("lose", 3, 9, consistent=True)] * 2
             + [_pair(None, status="unreadable"), _pair(None, status="missing")])
    n = summarise(pairs, resamples=0, seed=0)
    assert (n["pairs"], n["judged"], n["unreadable"], n["missing"]) == (11, 9, 1, 1)
    assert (n["wins"], n["ties"], n["losses"]) == (4, 3, 2)
    assert n["llmzoo_share"] == pytest.approx(4 / 10) and n["beat_rate"] == pytest.approx(4 / 6)
    assert n["inconsistent"] == 1 and n["disagreement_rate"] == pytest.approx(1 / 9)
    # model 4*8 + 2*5 + 7 + 2*3 = 55; baseline 4*6 + 2*5 + 7 + 2*9 = 59
    assert n["ratio"] == pytest.approx(100 * 55 / 59) and n["ratio_ci"] is None
    assert n["mean_model"] == pytest.approx(55 / 9) and n["mean_baseline"] == pytest.approx(59 / 9)
    assert (n["first_shown_wins"], n["second_shown_wins"], n["position_ties"]) == (6, 4, 0)


def test_bootstrap_interval():
    # two pairs (8 vs 4) and (3 vs 6): a resample is both of one (200 or 50) or one of each (110), each sum with
    # probability >= 1/4, so the 2.5th and 97.5th percentiles are the extremes exactly
    assert ratio([8, 3], [4, 6]) == pytest.approx(110)
    assert bootstrap_interval([8, 3], [4, 6], resamples=4000, seed=1) == [50.0, 200.0]
    data = ([7, 8, 6, 9, 5, 8, 7, 6], [8, 8, 7, 7, 6, 9, 8, 7])
    first = bootstrap_interval(*data, resamples=500, seed=3, stream="smol/language/en")
    assert first == bootstrap_interval(*data, resamples=500, seed=3, stream="smol/language/en")  # seeded
    assert first != bootstrap_interval(*data, resamples=500, seed=4, stream="smol/language/en")
    assert first[0] < ratio(*data) < first[1]
    assert bootstrap_interval([6, 6, 6], [8, 8, 8], resamples=200, seed=0) == [75.0, 75.0]
    assert bootstrap_interval([], [], resamples=200, seed=0) is None


@pytest.mark.parametrize("verdicts,expected", [
    (["win", "win"], ("win", True)),
    (["lose", "lose"], ("lose", True)),
    (["tie", "tie"], ("tie", True)),
    (["win", "lose"], ("tie", False)),  # the judge preferred whichever answer came first (or second)
    (["win", "tie"], ("tie", False)),
    (["tie", "lose"], ("tie", False)),
    (["win"], ("win", None)),  # --orders 1: nothing to check
])
def test_both_orders_rule(verdicts, expected):
    assert combine_orders(verdicts) == expected


def test_pairs_from_replies():
    from src.judge.questions import Question

    q = Question("en/1", 1, "Q?", "symptoms", "en", "f", 0)
    # the model is Assistant 2 in baseline-first, Assistant 1 in model-first: 9 for it both times
    agree = build_pair(q, "m", {"baseline-first": "6 9", "model-first": "9 5"}, "score", "robust", "Assistant")
    assert agree["status"] == "judged" and agree["verdict"] == "win" and agree["consistent"] is True
    assert (agree["model_value"], agree["baseline_value"]) == (9, 5.5)
    assert [o["winner_position"] for o in agree["orders"].values()] == [2, 1]
    # the first-shown answer wins both times: a position effect, counted as a tie
    biased = build_pair(q, "m", {"baseline-first": "Assistant 1 > Assistant 2", "model-first":
                                 "Assistant 1 > Assistant 2"}, "order", "robust", "Assistant")
    assert biased["verdict"] == "tie" and biased["consistent"] is False
    assert (biased["model_value"], biased["baseline_value"]) == (7.5, 7.5)  # LLMZoo's 10/rank: (10 + 5) / 2
    half = build_pair(q, "m", {"baseline-first": "6 9", "model-first": "no scores"}, "score", "robust", "Assistant")
    assert half["status"] == "unreadable" and half["verdict"] is None
    waiting = build_pair(q, "m", {"baseline-first": "6 9", "model-first": None}, "score", "robust", "Assistant")
    assert waiting["status"] == "missing"
    one = build_pair(q, "m", {"baseline-first": "7 7"}, "score", "robust", "Assistant")
    assert one["verdict"] == "tie" and one["consistent"] is None
    assert (verdict(2, 1), verdict(1, 2), verdict(5, 5)) == ("win", "lose", "tie")


# -- questions --------------------------------------------------------------------------------------------------------
def _run(argv, capsys):
    from src.common import cli
    from util.judge import main

    code = cli.run(main, argv)
    return code, capsys.readouterr().err.strip()


def _questions_file(tmp_path, rows, name="questions.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


MODELS = ["--baseline", "a=models/none", "--model", "b=models/none", "--judge-base", "http://127.0.0.1:9"]


@pytest.mark.parametrize("row,where", [
    ({"id": 1, "label": "x"}, "record 1, field 'query': missing"),
    ({"id": True, "query": "q"}, "record 1, field 'id': must be an integer or a non-empty string, got True"),
    ({"query": "q"}, "record 1, field 'id': missing"),
    ({"id": 2, "query": "   "}, "record 1, field 'query': must be a non-empty string"),
    ({"id": 2, "query": "q", "label": ""}, "record 1, field 'label': must be a non-empty string"),
    ({"id": 2, "query": "q", "language": "xx"}, "record 1, field 'language': unknown language code 'xx'"),
    ({"id": 1, "query": "again"}, "record 1, field 'id': 1 repeats question en/1"),
    ("{not json", "record line 2: invalid JSON"),
    ([1, 2], "record 1: expected an object with id and query, got list"),
])
def test_a_bad_question_is_one_line_naming_file_record_and_field(tmp_path, capsys, row, where):
    path = _questions_file(tmp_path, [{"id": 1, "query": "What causes anaemia?"}, row], "en_medical.jsonl")
    code, err = _run(["--questions", str(path), *MODELS, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith(f"error: {path}: {where}") and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing written before the input is known good


def test_language_from_llmzoo_file_names(tmp_path):
    from src.judge.questions import read_questions

    en = _questions_file(tmp_path, [{"id": 1, "label": "generic", "query": "q1"}, {"id": 2, "query": "q2"}],
                         "en100.jsonl")
    zh = _questions_file(tmp_path, [{"id": 1, "label": "generic", "query": "问题"}], "zh100.jsonl")
    questions, skipped = read_questions([en, zh])
    assert [q.key for q in questions] == ["en/1", "en/2", "zh/1"]  # ids repeat across languages, keys do not
    assert questions[1].label == "unlabelled"
    odd = _questions_file(tmp_path, [{"id": 1, "query": "q"}], "questions.jsonl")
    with pytest.raises(DataError, match=r"record 0, field 'language': missing, and the file name 'questions.jsonl' "
                                        r"does not start with a language code"):
        read_questions([odd])


def test_shipped_questions_limit_and_skipped_labels():
    from src.judge.questions import DEFAULT_QUESTIONS, read_questions

    questions, skipped = read_questions([DEFAULT_QUESTIONS])
    by_language = {}
    for q in questions:
        by_language.setdefault(q.language, set()).add(q.label)
    assert set(by_language) >= {"en", "zh", "es", "fr", "ar"} and all(len(v) >= 10 for v in by_language.values())
    assert not skipped
    few, skipped = read_questions([DEFAULT_QUESTIONS], limit=2, skip_labels=("symptoms",))
    assert len(few) == 2 * len(by_language) and all(q.label != "symptoms" for q in few)
    assert skipped == {"label symptoms (--skip-label)": len(by_language),
                       "over --limit": len(questions) - 3 * len(by_language)}


def test_bad_flags_are_one_line(tmp_path, capsys):
    code, err = _run([*MODELS[:4], "--out", str(tmp_path)], capsys)  # no judge
    assert code == 2 and err.startswith("error: --judge-base: required")
    code, err = _run([*MODELS, "--limit", "0"], capsys)
    assert code == 2 and err == "error: --limit: must be at least 1, got 0"
    code, err = _run([*MODELS, "--model", "a=models/other"], capsys)
    assert code == 2 and "two models are named 'a'" in err


# -- answers: resume ---------------------------------------------------------------------------------------------------
def test_answers_are_appended_and_reused(tiny_model_dir, tmp_path):
    from src.judge.answer import Generation, answer_all, parse_spec
    from src.judge.budget import Budget
    from src.judge.questions import read_questions

    path = _questions_file(tmp_path, [{"id": i, "query": f"What is sign {i} of anaemia?", "language": "en"}
                                      for i in range(3)])
    questions, _ = read_questions([path])
    spec = parse_spec(f"tiny={tiny_model_dir}", "--model")
    gen = Generation(max_new_tokens=3, temperature=0.0, top_p=0.7, repetition_penalty=1.0, seed=1, format=None)
    out = tmp_path / "answers.jsonl"
    first, counts = answer_all([spec], questions, gen, out, Budget(None), progress=False)
    assert counts == {"reused": 0, "new": 3, "left": 0} and len(out.read_text().splitlines()) == 3
    assert all(r["new_tokens"] <= 3 and r["fingerprint"] for r in first.values())
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:20])  # a run cut short mid-write
    again, counts = answer_all([spec], questions, gen, out, Budget(None), progress=False)
    assert counts["reused"] == 2 and counts["new"] == 1
    assert {k: r["answer"] for k, r in again.items()} == {k: r["answer"] for k, r in first.items()}  # greedy
    changed = _questions_file(tmp_path, [{"id": 0, "query": "What is sign 0 of anaemia, exactly?", "language": "en"}])
    _, counts = answer_all([spec], read_questions([changed])[0], gen, out, Budget(0), progress=False)
    assert counts == {"reused": 0, "new": 1, "left": 0}  # a new question text is answered again; in-process: free
    served = parse_spec(f"srv={tiny_model_dir}@http://127.0.0.1:9", "--model")
    assert served.api_base == "http://127.0.0.1:9" and served.name == "srv"
    budget = Budget(0)
    _, counts = answer_all([served], questions, gen, out, budget, progress=False)
    assert counts == {"reused": 0, "new": 0, "left": 3} and budget.spent  # no request was sent


def test_a_post_moe_checkpoint_answers_in_process(tiny_model_dir, tmp_path):
    """The chat code reads a Post-MoE folder's config through the project's loader (transformers cannot)."""
    from src.judge.answer import Generation, _answer_model, parse_spec
    from src.judge.questions import Question
    from src.models import moe
    from src.models.loading import load_model, load_tokenizer

    ckpt = moe.save_moe(moe.upcycle(load_model(tiny_model_dir), num_experts=2, top_k=1, moe_layers=1),
                        load_tokenizer(tiny_model_dir), tmp_path / "moe")
    gen = Generation(max_new_tokens=2, temperature=0.0, top_p=0.7, repetition_penalty=1.0, seed=1, format=None)
    q = Question("en/1", 1, "What causes anaemia?", "symptoms", "en", "f", 0)
    [(_, row)] = list(_answer_model(parse_spec(f"moe={ckpt}", "--model"), [q], gen, progress=False))
    assert row["model"] == "moe" and row["new_tokens"] <= 2 and row["finish_reason"] in ("stop", "length")
