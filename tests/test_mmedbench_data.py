"""MMedBench's release layout (src/prepare/mmedbench.py): the embedded sample, validation, the hub zip."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from src.common.errors import DataError
from src.prepare import mmedbench
from tests.conftest import SAMPLE

MMED = SAMPLE / "mmedbench"


def test_sample_is_a_valid_release_in_six_languages():
    for split, per_language in (("Test", 5), ("Train", 6)):
        items, rejects = mmedbench.load_split(MMED, split)
        assert rejects == []
        assert [it.language for it in items] == [c for c in mmedbench.LANGUAGES.values() for _ in range(per_language)]
        assert all(it.rationale.strip() for it in items)
        assert len({it.id for it in items}) == len(items)
        assert any(len(it.answers) > 1 for it in items)  # several answers (ja, fr)
    test, _ = mmedbench.load_split(MMED, "Test")
    passed = [it for it in test if it.human_check_passed]
    assert {it.language for it in passed} == set(mmedbench.LANGUAGES.values())  # rationale scores in every language
    assert any(it.human_checked and not it.human_check_passed for it in test)  # checked but not passed
    assert any(not it.human_checked for it in test)
    assert {len(it.options) for it in test} >= {2, 4, 5}  # Russian yes/no items, Spanish 4, others 5


def test_layouts_accepted():
    assert mmedbench.is_release(MMED) and mmedbench.is_release(MMED / "Test")
    assert mmedbench.is_release(MMED / "Test" / "Japanese.jsonl")
    assert not mmedbench.is_release(SAMPLE / "bench_test.json") and not mmedbench.is_release(SAMPLE)
    one = mmedbench.split_files(MMED / "Test" / "Japanese.jsonl", "Test")
    assert one == [MMED / "Test" / "Japanese.jsonl"]
    assert [f.name for f in mmedbench.split_files(MMED, "Train")] == [f"{n}.jsonl" for n in mmedbench.LANGUAGES]
    ja = mmedbench.read_file(MMED / "Test" / "Japanese.jsonl")[0][1]
    assert (ja.answer_idx, ja.answers, ja.answer, ja.language_name) == ("A,C", ("A", "C"), "A,C", "Japanese")


GOOD = {"question": "Q?", "options": {"A": "x", "B": "y", "C": "z"}, "answer_idx": "B", "rationale": "R.",
        "human_checked": True, "human_check_passed": True}


@pytest.mark.parametrize("change,field,message", [
    ({"question": ""}, "question", "missing or not a non-empty string"),
    ({"options": ["x", "y"]}, "options", "expected a mapping letter -> text, got list"),
    ({"options": {"A": "x"}}, "options", "needs at least 2 options, found 1"),
    ({"options": {"A": "x", "b": "y"}}, "options", "option keys must be single letters A-H, got 'b'"),
    ({"options": {"A": "x", "B": ""}}, "options", "option B: expected non-empty text"),
    ({"answer_idx": "D"}, "answer_idx", "'D': 'D' is not an option letter \\(A, B, C\\)"),
    ({"answer_idx": "A,A"}, "answer_idx", "'A,A' repeats a letter"),
    ({"answer_idx": 2}, "answer_idx", "expected a letter or letters joined by ','"),
    ({"rationale": None}, "rationale", "expected a string, got NoneType"),
    ({"human_checked": "yes"}, "human_checked", "expected true or false"),
    ({"human_checked": False}, "human_check_passed", "true while human_checked is false"),
])
def test_defects_name_file_record_and_field(tmp_path, change, field, message):
    f = tmp_path / "French.jsonl"
    f.write_text(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, **change}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"French.jsonl: record 2, field '{field}': {message}"):
        mmedbench.read_file(f)
    items, rejects = mmedbench.read_file(f, skip_errors=True)
    assert len(items) == 1 and rejects == [{"file": str(f), "index": 2, "field": field, "reason": rejects[0]["reason"]}]


def test_list_answers_and_missing_flags(tmp_path):
    f = tmp_path / "Spanish.jsonl"
    raw = {k: v for k, v in GOOD.items() if not k.startswith("human")}
    f.write_text(json.dumps({**raw, "answer_idx": ["C", "A"]}) + "\n", encoding="utf-8")
    (item,), _ = mmedbench.read_file(f)
    assert (item.answer_idx, item.answers, item.human_checked, item.has_check_flags) == ("C,A", ("C", "A"), False,
                                                                                          False)
    with pytest.raises(DataError, match="Catalan.jsonl: record \\(file name\\): not an MMedBench language file"):
        mmedbench.read_file(tmp_path / "Catalan.jsonl")


def test_hub_zip_unpacks_only_language_files(tmp_path):
    from src.download.mmedbench_hub import summary, unpack

    z = tmp_path / "MMedBench.zip"
    with zipfile.ZipFile(z, "w") as w:
        for split in ("Train", "Test"):
            for name in mmedbench.LANGUAGES:
                w.writestr(f"MMedBench/{split}/{name}.jsonl", (MMED / split / f"{name}.jsonl").read_bytes())
        w.writestr("MMedBench/README.md", "x")
        w.writestr("__MACOSX/MMedBench/Test/._English.jsonl", "junk")
        w.writestr("../../evil/Test/English.jsonl", "not written outside")  # its path chooses nothing
    out = tmp_path / "unpacked"
    with pytest.raises(ValueError, match="two members unpack to Test/English.jsonl"):
        unpack(z, out)  # the crafted member collides with the real one: refused, never written elsewhere
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
    z2 = tmp_path / "clean.zip"
    with zipfile.ZipFile(z) as src, zipfile.ZipFile(z2, "w") as w:
        for info in src.infolist():
            if not info.filename.startswith(".."):
                w.writestr(info, src.read(info))
    report = unpack(z2, tmp_path / "clean")
    assert report["other_members_skipped"] == 2 and len(report["files"]) == 12
    assert summary(tmp_path / "clean") == {"Train": {c: 6 for c in mmedbench.LANGUAGES.values()},
                                           "Test": {c: 5 for c in mmedbench.LANGUAGES.values()}}
    assert sorted(p.relative_to(tmp_path / "clean").as_posix() for p in (tmp_path / "clean").rglob("*.jsonl")) == \
        sorted(report["files"])


def test_step0_copies_the_mmedbench_sample():
    from src.download.download_data import SAMPLE_FILES

    assert {f"mmedbench/{s}/{n}.jsonl" for s in mmedbench.SPLITS for n in mmedbench.LANGUAGES} <= set(SAMPLE_FILES)
    assert all((SAMPLE / name).is_file() for name in SAMPLE_FILES)
    assert Path(SAMPLE / "mmedbench" / "Test" / "English.jsonl").read_text(encoding="utf-8").count("\n") == 5


def test_step0_mmedbench_flag_needs_the_hub(tmp_path):
    from src.common.errors import UsageError
    from src.download import download_data

    with pytest.raises(UsageError, match="--mmedbench: goes with --hub"):
        download_data.main(["--mmedbench", "--data-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())
