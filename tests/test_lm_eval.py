"""lm-evaluation-harness agreement: on real XMedBench items, the harness (run in-process on the task folder that
util/export_lm_eval.py writes) chooses the same letter as step 4's ``--mode loglik`` on every item."""
import json

import pytest
import torch

from src.common.io import iter_jsonl
from src.evaluate import eval as step4
from src.prepare import bench_prompts
from tests.conftest import SAMPLE
from util import export_lm_eval

PER_SOURCE = 3
SOURCES = ("mmlu-medical", "cmexam", "medqa-mcmle", "headqa", "frenchmedmcqa", "mmlu-medical-ar", "mmlu-medical-hi",
           "KorMedMCQA")  # 7 languages


def _pick(raw: list[dict], counts: dict[str, int]) -> list[dict]:
    """The shortest ``counts[source]`` items of each source (short prompts keep both scorers' runs short on a CPU)."""
    out = []
    for source, n in counts.items():
        items = [it for it in raw if it["source"] == source]
        out += sorted(items, key=lambda it: len(it["question"]) + len(it["options"]))[:n]
    return out


def test_export_one_row_per_language_scored_as_the_collector_does(tmp_path):
    """A pooled ('micro') or single-source language is one task; a multi-source 'macro' language (en, zh) is a group
    over one task per source, averaged unweighted; the group xmedbench pools every item."""
    rows = [("headqa", "es"), ("headqa", "es"), ("mmlu-medical-ar", "ar"), ("medqa-usmle", "en"),
            ("medqa-usmle", "en"), ("mmlu-medical", "en"), ("MMLU_anatomy_de", "de"),
            ("MMLU_college_medicine_de", "de")]
    recs = [{"id": f"x{i}", "source": src, "language": lang, "prompt": "P", "answer": "B", "letters": ["A", "B"],
             "answer_phrase": "The correct answer is "} for i, (src, lang) in enumerate(rows)]
    inp = tmp_path / "test.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    rep = export_lm_eval.export(inp, tmp_path / "tasks")
    assert rep["by_language"] == {"ar": 1, "de": 2, "en": 3, "es": 2}
    assert rep["tasks"] == ["xmedbench_ar", "xmedbench_de", "xmedbench_en_medqa-usmle", "xmedbench_en_mmlu-medical",
                            "xmedbench_es"]
    assert rep["language_rows"] == ["xmedbench_ar", "xmedbench_de", "xmedbench_en", "xmedbench_es"]

    def config(name):
        return json.loads((tmp_path / "tasks" / f"{name}.yaml").read_text())

    en, top = config("xmedbench_en"), config("xmedbench")
    assert en["task"] == ["xmedbench_en_medqa-usmle", "xmedbench_en_mmlu-medical"]
    assert en["aggregate_metric_list"][0]["weight_by_size"] is False  # mean of source accuracies
    assert top["task"] == rep["language_rows"] and top["aggregate_metric_list"][0]["weight_by_size"] is True
    assert [d["id"] for d in iter_jsonl(tmp_path / "tasks" / "data" / "de.jsonl")] == ["x6", "x7"]  # pooled
    (doc,) = iter_jsonl(tmp_path / "tasks" / "data" / "ar.jsonl")
    assert doc["query"] == "PThe correct answer is (" and doc["choices"] == ["A", "B"] and doc["gold"] == 1
    with pytest.raises(SystemExit, match="already holds"):
        export_lm_eval.export(inp, tmp_path / "tasks")
    # --overwrite leaves no task of the earlier export behind (--tasks xmedbench_ar would score old items)
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs if r["language"] != "ar"), encoding="utf-8")
    export_lm_eval.export(inp, tmp_path / "tasks", overwrite=True)
    assert not (tmp_path / "tasks" / "xmedbench_ar.yaml").exists()
    assert not (tmp_path / "tasks" / "data" / "ar.jsonl").exists()
    assert config("xmedbench")["task"] == ["xmedbench_de", "xmedbench_en", "xmedbench_es"]
    # a source name is made safe for file and task names
    odd = [{**recs[3], "id": "y1", "source": "my/usmle"}, {**recs[5], "id": "y2"}]
    inp.write_text("".join(json.dumps(r) + "\n" for r in odd), encoding="utf-8")
    rep = export_lm_eval.export(inp, tmp_path / "odd")
    assert rep["tasks"] == ["xmedbench_en_mmlu-medical", "xmedbench_en_my_usmle"]
    assert (tmp_path / "odd" / "data" / "en_my_usmle.jsonl").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**recs[0], "answer": "C"}) + "\n", encoding="utf-8")
    with pytest.raises(Exception, match="bad.jsonl.*record 1.*answer"):
        export_lm_eval.export(bad, tmp_path / "t2")
    bad.write_text(json.dumps({**recs[0], "language": "xx"}) + "\n", encoding="utf-8")
    with pytest.raises(Exception, match="bad.jsonl.*record 1.*language.*unknown language code 'xx'"):
        export_lm_eval.export(bad, tmp_path / "t3")


