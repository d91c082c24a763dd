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
    from src.train.config import TrainConfig

    base = make_tiny_llama(smollm2_tokenizer, tmp_path / "base")
    model = lora.apply(load_model(base), TrainConfig(model="m", train="t", out="o", lora_r=4), base=base, is_moe=False)
    adapter = tmp_path / "adapter"
    lora.save_adapter_files(model, load_tokenizer(base), adapter)
    proxy = {"model": tmp_path / "large", "proxy_tuned": adapter, "proxy_raw": tmp_path / "raw"}  # a proxy pair
    before = model_fingerprint(adapter), run_fingerprint({}, proxy)
    shutil.rmtree(base)
    make_tiny_llama(smollm2_tokenizer, base, seed=1)  # another model at the same path
    assert model_fingerprint(adapter) != before[0] and run_fingerprint({}, proxy) != before[1]


# ------------------------------------------------------------------------------------- step 4: run.json status
def _sigint_as_in_a_terminal() -> None:
    """A child of a background job starts with SIGINT ignored; a command typed in a terminal has the default."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env(**extra) -> dict:
    import os

    from conftest import ROOT

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("APOLLO_DEBUG", None)
    return {**env, **{k: str(v) for k, v in extra.items()}}


@pytest.fixture(scope="module")
def step1_records(tiny_model_dir, tmp_path_factory):
    from test_eval import make_records

    from src.common.chat_formats import resolve_format
    from src.models.loading import load_config, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    return make_records(tmp_path_factory.mktemp("recs"), tok, resolve_format(tok, load_config(tiny_model_dir)), k=1)


def test_ctrl_c_in_step4_leaves_run_json_interrupted_with_counts(tiny_model_dir, step1_records, tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    inp = _write_jsonl(tmp_path / "test.jsonl", step1_records[:8])
    out = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "src.evaluate.eval", "--model", str(tiny_model_dir), "--input",
                             str(inp), "--out", str(out), "--max-new-tokens", "48", "--min-new-tokens", "48",
                             "--batch-size", "1", "--threads", "1", "--no-progress"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    pred = out / "predictions.jsonl"
    for line in proc.stdout:  # predicting has started (the line comes right before the first item)
        if line.startswith("[step 4]"):
            break
    import time

    while proc.poll() is None and not (pred.is_file() and pred.read_text().count("\n") >= 1):
        time.sleep(0.05)  # one prediction appended: counts to check
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    run = json.loads((out / "run.json").read_text())
    done = pred.read_text().count("\n")
    assert run["status"] == "interrupted" and run["items"] == 8, run
    assert run["predicted"] == done and run["to_go"] == 8 - done and 1 <= done < 8, run


def test_a_failed_start_of_step4_leaves_no_run_json(tiny_model_dir, step1_records, tmp_path, capsys):
    from src.evaluate import eval as step4

    inp = _write_jsonl(tmp_path / "test.jsonl", step1_records[:2])
    out = tmp_path / "res"
    for argv in (["--model", str(tmp_path / "missing")], ["--model", str(tiny_model_dir), "--limit", "0"],
                 ["--model", str(tiny_model_dir), "--proxy-tuned", str(tmp_path), "--proxy-raw", str(tmp_path)]):
        assert cli.run(step4.main, [*argv, "--input", str(inp), "--out", str(out), "--no-progress"]) == 2
        _one_error_line(capsys)
        assert not (out / "run.json").exists()


def test_items_left_without_a_prediction_leave_run_json_failed(tiny_model_dir, step1_records, tmp_path, monkeypatch,
                                                                capsys):
    """A process that predicted fewer items than it was given (a crashed rank) is found when the predictions are
    merged: the run ends in one line and run.json says "failed" with the counts, not "running"."""
    from src.evaluate import eval as step4
    from src.evaluate import predict

    real = predict.predict_records

    def drop_last(backend, tokenizer, records, config, **kwargs):
        return real(backend, tokenizer, records[:-1], config, **kwargs)

    monkeypatch.setattr(predict, "predict_records", drop_last)
    inp = _write_jsonl(tmp_path / "test.jsonl", step1_records[:3])
    out = tmp_path / "res"
    argv = ["--model", str(tiny_model_dir), "--input", str(inp), "--out", str(out), "--max-new-tokens", "4",
            "--no-progress"]
    assert cli.run(step4.main, argv) == 2
    err = capsys.readouterr().err
    assert "error: 1 items have no prediction" in err and "Traceback" not in err
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and (run["predicted"], run["to_go"]) == (2, 1), run


# ------------------------------------------------------------------------ step 3 checkpoints: digests, resume
STEPS = 4


def _train(model, rows, out, *more, check=True):
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "-m", "src.train.train", "--model", str(model), "--train", str(rows), "--out", str(out),
           "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "1", "--max-steps", str(STEPS), "--save-every", "2",
           "--eval-every", "-1", "--no-progress", *map(str, more)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tiny_model_dir, rows, tmp_path_factory):
    """checkpoint-2 and checkpoint-4 of a 4-step run (read only: tests copy what they change)."""
    out = tmp_path_factory.mktemp("trained") / "ckpts"
    _train(tiny_model_dir, rows, out)
    return out


def _copy_run(trained, tmp_path):
    out = tmp_path / "ckpts"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("logs"))
    return out


def _edit_state(ckpt, **changes):
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state.update(changes)
    state_file.write_text(json.dumps(state))
    return state_file


def test_every_checkpoint_records_its_weight_digests_and_a_flipped_byte_is_one_line(trained, tmp_path, capsys):
    from src.common.errors import BadFile
    from src.evaluate import eval as step4
    from src.models.integrity import file_sha256
    from src.models.loading import load_model

    for step in (2, 4):
        ckpt = trained / f"checkpoint-{step}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["weights_sha256"] == {"model.safetensors": file_sha256(ckpt / "model.safetensors")}
    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(trained / "checkpoint-4", ckpt)
    load_model(ckpt)  # intact: loads
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight: the file still parses, the model would score differently
    weights.write_bytes(bytes(data))
    with pytest.raises(BadFile, match="its sha256 differs from the one recorded in trainer_state.json"):
        load_model(ckpt)
    inp = _write_jsonl(tmp_path / "t.jsonl", [{"id": "1", "source": "medqa-usmle", "prompt": "Q?", "answer": "A",
                                               "letters": ["A", "B"]}])
    capsys.readouterr()
    assert cli.run(step4.main, ["--model", str(ckpt), "--input", str(inp), "--out", str(tmp_path / "r")]) == 2
    assert _one_error_line(capsys).startswith(f"error: {weights}: its sha256 differs")


def test_resume_refuses_a_step_edited_against_the_saved_optimizer_and_scheduler(trained, tiny_model_dir, rows,
                                                                                 tmp_path):
    out = _copy_run(trained, tmp_path)
    ckpt = out / "checkpoint-4"
    # step 4 -> 2, with a data position that agrees with it: only the saved state/ can tell
    state_file = _edit_state(ckpt, step=2, step_in_epoch=2, rows_consumed_in_epoch=4)
    proc = _train(tiny_model_dir, rows, out, "--resume", ckpt, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {state_file}: step 2, but the scheduler and optimizer state saved beside it "
                           f"(state/) are at step 4"), line
    assert "Traceback" not in proc.stderr


def test_resume_refuses_a_step_whose_data_position_disagrees(trained, tiny_model_dir, rows, tmp_path):
    out = _copy_run(trained, tmp_path)
    state_file = _edit_state(out / "checkpoint-4", step=3)  # the data position still says step 4
    proc = _train(tiny_model_dir, rows, out, "--resume", "latest", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {state_file}: step 3, but its data position disagrees (epoch 0, step_in_epoch 4, "
        f"rows_consumed_in_epoch 8; at step 3 they are 0, 3, 6): the file was edited")


def test_a_checkpoint_at_or_past_max_steps_says_so_in_one_line(trained, tiny_model_dir, rows, tmp_path):
    out = _copy_run(trained, tmp_path)
    done = _train(tiny_model_dir, rows, out, "--resume", "latest")  # the run is complete: nothing to do, said once
    assert f"[train] {out / 'checkpoint-4'} is at step 4, the end of this run (--max-steps 4): nothing to train" \
        in done.stdout, done.stdout[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state_file = _edit_state(out / "checkpoint-4", step=40, step_in_epoch=40, rows_consumed_in_epoch=80)
    proc = _train(tiny_model_dir, rows, out, "--resume", "latest", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {state_file}: step 40 is past the end of this run (--max-steps 4): nothing to train; the file "
        f"was edited, or the checkpoint belongs to a longer run")


# ----------------------------------------------------------------- step 2 -> step 3: one unit, one tokenizer


def _step2(model, out, *more):
    from conftest import SAMPLE
    from src.prepare import train_data

    argv = ["--data", str(SAMPLE / "train.json"), "--model", str(model), "--out", str(out), "--num-proc", "1",
            "--max-seq-len", "512", *map(str, more)]
    assert cli.run(train_data.main, argv) == 0
    return out


@pytest.fixture(scope="module")
def other_tokenizer_model(smollm2_tokenizer, tmp_path_factory) -> object:
    """A tiny model whose tokenizer is SmolLM2's plus two words as added tokens: ids >= 49152 for them."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer_b") / "model"
    smollm2_tokenizer.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([" patient", " treatment"])
    return make_tiny_llama(tok, folder)


