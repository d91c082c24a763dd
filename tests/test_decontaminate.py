"""Decontamination: the leak rule (whole question, or >= 64 shared characters), exactly; the script's outputs."""
from __future__ import annotations

import json
import random

import pytest

from src.common import cli
from src.common.io import iter_jsonl
from src.prepare import decontaminate as dc
from src.prepare.leak_index import BenchIndex, normalise
from src.prepare.records import read_records


def words(rng: random.Random, n: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> str:
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))) for _ in range(n))


@pytest.fixture(scope="module")
def bench_texts():
    rng = random.Random(7)
    return [words(rng, 40), words(rng, 25), "Osteoclasts", "下列哪项是肾病综合征的表现", "NK", words(rng, 12)]


def first_leaks(questions, texts, min_chars=64):
    return BenchIndex([normalise(q) for q in questions], min_chars).scan([normalise(t) for t in texts])


def test_64_found_63_not(bench_texts):
    q = normalise(bench_texts[0])
    rng = random.Random(1)
    pad = words(rng, 20, "0123456789")  # digits never occur in the bench words: no accidental extension
    found = first_leaks(bench_texts, [f"{pad} {q[10:74]} {pad}", f"{pad} {q[10:73]} {pad}", q[:63]])
    assert set(found) == {0}
    # the span is the whole shared run (here with the spaces around it, which the bench has too)
    assert found[0].rule == "overlap" and found[0].span.strip() == q[10:74] and found[0].item == 0
    assert first_leaks(bench_texts, [f"{pad} {q[3:150]} {pad}"])[0].span.strip() == q[3:150]


def cut(q: str, n: int) -> str:
    """n characters of q with no space at either end (normalisation would strip it)."""
    i = next(i for i in range(len(q) - n) if q[i] != " " and q[i + n - 1] != " ")
    return q[i:i + n]


def test_min_chars_flag(bench_texts):
    q = normalise(bench_texts[0])
    assert set(first_leaks(bench_texts, [cut(q, 40), cut(q, 39)], min_chars=40)) == {0}


def test_whole_question(bench_texts):
    texts = ["see Osteoclasts here", "问：下列哪项是肾病综合征的表现？", "an NK cell", "Osteoclast", "下列哪项是肾病综合征"]
    found = first_leaks(bench_texts, texts)
    assert {t: f.item for t, f in found.items()} == {0: 2, 1: 3, 2: 4}
    assert all(f.rule == "whole_question" for f in found.values())
    # with a floor on the question length, "NK" (2 characters) no longer counts; longer questions still do
    floored = BenchIndex([normalise(q) for q in bench_texts], min_question_chars=3).scan(texts)
    assert {t: f.item for t, f in floored.items()} == {0: 2, 1: 3}
    # a question of 64 characters or more, contained whole, is an overlap of its full length
    long_q = normalise(bench_texts[0])
    assert first_leaks(bench_texts, ["x " + long_q + " y"])[0].span == long_q


def test_whitespace_and_case(bench_texts):
    q = normalise(bench_texts[0])[:80]
    spaced = q.replace(" ", " \n\t ", 5).replace(" ", "  ")
    assert set(first_leaks(bench_texts, [spaced])) == {0}
    upper = q.upper()
    assert first_leaks(bench_texts, [upper]) == {}
    index = BenchIndex([normalise(t, fold_case=True) for t in bench_texts])
    assert set(index.scan([normalise(upper, fold_case=True)])) == {0}


def naive_leak(questions: list[str], text: str, m: int) -> bool:
    for q in questions:
        if len(q) < m:
            if q in text:
                return True
        elif any(q[i:i + m] in text for i in range(len(q) - m + 1)):
            return True
    return False


def test_agrees_with_the_definition_on_random_near_misses():
    # small alphabet and pieces cut from the bench at every length around the threshold: many near misses
    rng = random.Random(3)
    questions = [normalise(words(rng, rng.randint(2, 30), "abcd")) for _ in range(60)]
    texts = []
    for _ in range(400):
        q = rng.choice(questions)
        n = rng.choice([rng.randint(1, 20), 15, 16, 17])
        i = rng.randint(0, max(0, len(q) - n))
        texts.append(words(rng, rng.randint(0, 4), "xyz") + " " + q[i:i + n] + " " + words(rng, 3, "xyz"))
    m = 16
    found = BenchIndex(questions, m).scan(texts)
    expected = {t for t, text in enumerate(texts) if naive_leak(questions, text, m)}
    assert set(found) == expected
    assert 50 < len(expected) < 380  # both kinds are well represented
    for t, leak in found.items():  # every reported span really is in both texts
        assert leak.span in texts[t]
        assert leak.span in questions[leak.item]


