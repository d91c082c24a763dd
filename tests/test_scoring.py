"""Scoring maths on hand-made predictions: per-source counts, language scores as the original collector defines them (docs/reference.md, "Scores"),
major/minor averages, zero-correct sources, no-letter counts, and the confidence intervals."""
import math

import pytest

from src.evaluate.scoring import Z, format_table, proportion_variance, score, wilson


def preds(source, right, total, language=None, no_letter=0, rule="bracketed"):
    out = []
    for i in range(total):
        ok = i < right
        letter = None if i >= total - no_letter else ("A" if ok else "B")
        out.append({"id": f"{source}-{i}", "source": source, "language": language, "letter": letter,
                    "rule": "none" if letter is None else rule, "gold": "A", "correct": ok and letter == "A"})
    return out


@pytest.fixture()
def sample():
    p = []
    p += preds("medqa-usmle", 6, 10)          # en, macro
    p += preds("mmlu-medical", 1, 4)          # en
    p += preds("MMLU_anatomy_de", 3, 4)       # de, micro
    p += preds("MMLU_college_biology_de", 1, 16)
    p += preds("mmlu-medical-ar", 0, 5, no_letter=2)   # ar, single source, zero correct
    p += preds("mmlu-medical-sw", 2, 4)       # minor: Swahili from the suffix
    p += preds("some-bench", 3, 3, language="vi")      # minor: language from the field
    return p


def test_sources_languages_and_averages(sample):
    s = score(sample)
    assert s["items"] == 46 and s["right"] == 16
    src = s["sources"]
    assert src["medqa-usmle"]["right"] == 6 and src["medqa-usmle"]["total"] == 10
    assert src["mmlu-medical-ar"]["accuracy"] == 0.0 and src["mmlu-medical-ar"]["total"] == 5
    assert s["zero_correct_sources"] == ["mmlu-medical-ar"]

    lang = s["languages"]
    assert lang["en"]["method"] == "macro"
    assert lang["en"]["accuracy"] == pytest.approx((0.6 + 0.25) / 2, abs=1e-6)
    assert lang["de"]["method"] == "micro" and lang["de"]["accuracy"] == pytest.approx(4 / 20, abs=1e-6)
    assert lang["ar"]["accuracy"] == 0.0 and lang["ar"]["sources"] == ["mmlu-medical-ar"]
    assert lang["sw"]["major"] is False and lang["vi"]["accuracy"] == 1.0
    assert list(lang)[:3] == ["ar", "de", "en"]  # paper column order first, minor languages after

    major = s["major_average"]
    assert major["languages"] == ["ar", "de", "en"]
    assert major["accuracy"] == pytest.approx((0.0 + 0.2 + 0.425) / 3, abs=1e-6)
    assert set(major["missing"]) == {"es", "fr", "hi", "it", "ja", "ko", "pt", "ru", "zh"}
    assert s["minor_average"]["accuracy"] == pytest.approx((0.5 + 1.0) / 2, abs=1e-6)


def test_no_letter_rules_and_duplicates(sample):
    s = score(sample + sample[:3])
    assert s["duplicates_dropped"] == 3 and s["items"] == 46
    assert s["no_letter"] == {"total": 2, "by_source": {"mmlu-medical-ar": 2}}
    assert s["rules"] == {"bracketed": 44, "none": 2}
    assert s["sources"]["mmlu-medical-ar"]["no_letter"] == 2