@pytest.fixture(scope="module")
def step2_runs(tiny_model_dir, other_tokenizer_model, tmp_path_factory):
    """Step 2 on the sample: with the tiny model's tokenizer (seeds 42 and 7) and with the other tokenizer."""
    root = tmp_path_factory.mktemp("step2")
    return {"a": _step2(tiny_model_dir, root / "a"), "a7": _step2(tiny_model_dir, root / "a7", "--seed", 7),
            "b": _step2(other_tokenizer_model, root / "b")}


def _copy_step2(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_step3_refuses_train_rows_beside_another_runs_mixture(step2_runs, tmp_path):
    from src.common.errors import BadFile
    from src.train.data import load_rows

    mixed = _copy_step2(step2_runs["a"], tmp_path / "mixed")
    shutil.rmtree(mixed / "train")
    shutil.copytree(step2_runs["a7"] / "train", mixed / "train")  # train/ of the seed-7 run, mixture.json of seed 42
    for given in (mixed, mixed / "train"):
        with pytest.raises(BadFile, match=rf"{mixed / 'mixture.json'}: does not belong with {mixed / 'train'}"):
            load_rows(given)
    assert len(load_rows(step2_runs["a7"])) > 0  # each run's own pair is fine


def test_step3_refuses_rows_of_another_tokenizer_and_ids_beyond_the_vocabulary(step2_runs, tiny_model_dir,
                                                                             other_tokenizer_model, tmp_path):
    from src.common.errors import BadFile
    from src.models.loading import load_tokenizer
    from src.train.data import load_rows

    tok_a, tok_b = load_tokenizer(tiny_model_dir), load_tokenizer(other_tokenizer_model)
    with pytest.raises(BadFile, match=r"mixture.json: the rows were tokenized with .* tokenizer \(fingerprint "
                                      r"[0-9a-f]{12}\), but --model .* has another one \(fingerprint [0-9a-f]{12}\)"):
        load_rows(step2_runs["a"], tokenizer=tok_b, model_name=other_tokenizer_model, vocab_size=len(tok_b))
    # the rare deliberate case: the vocabulary is a superset
    assert len(load_rows(step2_runs["a"], tokenizer=tok_b, model_name=other_tokenizer_model, vocab_size=len(tok_b),
                         allow_tokenizer_mismatch=True)) > 0
    # the reverse: ids the model has no embedding for are an error even when allowed
    with pytest.raises(BadFile, match=rf"column 'input_ids' holds token ids up to {len(tok_b) - 1}, but the model's "
                                      rf"vocabulary has {len(tok_a)} ids"):
        load_rows(step2_runs["b"], tokenizer=tok_a, model_name=tiny_model_dir, vocab_size=len(tok_a),
                  allow_tokenizer_mismatch=True)
    assert len(load_rows(step2_runs["a"], tokenizer=tok_a, model_name=tiny_model_dir, vocab_size=len(tok_a))) > 0


def test_step3_on_rows_of_a_larger_vocabulary_is_one_line_not_an_index_error(step2_runs, tiny_model_dir, tmp_path):
    proc = _train(tiny_model_dir, step2_runs["b"], tmp_path / "out", "--allow-tokenizer-mismatch", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {step2_runs['b'] / 'train'}: column 'input_ids' holds token ids up to"), line
    assert "Traceback" not in proc.stderr and "IndexError" not in proc.stderr


def _step2_cmd(model, out, *more):
    import sys

    from conftest import SAMPLE

    return [sys.executable, "-m", "src.prepare.train_data", "--data", str(SAMPLE / "train.json"), "--model",
            str(model), "--out", str(out), "--num-proc", "1", "--max-seq-len", "512", *map(str, more)]


@pytest.mark.parametrize("stop", ["ctrl-c", "crash"])
def test_step2_replaces_train_and_mixture_as_one_unit(stop, step2_runs, tiny_model_dir, tmp_path):
    """Ctrl-C while step 2 swaps its outputs in waits until both are in place; a kill at that moment leaves a folder
    step 3 refuses, and rerunning step 2 repairs it."""
    import subprocess

    from conftest import ROOT
    from src.common.errors import BadFile
    from src.prepare.train_data import STOP_IN_PUBLISH_ENV
    from src.train.data import load_rows

    out = _copy_step2(step2_runs["a"], tmp_path / "out")
    old = json.loads((out / "mixture.json").read_text())["rows_sha256"]
    cmd = _step2_cmd(tiny_model_dir, out, "--seed", 7, "--overwrite")
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(**{STOP_IN_PUBLISH_ENV: stop}), capture_output=True, text=True,
                          timeout=600, preexec_fn=_sigint_as_in_a_terminal)
    new = json.loads((step2_runs["a7"] / "mixture.json").read_text())["rows_sha256"]
    assert not list(out.glob(".step2-*")) or stop == "crash"
    if stop == "ctrl-c":
        assert proc.returncode == 130, proc.stderr[-3000:]
        assert json.loads((out / "mixture.json").read_text())["rows_sha256"] == new != old  # the new run, whole
        assert len(load_rows(out)) > 0
        return
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert not (out / "mixture.json").exists()  # the new train/ is in place, its mixture.json is not
    with pytest.raises(BadFile, match=rf"{out / 'train'}: step 2 did not finish writing {out}"):
        load_rows(out)
    rerun = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out / "mixture.json").read_text())["rows_sha256"] == new and len(load_rows(out)) > 0
    assert not list(out.glob(".step2-*"))