def test_lm_eval_chooses_our_loglik_letters(shared_data, smollm2_dir, tmp_path):
    """On real items (3 of each of 8 sources, 7 languages)."""
    raw = json.loads((shared_data / "bench_test.json").read_text(encoding="utf-8"))
    _check_agreement(_pick(raw, dict.fromkeys(SOURCES, PER_SOURCE)), smollm2_dir, tmp_path, min_items=24,
                     min_languages=6)


def test_lm_eval_agrees_on_the_embedded_sample(smollm2_dir, tmp_path):
    """On the shipped sample (the shortest item of each of its 17 sources, two of medqa-usmle, 14 languages, a shot
    from its dev file): checked also where ../shared is absent, and in the languages ../shared lacks; English's row
    (sources of 2, 1 and 1 items) is the mean of its source accuracies, not the pooled share."""
    raw = json.loads((SAMPLE / "bench_test.json").read_text(encoding="utf-8"))
    counts = {**dict.fromkeys(sorted({it["source"] for it in raw}), 1), "medqa-usmle": 2}  # en: sources of 2, 1, 1
    _check_agreement(_pick(raw, counts), smollm2_dir, tmp_path, min_items=18, min_languages=14,
                     dev=SAMPLE / "bench_dev.json")


def _check_agreement(picked: list[dict], smollm2_dir, tmp_path, min_items: int, min_languages: int,
                     dev=None) -> None:
    """Step 1 (paper style, 1 shot, from ``dev`` or else the other picked items of the source) on ``picked``; step 4
    --mode loglik and lm-eval on the exported task folder must choose the same letter, with log-likelihoods within
    2e-3, and give the same per-language accuracy."""
    import lm_eval  # a test requirement (run_tests.sh installs it): missing, the test fails rather than skips
    from lm_eval.tasks import TaskManager

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(picked, ensure_ascii=False), encoding="utf-8")
    data = tmp_path / "step1"
    # Without a dev file the shots are the other picked items of the source: short exemplars keep the run short.
    assert bench_prompts.main(["--bench", str(bench), "--model", str(smollm2_dir), "--out", str(data), "--shots", "1",
                          "--prompt-style", "paper"] + (["--dev", str(dev)] if dev else [])) == 0
    records = list(iter_jsonl(data / "test.jsonl"))
    assert len(records) >= min_items and len({r["language"] for r in records}) >= min_languages

    out = tmp_path / "ours"
    assert step4.main(["--model", str(smollm2_dir), "--input", str(data / "test.jsonl"), "--out", str(out),
                       "--mode", "loglik", "--no-progress", "--threads", str(torch.get_num_threads())]) == 0
    ours = {p["id"]: p for p in iter_jsonl(out / "predictions.jsonl")}

    tasks = tmp_path / "tasks"
    rep = export_lm_eval.export(data / "test.jsonl", tasks)
    res = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(smollm2_dir), "dtype": "float32"},
                                  tasks=["xmedbench"], num_fewshot=0, batch_size=1, device="cpu",
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    theirs = {}
    for samples in res["samples"].values():
        for s in samples:
            lls = [float(r[0]) for r in s["filtered_resps"]]
            theirs[s["doc"]["id"]] = dict(zip(s["doc"]["choices"], lls))
    assert set(theirs) == set(ours)

    differ = []
    for item_id, pred in ours.items():
        ll = theirs[item_id]
        letter = max(ll, key=ll.get)
        gap = max(abs(ll[L] - pred["scores"][L]) for L in ll)
        if letter != pred["letter"] or gap > 2e-3:
            differ.append(f"{item_id}: lm-eval {letter} {ll}, ours {pred['letter']} {pred['scores']}")
    print(f"{len(ours)} items, {len(differ)} differ")
    assert not differ, "\n".join(differ)
    # Every language row is the language's score in step 4's score.json, and xmedbench its item accuracy.
    score = json.loads((out / "score.json").read_text(encoding="utf-8"))
    for row in rep["language_rows"]:
        lang = row.removeprefix("xmedbench_")
        assert res["results"][row]["acc,none"] == pytest.approx(score["languages"][lang]["accuracy"], abs=1e-6), row
    assert res["results"]["xmedbench"]["acc,none"] == pytest.approx(score["accuracy_items"], abs=1e-6)
