"""MMedBench through the pipeline: step 4 on step 1's records (generation to the end, both parsings, the mean of six,
rationale similarity), the scores worked out by hand, step 2's training records, the record contract, and
scripts/mmedbench_eval.sh end to end on a tiny model."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from src.common.errors import DataError, UsageError
from src.evaluate import eval as step4
from src.evaluate.mmedlm_scoring import format_table, score
from src.prepare import mmedbench
from tests.conftest import ROOT, SAMPLE

MMED = SAMPLE / "mmedbench"


@pytest.fixture(scope="module")
def step1_out(tmp_path_factory, tiny_model_dir):
    from src.prepare import bench_prompts

    out = tmp_path_factory.mktemp("mmed_step1")
    assert bench_prompts.main(["--bench", str(MMED), "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    return out


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_step4_generates_whole_answers_and_scores_six_languages(step1_out, tiny_model_dir, tmp_path, monkeypatch):
    from src.evaluate import predict

    seen = []
    real = predict.predict_records

    def spy(backend, tokenizer, records, config, **kwargs):
        seen.append(config.stop_at_line)
        return real(backend, tokenizer, records, config, **kwargs)

    monkeypatch.setattr(predict, "predict_records", spy)
    out = tmp_path / "res"
    base = ["--model", str(tiny_model_dir), "--input", str(step1_out / "test.jsonl"), "--out", str(out),
            "--limit-per-source", "2", "--max-new-tokens", "6", "--no-progress"]
    assert step4.main(base) == 0
    assert seen == [False]  # no stop at the first line: the rationale and the answer after it are read
    run = json.loads((out / "run.json").read_text())
    assert (run["settings"]["max_new_tokens"], run["settings"]["parsing"]) == (6, "robust")
    preds = _lines(out / "predictions.jsonl")
    assert len(preds) == 12 and all("reference_correct" in p and "rationale" in p for p in preds)
    result = json.loads((out / "score.json").read_text())
    assert result["benchmark"] == "mmedbench" and result["items"] == 12
    assert list(result["languages"]) == list(mmedbench.LANGUAGES.values())
    accs = [e["accuracy"] for e in result["languages"].values()]
    assert result["mean_of_six"]["accuracy"] == pytest.approx(sum(accs) / 6, abs=1e-6)
    assert result["mean_of_six"]["missing"] == []
    # the first two test items of every language have doctor-passed rationales: 12 scored, BLEU-1 and ROUGE-1
    assert result["rationale"]["items_scored"] == 12 and set(result["rationale"]["metrics"]) == {"bleu1", "rouge1"}
    assert "mean of six" in (out / "score.md").read_text()

    # another parsing or rationale metric rescores the same predictions: nothing is generated again
    seen.clear()
    assert step4.main(base + ["--parsing", "reference", "--rationale-metric", "reference"]) == 0
    assert seen == []
    again = json.loads((out / "score.json").read_text())
    assert again["parsing"] == "reference" and set(again["rationale"]["metrics"]) == {"bleu4", "rougeL"}
    assert _lines(out / "predictions.jsonl") == preds


def test_step4_refuses_what_mmedbench_cannot_take(step1_out, tiny_model_dir, tmp_path):
    base = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    mmed = ["--input", str(step1_out / "test.jsonl")]
    with pytest.raises(UsageError, match="--mode: MMedBench answers are generated"):
        step4.main(base + mmed + ["--mode", "loglik"])
    with pytest.raises(UsageError, match="--exclude-source: is for XMedBench sources"):
        step4.main(base + mmed + ["--exclude-source", "mmedbench-en"])
    recs = _lines(step1_out / "test.jsonl")
    xmed = {"id": "x1", "source": "headqa", "language": "es", "prompt": "P", "answer": "B", "letters": ["A", "B"]}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps(r) for r in (recs[0], xmed)) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match="--input: mixes MMedBench and XMedBench records"):
        step4.main(base + ["--input", str(mixed)])
    only_x = tmp_path / "x.jsonl"
    only_x.write_text(json.dumps(xmed) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match="--parsing: is for MMedBench records only"):
        step4.main(base + ["--input", str(only_x), "--parsing", "reference"])


def _rec(rid, lang, answers, passed=True, rationale="The patient has fever.", with_rationale=True):
    return {"id": rid, "language": lang, "answers": answers, "answer": ",".join(answers), "rationale": rationale,
            "human_check_passed": passed, "with_rationale": with_rationale}


def _pred(rid, correct, ref_correct, letter="B", rationale="The patient has a fever.", raw=""):
    return {"id": rid, "correct": correct, "reference_correct": ref_correct, "letter": letter, "rule": "answer_marker",
            "stop": "eos", "rationale": rationale, "raw": raw}


def test_scores_by_hand():
    records = [_rec("e1", "en", ["B"]), _rec("e2", "en", ["A", "C"], passed=False), _rec("e3", "en", ["D"]),
               _rec("z1", "zh", ["B"], rationale="患者出现发热和咳嗽。")]
    preds = [_pred("e1", True, True), _pred("e2", True, False), _pred("e3", False, False, letter=None, rationale=""),
             _pred("z1", False, True, rationale="患者出现高热，考虑肺炎。")]
    result = score(preds, records, "robust", "readme")
    en, zh = result["languages"]["en"], result["languages"]["zh"]
    assert (en["right"], en["total"], en["accuracy"], en["reference"], en["no_answer"]) == (2, 3, 0.666667, 0.333333, 1)
    assert (zh["accuracy"], zh["reference"]) == (0.0, 1.0)
    six = result["mean_of_six"]
    assert six["accuracy"] == pytest.approx((2 / 3 + 0) / 2, abs=1e-6) and six["reference"] == pytest.approx(
        (1 / 3 + 1) / 2, abs=1e-6)
    assert six["missing"] == ["ja", "fr", "ru", "es"]
    rat = result["rationale"]
    # en: e1 scored (BLEU-1 of "The patient has a fever." against "The patient has fever." = 5/6 matched words and
    # no brevity penalty: 5/6), e3 scored with an empty rationale (0), e2 not passed by a doctor: left out
    assert rat["languages"]["en"]["items"] == 2 and rat["languages"]["en"]["empty_candidates"] == 1
    assert rat["languages"]["en"]["bleu1"]["mean"] == pytest.approx((5 / 6 + 0) / 2, abs=1e-6)
    assert rat["languages"]["zh"]["bleu1"]["mean"] == pytest.approx(3 / 7, abs=1e-6)  # tests/test_rationale_metrics
    assert rat["average"]["bleu1"] == pytest.approx(((5 / 6) / 2 + 3 / 7) / 2, abs=1e-6)
    assert rat["left_out"] == {"not_passed_by_a_doctor": 1}
    assert score(preds, records, "reference", "readme")["mean_of_six"]["accuracy"] == six["reference"]
    table = format_table(result)
    assert "| English (en) | 3 | 2 | 66.67 |" in table and "missing: ja, fr, ru, es" in table
    no_rationale = [{**r, "with_rationale": False} for r in records]
    assert score(preds, no_rationale)["rationale"] is None
    assert "the prompts asked for the answer only" in format_table(score(preds, no_rationale))


@pytest.mark.parametrize("change,field,message", [
    ({"answers": ["A", "A"]}, "answers", "must be a list of distinct option letters"),
    ({"answers": ["A", "F"], "answer": "A,F"}, "answers", r"\['A', 'F'\] are not all among the letters"),
    ({"answer": "C,A"}, "answer", "must be the answers joined by ','"),
    ({"task": "other"}, "task", "unknown task 'other'"),
    ({"human_check_passed": "yes"}, "human_check_passed", "must be true or false"),
    ({"rationale": None}, "rationale", "must be a string"),
])
def test_record_contract_for_several_answers(step1_out, change, field, message):
    from src.evaluate.records import check_record

    rec = next(r for r in _lines(step1_out / "test.jsonl") if r["answer"] == "A,C")
    assert check_record(rec, "t.jsonl", 1) is rec  # "A,C" is no single letter, yet valid here
    with pytest.raises(DataError, match=f"t.jsonl: record 4, field '{field}': {message}"):
        check_record({**rec, **change}, "t.jsonl", 4)


def test_lm_eval_export_refuses_mmedbench_records(step1_out, tmp_path):
    from util.export_lm_eval import export

    with pytest.raises(DataError, match="field 'task': 'mmedbench' records are generated and read by step 4"):
        export(step1_out / "test.jsonl", tmp_path / "tasks")


def _documents(row):
    """(text, loss text) of every packed document of a step 2 row."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["position_ids"])]
    for a, b in zip(starts, starts[1:]):
        yield row["input_ids"][a:b], [t for t, lab in zip(row["input_ids"][a:b], row["labels"][a:b]) if lab != -100]