def _tmpfs(path, kilobytes: int) -> bool:
    import subprocess

    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kilobytes}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_in_step2_names_the_file_it_was_writing(tiny_model_dir, tmp_path, capsys):
    """Several sizes of disk, so that different writers run out of space (the scratch Arrow files, the rows, the
    reports): each failure names a path on that disk, never '?'."""
    import subprocess

    from conftest import SAMPLE
    from src.prepare import train_data

    named = set()
    for kb in (64, 300, 900, 2400):  # the scratch records, the tokenized scratch, the rows; enough
        disk = tmp_path / f"disk{kb}"
        if not _tmpfs(disk, kb):
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        try:
            argv = ["--data", str(SAMPLE / "train.json"), "--model", str(tiny_model_dir), "--out", str(disk / "s2"),
                    "--num-proc", "1", "--max-seq-len", "512"]
            capsys.readouterr()
            if cli.run(train_data.main, argv) == 0:
                continue
            line = capsys.readouterr().err.strip().splitlines()[-1]
            assert line.startswith(f"error: no space left on device: {disk}"), line
            named.add(line.rsplit("/", 1)[-1])
        finally:
            subprocess.run(["umount", str(disk)], capture_output=True)
    assert len(named) >= 2, named  # different writers (the scratch records, the tokenized scratch, the rows)