def test_no_false_positives_on_clean_text(bench_texts):
    rng = random.Random(5)
    clean = [words(rng, 200, "0123456789") for _ in range(50)]
    assert first_leaks(bench_texts, clean) == {}


def write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def record(q, a, source="medicalExam_en"):
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "source": source,
            "class": "major"}


def test_script_outputs(tmp_path, bench_texts):
    bench = write(tmp_path / "bench.json", [{"question": q, "options": "(A) a\n(B) b", "answer": "(A)",
                                             "source": f"src{i}"} for i, q in enumerate(bench_texts)])
    q0 = normalise(bench_texts[0])
    records = [record("a clean question", "a clean answer"),
               record("what is it?", "As said: " + q0[5:90].replace(" ", "\n", 3)),  # leak in an answer turn
               record("Osteoclasts", "bone cells", "medicalWiki_en_qa"),
               record("another clean one", "fine")]
    data = write(tmp_path / "train.json", records)
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records[:2]), encoding="utf-8")
    as_dict = write(tmp_path / "dict.json", {"medicalExam_en": [["q", "a"], ["q2", q0]], "general_en": [["x", "y"]]})
    out = tmp_path / "out"
    argv = ["--bench", str(bench), "--data", str(data), "--data", str(jsonl), "--data", str(as_dict), "--out", str(out)]
    assert dc.main(argv) == 0

    kept = json.loads((out / "train.json").read_text(encoding="utf-8"))
    assert kept == [records[0], records[3]]
    assert list(iter_jsonl(out / "more.jsonl")) == [records[0]]
    assert json.loads((out / "dict.json").read_text(encoding="utf-8")) == {"medicalExam_en": [["q", "a"]],
                                                                           "general_en": [["x", "y"]]}
    leaks = list(iter_jsonl(out / "leaks.jsonl"))
    assert [(x["file"].split("/")[-1], x["index"], x["turn"], x["rule"], x["bench_source"]) for x in leaks] == [
        ("train.json", 1, 1, "overlap", "src0"), ("train.json", 2, 0, "whole_question", "src2"),
        ("more.jsonl", 1, 1, "overlap", "src0"), ("dict.json", "medicalExam_en[1]", 1, "overlap", "src0")]
    assert leaks[0]["span"].strip() == q0[5:90].strip() and leaks[0]["bench_question"] == bench_texts[0][:80]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["totals"] == {"read": 9, "kept": 5, "removed": 4, "removed_share": round(4 / 9, 6)}
    assert report["by_source"]["medicalExam_en"] == {"read": 7, "kept": 4, "removed": 3,
                                                     "removed_share": round(3 / 7, 6)}
    assert report["by_source"]["medicalWiki_en_qa"]["removed"] == 1
    assert report["removed_by_rule"] == {"overlap": 3, "whole_question": 1}
    assert [x["removed"] for x in report["inputs"]] == [2, 1, 1]

    # the kept records go through step 2's reader unchanged; an earlier run is not overwritten
    res = read_records([out / "train.json", out / "more.jsonl", out / "dict.json"], tmp_path / "r.arrow")
    assert res.records == 5 and not res.rejects
    assert cli.run(dc.main, argv) == 2
    # the same inputs give the same outputs, with several processes too
    assert dc.main(argv[:-1] + [str(tmp_path / "out2"), "--num-proc", "2"]) == 0
    for name in ("train.json", "more.jsonl", "dict.json", "leaks.jsonl", "report.json"):
        assert (out / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name


def test_raw_text_inputs_are_screened_and_written_back_in_their_format(tmp_path, bench_texts):
    """--data medicalBook_en_text.json (a JSON list of strings) and --text SOURCE=notes.txt (blank-line separated):
    leaked documents removed, kept ones written in the input's format, which step 2 reads back."""
    from src.prepare.records import data_input, iter_text_file, text_input

    bench = write(tmp_path / "bench.json", [{"question": q, "source": f"src{i}"} for i, q in enumerate(bench_texts)])
    q0 = normalise(bench_texts[0])
    docs = ["A clean paragraph about the kidney.", "Leaked:\n" + q0[:80], "Another clean one,\nover two lines."]
    as_list = write(tmp_path / "medicalBook_en_text.json", docs)
    txt = tmp_path / "notes.txt"
    txt.write_text("\n\n".join(["First note.", "It says Osteoclasts are bone cells.", "Last note,\nlong."]) + "\n",
                   encoding="utf-8")
    out = tmp_path / "out"
    assert dc.main(["--bench", str(bench), "--data", str(as_list), "--text", f"medicalWeb_en_text={txt}",
                    "--out", str(out)]) == 0
    assert json.loads((out / as_list.name).read_text(encoding="utf-8")) == [docs[0], docs[2]]
    assert [raw for _, _, raw in iter_text_file(out / "notes.txt")] == ["First note.", "Last note,\nlong."]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["by_source"]["medicalBook_en_text"]["removed"] == 1
    assert report["by_source"]["medicalWeb_en_text"] == {"read": 3, "kept": 2, "removed": 1,
                                                         "removed_share": round(1 / 3, 6)}
    res = read_records([data_input(out / as_list.name), text_input(f"medicalWeb_en_text={out / 'notes.txt'}")],
                       tmp_path / "r.arrow")
    assert res.records == 4 and not res.rejects


def test_bad_bench_item_is_one_clean_error(tmp_path, capsys):
    bench = write(tmp_path / "bench.json", [{"question": "ok", "source": "s"}, {"source": "s"}])
    data = write(tmp_path / "train.json", [record("a", "b")])
    assert cli.run(dc.main, ["--bench", str(bench), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "bench.json: record 1, field 'question'" in capsys.readouterr().err


def test_real_slice_pubmedqa_contexts_are_found(shared_data, tmp_path):
    # the real training slice's medicalPaper_en_qa holds PubMedQA long answers, whose bench questions carry their
    # abstract: the screen finds exactly what the plain method finds (300 records around the start of the PubMedQA part, the PubMedQA test items)
    from src.common.io import iter_json_array

    bench = [x for x in iter_json_array(shared_data / "bench_test.json") if x["source"] == "pubmedqa"]
    screen = dc.Screen(dc.Bench(["test"], len(bench), [normalise(x["question"]) for x in bench],
                                [{"bench_source": x["source"]} for x in bench]))
    records = [r for r in iter_json_array(shared_data / "dataset_train.json")
               if r["source"] == "medicalPaper_en_qa"][2200:2500]
    found = screen.check([[t["value"] for t in r["conversations"]] for r in records])
    expected = baseline_leaks([normalise(x["question"]) for x in bench],
                              [[normalise(t["value"]) for t in r["conversations"]] for r in records])
    assert [f is not None for f in found] == expected
    assert sum(expected) >= 1


def baseline_leaks(questions: list[str], records: list[list[str]], m: int = 64) -> list[bool]:
    """The plain method: a set of every m-character window of the bench, looked up window by window."""
    windows = {q[i:i + m] for q in questions if len(q) >= m for i in range(len(q) - m + 1)}
    short = [q for q in questions if len(q) < m]
    return [any(any(t[i:i + m] in windows for i in range(len(t) - m + 1)) or any(q in t for q in short)
                for t in turns) for turns in records]


def test_step2_decontaminate_against(tmp_path, smollm2_dir, bench_texts):
    from src.prepare import train_data

    q0 = normalise(bench_texts[0])
    bench = write(tmp_path / "bench.json", [{"question": q, "source": f"src{i}"} for i, q in enumerate(bench_texts)])
    data = write(tmp_path / "train.json", [record("clean", "fine"), record("leaky", q0),
                                           record("also clean", "ok", "medicalWiki_en_qa")])
    out = tmp_path / "s2"
    assert train_data.main(["--data", str(data), "--model", str(smollm2_dir), "--out", str(out), "--num-proc", "1",
                            "--decontaminate-against", str(bench)]) == 0
    mix = json.loads((out / "mixture.json").read_text(encoding="utf-8"))
    assert mix["totals"]["records_read"] == 3 and mix["totals"]["records"] == 2 and mix["totals"]["leaked"] == 1
    assert mix["decontamination"]["removed_by_source"] == {"medicalExam_en": 1}
    assert mix["by_source"]["medicalExam_en"]["records"] == 1
    assert [x["index"] for x in iter_jsonl(out / "train_leaks.jsonl")] == [1]
