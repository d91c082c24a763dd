"""bench/eval_speed.py: one JSON line per method the moment it finishes (also in --jsonl), so a run cut short still
reports; methods sized to a time budget share their first items; ratios and identical letters against the
reference-style loop, also across runs through the same --jsonl. Tiny model, embedded sample, CPU."""
import json

import pytest

from bench import eval_speed


def lines(path, methods_only=False):
    docs = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    return [x for x in docs if "method" in x] if methods_only else docs


def test_each_method_reports_when_it_finishes(tiny_model_dir, tmp_path, monkeypatch, capsys):
    jsonl = tmp_path / "speed.jsonl"
    common = ["--model", str(tiny_model_dir), "--sample", "--items", "3", "--max-prompt-tokens", "600",
              "--jsonl", str(jsonl)]
    assert eval_speed.main(common + ["--methods", "floor", "reference-b4"]) == 0
    first = lines(jsonl, methods_only=True)
    assert [x["method"] for x in first] == ["floor", "reference-b4"] and first[-1]["items"] == 3
    assert first[-1]["forward_calls"] >= 3 and first[-1]["x_floor"] > 0
    # a later run (another process, another time limit) compares with the lines already in the file
    original = eval_speed.run_method

    def failing(bench, method, records, model=None):
        if method == "hf-b64":
            raise RuntimeError("cut short")
        return original(bench, method, records, model)

    monkeypatch.setattr(eval_speed, "run_method", failing)
    with pytest.raises(RuntimeError, match="cut short"):
        eval_speed.main(common + ["--methods", "custom", "hf-b64"])
    custom = lines(jsonl, methods_only=True)[-1]
    assert custom["method"] == "custom"  # reported before the next method failed
    assert custom["identical_letters_vs_reference_b4"] == "3/3" and custom["speedup_vs_reference_b4"] > 0
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert any(x.get("method") == "custom" for x in printed)


def test_budget_sizes_a_method_from_a_probe(tiny_model_dir, tmp_path):
    jsonl = tmp_path / "speed.jsonl"
    assert eval_speed.main(["--model", str(tiny_model_dir), "--sample", "--items", "12", "--max-prompt-tokens",
                            "600", "--methods", "custom", "--budget-seconds", "1000", "--probe-items", "2",
                            "--jsonl", str(jsonl)]) == 0
    line, end = lines(jsonl)
    assert line["probe"]["items"] == 2 and line["items"] == 12  # a generous budget: the whole pool
    assert end["summary"] and end["methods"]["custom"]["items"] == 12