# ------------------------------------------------------------------ step 1 -> step 4: the file the report describes
def test_step4_refuses_a_test_file_its_step1_report_does_not_describe(tiny_model_dir, tmp_path):
    from conftest import SAMPLE
    from src.common.errors import BadFile
    from src.evaluate.records import load_records
    from src.prepare import bench_prompts

    def step1(out, *more):
        argv = ["--model", str(tiny_model_dir), "--bench", str(SAMPLE / "bench_test.json"), "--dev",
                str(SAMPLE / "bench_dev.json"), "--out", str(out), *more]
        assert bench_prompts.main(argv) == 0
        return out

    three, zero = step1(tmp_path / "k3"), step1(tmp_path / "k0", "--shots", "0")
    assert len(load_records(three / "test.jsonl")) > 0
    shutil.copyfile(zero / "test.jsonl", three / "test.jsonl")  # what an interrupted rerun with --shots 0 left
    with pytest.raises(BadFile, match=rf"{three / 'test.jsonl'}: not the file the report.json beside it describes"):
        load_records(three / "test.jsonl")
    (zero / "report.json").unlink()  # stopped before its report.json was written
    with pytest.raises(BadFile, match=rf"{zero / 'test.jsonl'}: step 1 did not finish writing {zero}"):
        load_records(zero / "test.jsonl")
    lone = tmp_path / "elsewhere" / "test.jsonl"  # the same file moved out of a step 1 folder: read as it is
    lone.parent.mkdir()
    shutil.copyfile(zero / "test.jsonl", lone)
    assert len(load_records(lone)) > 0


