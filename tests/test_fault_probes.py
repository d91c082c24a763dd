"""Fault probes, round 2: each test reproduces one fault a careless or hostile user can cause (an edited, mixed,
truncated or interrupted folder; a wrong --out; Ctrl-C at a bad moment) and checks the wanted behaviour: a clear
one-line refusal (exit code 2), or a result that is never silently wrong or stale. docs/reliability.md lists them
with what happens and how to recover. (Round 1, kills and a full disk while training: tests/test_faults.py and
tests/test_reliability.py.)"""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import make_tiny_llama
from src.common import cli


def _one_error_line(capsys) -> str:
    """The one line an entry point printed on stderr (fails when there are more, or a traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ score.md
def test_source_names_with_a_pipe_or_a_newline_keep_the_score_table_intact():
    from src.evaluate.scoring import format_table, score

    names = ["medqa|usmle", "pub\nmedqa", "plain"]
    preds = [{"id": f"{n}-{i}", "source": n, "language": "en", "letter": "A", "rule": "r",
              "correct": i == 0 and "\n" not in n} for n in names for i in range(2)]
    result = score(preds)
    assert set(result["sources"]) == set(names)  # score.json keeps the names as they are
    table = format_table(result)
    source_rows = table.split("| source |")[1].splitlines()[2:2 + len(names)]
    for row in source_rows:  # every row has the header's six cells: no pipe or line break leaked into a cell
        assert row.startswith("| ") and row.endswith(" |")
        cells = [c for c in row[2:-2].replace("\\|", "").split(" | ")]
        assert len(cells) == 6, row
    assert "medqa\\|usmle" in table and "pub<br>medqa" in table
    assert "\n- sources with zero correct: pub<br>medqa\n" in table


# ------------------------------------------------------------------------------------ never unpickle, say so
@pytest.mark.parametrize("content", ["raw pickle", "garbage"])
def test_the_unsafe_checkpoint_refusal_never_advises_loading_the_pickle(content, tmp_path):
    import pickle

    from src.train.weights_only import UnsafeCheckpointError, load_weights_only

    path = tmp_path / "random_states_0.pkl"
    if content == "raw pickle":
        path.write_bytes(pickle.dumps({"step": 1, "code": print}))
    else:
        path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UnsafeCheckpointError) as e:
        load_weights_only(path)
    message = str(e.value)
    assert message.startswith(f"{path}: refused to load")
    assert "weights_only" not in message and "will likely succeed" not in message and "\n" not in message


# ------------------------------------------------------------------------------ bad model folders: one line
def _truncate(path, keep: int | None):
    data = path.read_bytes()
    path.write_bytes(b"" if keep is None else data[:keep])


@pytest.mark.parametrize("damage, says", [(None, "empty file"), (-100, "damaged or incomplete safetensors file"),
                                          (4, "damaged or incomplete safetensors file")])
def test_a_truncated_or_empty_weight_file_is_one_line_naming_it(damage, says, tiny_model_dir, tmp_path, capsys):
    from src.evaluate import eval as step4

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    _truncate(weights, None if damage is None else (damage if damage > 0 else weights.stat().st_size + damage))
    inp = tmp_path / "test.jsonl"
    _write_jsonl(inp, [{"id": "1", "source": "medqa-usmle", "prompt": "Q?", "answer": "A", "letters": ["A", "B"]}])
    out = tmp_path / "res"
    code = cli.run(step4.main, ["--model", str(model), "--input", str(inp), "--out", str(out), "--no-progress"])
    line = _one_error_line(capsys)
    assert code == 2 and line.startswith(f"error: {weights}: {says}"), line
    assert not (out / "run.json").exists()  # a failed start leaves no run.json


def test_step4_on_a_data_or_results_folder_says_it_is_not_a_model_folder(tmp_path, capsys):
    from src.evaluate import eval as step4

    data = tmp_path / "data"
    data.mkdir()
    inp = _write_jsonl(data / "test.jsonl", [{"id": "1", "source": "medqa-usmle", "prompt": "Q?", "answer": "A",
                                               "letters": ["A", "B"]}])
    code = cli.run(step4.main, ["--model", str(data), "--input", str(inp), "--out", str(tmp_path / "r")])
    assert code == 2
    assert _one_error_line(capsys) == f"error: --model: not a model folder: no config.json / weights in {data}"
    assert not (tmp_path / "r" / "run.json").exists()


# ------------------------------------------------------------------------------------ weight averaging --out
@pytest.fixture()
def two_checkpoints(smollm2_tokenizer, tmp_path):
    run = tmp_path / "ckpts" / "run"
    ckpts = []
    for seed, step in enumerate((6, 12)):
        d = make_tiny_llama(smollm2_tokenizer, run / f"checkpoint-{step}", seed=seed)
        (d / "trainer_state.json").write_text(json.dumps({"step": step}))
        ckpts.append(d)
    return ckpts


def _out_choices(ckpts):
    first, second = ckpts
    return {"an input": second, "the first input": first, "inside an input": second / "avg",
            "a folder holding the inputs": first.parent, "another checkpoint": _another_checkpoint(first)}


def _another_checkpoint(first):
    other = first.parent / "checkpoint-18"
    shutil.copytree(first, other)
    return other


@pytest.mark.parametrize("where", ["an input", "the first input", "inside an input", "a folder holding the inputs",
                                   "another checkpoint"])
def test_averaging_refuses_an_out_that_is_inside_or_holds_a_checkpoint(where, two_checkpoints, capsys):
    from util import average_checkpoints

    out = _out_choices(two_checkpoints)[where]
    before = {p: p.read_bytes() for c in two_checkpoints for p in c.glob("*.safetensors")}
    argv = [a for c in two_checkpoints for a in ("--ckpt", str(c))] + ["--out", str(out)]
    for extra in ([], ["--overwrite"]):
        assert cli.run(average_checkpoints.main, argv + extra) == 2
        line = _one_error_line(capsys)
        assert line.startswith("error: --out: ") and str(out) in line, line
    assert {p: p.read_bytes() for p in before} == before  # no input touched
    assert json.loads((two_checkpoints[1] / "trainer_state.json").read_text())["step"] == 12


def test_averaging_writes_a_whole_folder_or_nothing_and_never_replaces_without_overwrite(two_checkpoints, tmp_path,
                                                                                        capsys):
    from util import average_checkpoints

    out = tmp_path / "models" / "avg"
    argv = [a for c in two_checkpoints for a in ("--ckpt", str(c))] + ["--out", str(out)]
    assert cli.run(average_checkpoints.main, argv) == 0
    first = (out / "model.safetensors").read_bytes()
    assert not [p for p in out.parent.iterdir() if p.name != "avg"]  # no temporary folder left beside it
    assert cli.run(average_checkpoints.main, argv) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert cli.run(average_checkpoints.main, argv + ["--weights", "1", "3", "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["avg"]


# --------------------------------------------------------------------------- step 4 fingerprint: adapters
def test_step4_recomputes_an_adapter_whose_base_was_replaced(smollm2_tokenizer, tmp_path):
    from src.evaluate.fingerprint import model_fingerprint, run_fingerprint
    from src.models.loading import load_model, load_tokenizer
    from src.train import lora
    from src.train.train import parse_args

    base = make_tiny_llama(smollm2_tokenizer, tmp_path / "base")
    model = lora.apply(load_model(base), parse_args(["--model", "m", "--train", "t", "--out", "o", "--lora-r", "4"]),
                       base=base, is_moe=False)
    adapter = tmp_path / "adapter"
    lora.save_adapter_files(model, load_tokenizer(base), adapter)
    proxy = {"model": tmp_path / "large", "proxy_tuned": adapter, "proxy_raw": tmp_path / "raw"}  # a proxy pair
    before = model_fingerprint(adapter), run_fingerprint({}, proxy)
    shutil.rmtree(base)
    make_tiny_llama(smollm2_tokenizer, base, seed=1)  # another model at the same path
    assert model_fingerprint(adapter) != before[0] and run_fingerprint({}, proxy) != before[1]