def test_step2_trains_on_every_item_twice_with_loss_on_the_target(tmp_path, tiny_model_dir, smollm2_tokenizer):
    from datasets import load_from_disk

    from src.prepare import train_data

    out = tmp_path / "s2"
    train_data.main(["--data", str(MMED), "--model", str(tiny_model_dir), "--out", str(out), "--format", "raw",
                     "--prompt-style", "mmedlm", "--max-seq-len", "1024", "--num-proc", "1"])
    mix = json.loads((out / "mixture.json").read_text())
    for code in mmedbench.LANGUAGES.values():
        src = mix["by_source"][f"mmedbench_{code}"]
        assert (src["records"], src["entries"], src["rule"], src["kind"]) == (12, 24, "mmedbench_*", "sft")
    assert mix["settings"]["prompt_style"] == "mmedlm"
    eos = smollm2_tokenizer.eos_token
    targets = []
    for row in load_from_disk(str(out / "train")):
        for ids, loss in _documents(row):
            text, target = smollm2_tokenizer.decode(ids), smollm2_tokenizer.decode(loss)
            assert text.startswith("Below is an instruction") and text.endswith(target)  # raw: no chat markup
            assert text[: len(text) - len(target)].endswith("### Response:")  # the loss starts right after it
            targets.append(target)
    assert len(targets) == 144 and all(t.endswith(f" IS CORRECT.{eos}") for t in targets)
    with_rationale = [t for t in targets if t.startswith("###Rationale: ")]
    assert len(with_rationale) == 72 and sum(t.startswith("###Answer: OPTION ") for t in targets) == 72
    assert "###Answer: OPTION B,D IS CORRECT." + eos in targets  # a French item with two answers