# ------------------------------------------------------------- every entry point: a bad folder or file is one line
def _model_cases(tiny_model_dir, root):
    """A data folder, an empty file and a folder with a truncated safetensors file, each given as a model."""
    data = root / "data"
    data.mkdir()
    (data / "test.jsonl").write_text('{"id": "1"}\n')
    empty = root / "empty.safetensors"
    empty.write_bytes(b"")
    cut = root / "truncated"
    shutil.copytree(tiny_model_dir, cut)
    _truncate(cut / "model.safetensors", 1000)
    return {"data folder": data, "empty file": empty, "truncated weights": cut}


ENTRY_POINTS = {  # name: (module, argv given the model M, out folder O and the context's files)
    "step 1": ("src.prepare.bench_prompts", lambda m, o, c: ["--model", m, "--bench", c["bench"], "--out", o]),
    "step 2": ("src.prepare.train_data", lambda m, o, c: ["--model", m, "--data", c["train"], "--out", o,
                                                          "--num-proc", "1"]),
    "step 3": ("src.train.train", lambda m, o, c: ["--model", m, "--train", c["rows"], "--out", o]),
    "step 4": ("src.evaluate.eval", lambda m, o, c: ["--model", m, "--input", c["input"], "--out", o]),
    "chat": ("src.evaluate.cli_demo", lambda m, o, c: ["--model", m]),
    "web chat": ("src.evaluate.web_demo", lambda m, o, c: ["--model", m, "--port", "0"]),
    "serve": ("src.serving.launch", lambda m, o, c: ["--model", m, "--port", "9", "--timeout", "5"]),
    "upcycle": ("util.upcycle_moe", lambda m, o, c: ["--model", m, "--out", o]),
    "moe export": ("util.moe_export", lambda m, o, c: ["--model", m, "--out", o]),
    "merge lora": ("util.merge_lora", lambda m, o, c: ["--adapter", m, "--out", o]),
    "import apollo-moe": ("util.import_apollo_moe", lambda m, o, c: ["--src", m, "--out", o]),
    "average": ("util.average_checkpoints", lambda m, o, c: ["--ckpt", m, "--ckpt", c["model"], "--out", o]),
    "routing": ("util.routing_analysis", lambda m, o, c: ["--model", m, "--input", c["input"], "--out", o]),
    "make_qa": ("src.prepare.make_qa", lambda m, o, c: ["--model", m, "--input", c["text"], "--out", o]),
}

TOKENIZER_ONLY = ("step 1", "step 2")

FILE_INPUTS = {  # name: (module, argv given an input file F, out folder O and the context's files)
    "step 1 --bench": ("src.prepare.bench_prompts", lambda f, o, c: ["--model", c["model"], "--bench", f, "--out", o]),
    "step 2 --data": ("src.prepare.train_data", lambda f, o, c: ["--model", c["model"], "--data", f, "--out", o,
                                                                 "--num-proc", "1"]),
    "step 3 --train": ("src.train.train", lambda f, o, c: ["--model", c["model"], "--train", f, "--out", o]),
    "step 4 --input": ("src.evaluate.eval", lambda f, o, c: ["--model", c["model"], "--input", f, "--out", o]),
    "lm-eval export": ("util.export_lm_eval", lambda f, o, c: ["--input", f, "--out", o]),
    "decontaminate --bench": ("src.prepare.decontaminate", lambda f, o, c: ["--bench", f, "--data", c["train"],
                                                                            "--out", o]),
    "decontaminate --data": ("src.prepare.decontaminate", lambda f, o, c: ["--bench", c["bench"], "--data", f,
                                                                           "--out", o]),
    "collect results": ("util.collect_results", lambda f, o, c: [f, "--out", o]),
    "compare predictions": ("util.compare_predictions", lambda f, o, c: [f, c["input"]]),
    "make_qa --input": ("src.prepare.make_qa", lambda f, o, c: ["--model", c["model"], "--input", f, "--out", o]),
}