def test_wilson_known_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 5)
    assert lo == 0.0 and hi == pytest.approx(0.4345, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_intervals_follow_the_documented_method(sample):
    s = score(sample)
    # pooled: Wilson
    assert s["sources"]["medqa-usmle"]["ci95"] == pytest.approx(list(wilson(6, 10)), abs=1e-6)
    assert s["languages"]["de"]["ci95"] == pytest.approx(list(wilson(4, 20)), abs=1e-6)
    # a single-source language reuses its source's interval
    assert s["languages"]["ar"]["ci95"] == s["sources"]["mmlu-medical-ar"]["ci95"]
    # macro mean: normal approximation with Agresti-Coull component variances
    var_en = (proportion_variance(6, 10) + proportion_variance(1, 4)) / 4
    half = Z * math.sqrt(var_en)
    assert s["languages"]["en"]["ci95"] == pytest.approx([0.425 - half, 0.425 + half], abs=1e-6)
    # major average: mean over languages of their variances
    var_major = (proportion_variance(0, 5) + proportion_variance(4, 20) + var_en) / 9
    m = (0.0 + 0.2 + 0.425) / 3
    assert s["major_average"]["ci95"] == pytest.approx([m - Z * math.sqrt(var_major), m + Z * math.sqrt(var_major)],
                                                       abs=1e-6)
    # a zero-correct component still has a positive variance, intervals are clipped to [0, 1]
    assert proportion_variance(0, 5) > 0
    assert s["languages"]["vi"]["ci95"][1] == 1.0
    for e in list(s["sources"].values()) + list(s["languages"].values()):
        assert 0.0 <= e["ci95"][0] <= e["accuracy"] <= e["ci95"][1] <= 1.0


def test_all_major_languages_give_the_paper_average():
    # With the 12 major languages present, the major average is the unweighted mean of the 12 language scores.
    from src.common.languages import known_sources, major_languages

    source_of = {}
    for source, lang in known_sources().items():
        source_of.setdefault(lang, source)
    p = []
    for k, lang in enumerate(major_languages()):
        p += preds(source_of[lang], k, 12)
    s = score(p)
    assert s["major_average"]["n_languages"] == 12 and s["major_average"]["missing"] == []
    assert s["major_average"]["accuracy"] == pytest.approx(sum(k / 12 for k in range(12)) / 12, abs=1e-6)
    assert s["minor_average"] is None


def test_language_conflict_is_an_error():
    p = preds("medqa-usmle", 1, 2) + [{"id": "x", "source": "medqa-usmle", "language": "zh", "letter": "A",
                                       "rule": "loose", "correct": True}]
    with pytest.raises(ValueError, match="two languages"):
        score(p)


def test_format_table(sample):
    md = format_table(score(sample))
    assert "| major | 20.8 |" in md
    assert "| en | macro | 2 | 7/14 | 42.5 |" in md
    assert "| de | micro | 2 | 4/20 | 20.0 |" in md
    assert "| mmlu-medical-ar | ar | 0/5 | 0.0 |" in md
    assert "sources with zero correct: mmlu-medical-ar" in md
    assert "| sw (minor) |" in md


def test_collect_results_table_csv_and_chart(sample, tmp_path):
    import csv
    import json

    from util import collect_results

    a, b = tmp_path / "model_a", tmp_path / "model_b"
    a.mkdir()
    b.mkdir()
    (a / "score.json").write_text(json.dumps(score(sample)), encoding="utf-8")
    (b / "score.json").write_text(json.dumps(score(preds("headqa", 3, 4) + preds("mmlu-medical-sw", 1, 4))),
                                  encoding="utf-8")
    out = tmp_path / "summary"
    assert collect_results.main([str(a), str(b), "--names", "A", "B", "--out", str(out)]) == 0
    md = (out.with_suffix(".md")).read_text(encoding="utf-8")
    header = md.splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:15] == ["model", "major", "minor", "ar", "de", "en", "es", "fr", "hi", "it", "ja", "ko", "pt", "ru",
                         "zh"]
    assert set(cols[15:]) == {"sw", "vi"}
    rows = list(csv.reader(out.with_suffix(".csv").open(encoding="utf-8")))
    assert rows[0] == cols and rows[1][0] == "A" and rows[2][0] == "B"
    assert rows[1][cols.index("en")] == "42.5" and rows[2][cols.index("en")] == "-"
    assert rows[2][cols.index("es")] == "75.0"
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_exclude_sources_recomputes_every_number():
    p = preds("medqa-usmle", 6, 10) + preds("pubmedqa", 1, 4) + preds("cmexam", 0, 5) + preds("cmmlu-medical", 3, 6)
    full = score(p)
    assert full["languages"]["en"]["accuracy"] == pytest.approx((0.6 + 0.25) / 2, abs=1e-6)  # the collector's mean
    s = score(p, ["pubmedqa", "cmexam", "cmb-single"])
    assert s["excluded_sources"] == {"pubmedqa": 4, "cmexam": 5, "cmb-single": 0}
    assert s["items"] == 16 and s["duplicates_dropped"] == 0
    assert set(s["sources"]) == {"medqa-usmle", "cmmlu-medical"}
    assert s["languages"]["en"]["accuracy"] == 0.6 and s["languages"]["zh"]["accuracy"] == 0.5
    assert s["major_average"]["accuracy"] == pytest.approx(0.55, abs=1e-6)
    assert "excluded sources (predictions left out): pubmedqa 4, cmexam 5, cmb-single 0" in format_table(s)


def test_collect_results_exclude_source(tmp_path):
    import json

    from src.common.io import write_jsonl
    from util import collect_results

    p = preds("medqa-usmle", 6, 10) + preds("pubmedqa", 1, 4)
    a, b = tmp_path / "with_preds", tmp_path / "score_only"
    for d in (a, b):
        d.mkdir()
        (d / "score.json").write_text(json.dumps(score(p)), encoding="utf-8")
    write_jsonl(a / "predictions.jsonl", p + preds("headqa", 1, 1))  # an item an earlier, longer run predicted
    before = (a / "score.json").read_text(encoding="utf-8")
    out = tmp_path / "summary"
    assert collect_results.main([str(a), str(b), "--out", str(out), "--exclude-source", "pubmedqa"]) == 0
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    cols = [c.strip() for c in md.splitlines()[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()[2:4]]
    assert [r[cols.index("en")] for r in rows] == ["60.0", "60.0"] and [r[cols.index("es")] for r in rows] == ["-"] * 2
    assert "Sources left out of every number: pubmedqa." in md
    assert (a / "score.json").read_text(encoding="utf-8") == before  # run folders are not changed


def test_step4_exclude_source_flag(tiny_model_dir, tmp_path):
    """Step 4 predicts every item and leaves the named sources out of score.json/score.md (a rerun only rescores)."""
    import json

    from src.common.io import write_jsonl
    from src.evaluate import eval as step4

    recs = [{"id": f"{src}-{i}", "source": src, "language": "en", "prompt": f"User:Q{i}?\nAssistant:",
             "answer": "A", "letters": ["A", "B"], "answer_phrase": ""} for src in ("pubmedqa", "medqa-usmle")
            for i in range(2)]
    inp, out = tmp_path / "test.jsonl", tmp_path / "res"
    write_jsonl(inp, recs)
    common = ["--model", str(tiny_model_dir), "--input", str(inp), "--out", str(out), "--max-new-tokens", "2",
              "--no-progress", "--threads", "1"]
    assert step4.main(common) == 0
    assert set(json.loads((out / "score.json").read_text())["sources"]) == {"pubmedqa", "medqa-usmle"}
    assert step4.main(common + ["--exclude-source", "pubmedqa"]) == 0
    s = json.loads((out / "score.json").read_text())
    assert set(s["sources"]) == {"medqa-usmle"} and s["excluded_sources"] == {"pubmedqa": 2} and s["items"] == 2
    assert json.loads((out / "run.json").read_text())["predicted_now"] == 0
    assert "excluded sources" in (out / "score.md").read_text()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4  # predictions are kept