def test_step2_bad_mmedbench_records(tmp_path, tiny_model_dir):
    from src.prepare import train_data

    train = tmp_path / "Train"
    train.mkdir()
    good = json.loads((MMED / "Train" / "English.jsonl").read_text(encoding="utf-8").splitlines()[0])
    lines = [good, {**good, "answer_idx": "Z"}, {**good, "question": good["question"] + " (2)", "rationale": ""}]
    (train / "English.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    args = ["--data", str(tmp_path), "--model", str(tiny_model_dir), "--max-seq-len", "1024", "--num-proc", "1"]
    with pytest.raises(DataError, match="English.jsonl: record 2, field 'answer_idx': 'Z': 'Z' is not an option"):
        train_data.main(args + ["--out", str(tmp_path / "a")])
    train_data.main(args + ["--out", str(tmp_path / "b"), "--on-error", "skip"])
    rejects = _lines(tmp_path / "b" / "train_rejects.jsonl")
    assert [(r["index"], r["field"]) for r in rejects] == [("English.jsonl:2", "answer_idx"),
                                                           ("English.jsonl:3:rationale", "rationale")]
    mix = json.loads((tmp_path / "b" / "mixture.json").read_text())
    assert mix["by_source"]["mmedbench_en"]["records"] == 3  # item 1 twice, item 3 answer only
    assert mix["totals"]["rejected"] == 2


def test_script_runs_steps_0_1_4(tmp_path, tiny_model_dir):
    env = {**os.environ, "MODEL": str(tiny_model_dir), "DATA_DIR": str(tmp_path / "raw"),
           "PREP": str(tmp_path / "prep"), "RESULTS": str(tmp_path / "res"), "STYLE": "mmedlm", "FORMAT": "raw",
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "mmedbench_eval.sh"), "--limit-per-source", "1",
                        "--max-new-tokens", "4", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "raw" / "sample" / "mmedbench" / "Test" / "English.jsonl").is_file()  # step 0's copy
    recs = _lines(tmp_path / "prep" / "test.jsonl")
    assert recs[0]["prompt"].startswith("Below is an instruction") and recs[0]["prompt_style"] == "mmedlm"
    result = json.loads((tmp_path / "res" / "score.json").read_text())
    assert result["items"] == 6 and len(result["languages"]) == 6
    assert "mean of six" in r.stdout