@pytest.fixture(scope="module")
def probe_context(tiny_model_dir, step1_records, rows, tmp_path_factory):
    from conftest import SAMPLE

    root = tmp_path_factory.mktemp("probe")
    return {"model": str(tiny_model_dir), "bench": str(SAMPLE / "bench_test.json"),
            "train": str(SAMPLE / "train.json"), "rows": str(rows),
            "text": str(SAMPLE / "text" / "medicalGuideline_en_text.json"),
            "input": str(_write_jsonl(root / "test.jsonl", step1_records[:2])),
            "models": _model_cases(tiny_model_dir, root)}


def _run_entry(module: str, argv: list, capsys, monkeypatch) -> tuple[int, str]:
    import importlib

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))  # the chat reads nothing
    capsys.readouterr()
    code = cli.run(importlib.import_module(module).main, [str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["data folder", "empty file", "truncated weights"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_refuses_a_bad_model_in_one_line(entry, case, probe_context, tmp_path, capsys,
                                                           monkeypatch):
    module, argv = ENTRY_POINTS[entry]
    if case == "truncated weights" and entry in TOKENIZER_ONLY:
        pytest.skip(f"{entry} reads the model's tokenizer and config, not its weights")
    model = probe_context["models"][case]
    code, err = _run_entry(module, argv(model, tmp_path / "out", probe_context), capsys, monkeypatch)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and lines, err[-2000:]
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert str(model) in lines[-1], lines[-1]  # the folder, or the file in it
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("entry", list(FILE_INPUTS))
def test_every_entry_point_refuses_an_empty_input_file_in_one_line(entry, probe_context, tmp_path, capsys,
                                                                   monkeypatch):
    module, argv = FILE_INPUTS[entry]
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    code, err = _run_entry(module, argv(empty, tmp_path / "out", probe_context), capsys, monkeypatch)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and lines, err[-2000:]
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    assert str(empty) in lines[-1], lines[-1]


# ------------------------------------------------------------ model tools: --out never over or inside an input
def test_model_tools_refuse_an_out_that_is_their_input(tiny_model_dir, tmp_path, capsys):
    from util import upcycle_moe as upcycle

    model = tmp_path / "dense"
    shutil.copytree(tiny_model_dir, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for out in (model, model / "moe"):
        assert cli.run(upcycle.main, ["--model", str(model), "--out", str(out), "--overwrite"]) == 2
        assert _one_error_line(capsys).startswith(f"error: --out: {out} ")
    assert cli.run(upcycle.main, ["--model", str(model), "--out", str(tmp_path / "moe"), "--export-qwen2-moe",
                                  str(tmp_path / "moe")]) == 2
    assert _one_error_line(capsys).startswith("error: --export-qwen2-moe: ")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # the dense model was not replaced
    assert not (tmp_path / "moe").exists()


def test_data_tools_refuse_an_out_where_their_output_would_replace_their_input(probe_context, tmp_path, capsys):
    from conftest import SAMPLE
    from src.prepare import decontaminate
    from util import export_lm_eval

    data = tmp_path / "raw" / "train.json"
    data.parent.mkdir()
    shutil.copyfile(SAMPLE / "train.json", data)
    before = data.read_bytes()
    argv = ["--bench", probe_context["bench"], "--data", str(data), "--out", str(data.parent), "--overwrite"]
    assert cli.run(decontaminate.main, argv) == 2
    assert _one_error_line(capsys) == f"error: --out: {data.parent} holds the input {data}: its screened copy " \
                                      f"would replace it; choose another --out"
    assert data.read_bytes() == before
    inp = tmp_path / "export" / "data" / "test.jsonl"
    inp.parent.mkdir(parents=True)
    shutil.copyfile(probe_context["input"], inp)
    argv = ["--input", str(inp), "--out", str(inp.parent.parent), "--overwrite"]
    assert cli.run(export_lm_eval.main, argv) == 2
    assert _one_error_line(capsys).startswith(f"error: --out: {inp.parent.parent} holds the input {inp}")
    assert inp.is_file()


@pytest.mark.parametrize("keep", [0, 200])
def test_a_truncated_state_file_is_one_line_naming_it(keep, tmp_path):
    """What --resume reads from state/ (every torch.load there goes through the weights-only loader)."""
    import torch

    from src.common.errors import BadFile
    from src.train.weights_only import forced_weights_only, load_weights_only

    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(1000)}}, path)
    _truncate(path, keep)
    with pytest.raises(BadFile, match=rf"{path}: damaged or incomplete checkpoint file"):
        load_weights_only(path)
    with forced_weights_only(), pytest.raises(BadFile, match=rf"{path}: damaged or incomplete checkpoint file"):
        torch.load(path, map_location="cpu")
