"""Judged open answers end to end, with a real judge: `transformers serve` of SmolLM2 on a free local port (started and
stopped here). SmolLM2 is no judge, so its replies are mostly unreadable: the tests check the pipeline (files, counts,
unreadable judgments counted and shown, resume, the request budget), not the verdicts."""
import json

import pytest

from conftest import serve
from src.judge.parse import parse
from util.judge import main

CANARY = "sk-test-canary-0123456789"


@pytest.fixture(scope="module")
def judge(smollm2_dir, tmp_path_factory):
    yield from serve(smollm2_dir, tmp_path_factory.mktemp("judge_serve"))


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_end_to_end_on_the_shipped_questions(judge, smollm2_dir, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    out = tmp_path / "judge"
    args = ["--baseline", f"tiny={tiny_model_dir}", "--model", f"smol={smollm2_dir}", "--judge-base",
            judge.base_url, "--limit", "1", "--max-new-tokens", "8", "--judge-max-tokens", "12", "--out", str(out),
            "--no-progress", "--bootstrap", "50"]
    assert main(args) == 0
    report = capsys.readouterr().out
    answers = _rows(out / "answers.jsonl")
    questions = sorted({a["key"] for a in answers})
    assert len(questions) == 5 and {q.split("/")[0] for q in questions} == {"en", "zh", "es", "fr", "ar"}
    assert sorted(a["model"] for a in answers) == ["smol"] * 5 + ["tiny"] * 5
    judgments = _rows(out / "score" / "judgments.jsonl")
    assert sorted((j["key"], j["order"]) for j in judgments) == sorted(
        (q, o) for q in questions for o in ("baseline-first", "model-first"))
    by_key = {(a["model"], a["key"]): a for a in answers}
    for j in judgments:  # the prompt as sent and the raw reply are kept
        system, user = j["messages"]
        query = by_key["smol", j["key"]]["query"]
        assert system["role"] == "system" and user["content"].startswith(f"[Question]\n{query}\n\n")
        shown = [by_key["tiny", j["key"]]["answer"], by_key["smol", j["key"]]["answer"]]
        if j["order"] == "model-first":
            shown.reverse()
        assert f"[Assistant 1]\n{shown[0]}\n\n[End of Assistant 1]\n\n[Assistant 2]\n{shown[1]}\n" in user["content"]
        assert isinstance(j["reply"], str) and j["params"] == {"temperature": 0, "max_tokens": 12}
    results = json.loads((out / "score" / "results.json").read_text())
    unreadable = [j for j in judgments if parse(j["reply"], "score", "robust").values is None]
    assert len(results["unreadable"]) == len(unreadable)  # every unreadable reply is listed, none dropped
    overall = results["models"]["smol"]["overall"]
    assert overall["pairs"] == 5 and overall["judged"] + overall["unreadable"] == 5 and overall["missing"] == 0
    assert overall["wins"] + overall["ties"] + overall["losses"] == overall["judged"]
    assert set(results["models"]["smol"]["languages"]) == {"en", "zh", "es", "fr", "ar"}
    assert results["complete"] and results["counts"]["judgments"] == {"reused": 0, "new": 10, "left": 0}
    assert results["counts"]["answers_per_model"]["tiny"]["answers"] == 5
    md = (out / "score" / "results.md").read_text()
    assert "## smol against tiny" in md and f"## Unreadable judgments: {len(unreadable)}" in md
    assert "Answers: tiny 5 (" in md and "Questions left out: 55 over --limit." in md
    assert len(_rows(out / "score" / "pairs.jsonl")) == 5
    assert "judgments 10 new, 0 reused" in report and "read 5 questions" in report
    for f in out.rglob("*"):  # the key went to the server only
        assert not f.is_file() or CANARY not in f.read_text(encoding="utf-8")
    # another parser re-reads the kept replies: no request, no new answer
    assert main(args + ["--parser", "llmzoo"]) == 0
    assert "answers 0 new, 10 reused; judgments 0 new, 10 reused" in capsys.readouterr().out
    assert json.loads((out / "score" / "results.json").read_text())["settings"]["parser"] == "llmzoo"


def test_served_answers_budget_resume_and_settings(judge, smollm2_dir, tiny_model_dir, tmp_path, capsys):
    questions = tmp_path / "en_one.jsonl"
    questions.write_text(json.dumps({"id": 7, "label": "prevention", "query": "How can I prevent tooth decay?"})
                         + "\n", encoding="utf-8")
    out = tmp_path / "judge"
    args = ["--questions", str(questions), "--baseline", f"tiny={tiny_model_dir}", "--model",
            f"smol={smollm2_dir}@{judge.base_url}", "--judge-base", judge.base_url, "--mode", "order",
            "--max-new-tokens", "6", "--judge-max-tokens", "8", "--out", str(out), "--no-progress"]
    # 2 requests: the served answer and one of the two judgments
    assert main(args + ["--max-requests", "2"]) == 0
    assert "request budget (--max-requests 2) is spent; left: 0 answers, 1 judgments" in capsys.readouterr().out
    assert _rows(out / "answers.jsonl")[1]["model"] == "smol"  # answered by the server
    results = json.loads((out / "order" / "results.json").read_text())
    assert not results["complete"] and results["models"]["smol"]["overall"]["missing"] == 1
    assert main(args) == 0
    assert "answers 0 new, 2 reused; judgments 1 new, 1 reused" in capsys.readouterr().out
    path = out / "order" / "judgments.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:40], encoding="utf-8")  # a run cut short mid-write
    assert main(args) == 0
    assert "judgments 1 new, 1 reused" in capsys.readouterr().out
    assert len(_rows(path)) == 2 and json.loads((out / "order" / "results.json").read_text())["complete"]
    with pytest.raises(ValueError, match="other settings .*max_tokens: 8 -> 16"):
        main(args + ["--judge-max-tokens", "16"])
    assert len(_rows(path)) == 2  # refused before anything was touched
    # --overwrite starts afresh (with no budget left, nothing is asked: only the in-process answer is made)
    assert main(args + ["--judge-max-tokens", "16", "--overwrite", "--max-requests", "0"]) == 0
    assert not path.exists() or not _rows(path)
    assert [a["model"] for a in _rows(out / "answers.jsonl")] == ["tiny"]
    assert json.loads((out / "order" / "run.json").read_text())["settings"]["max_tokens"] == 16
