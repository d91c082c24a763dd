"""Reliability: no stale scores, no training on nothing, no pickle loaded from a model folder, checkpoint rotation and
replacement that never lose a checkpoint, and every user mistake as one `error:` line with exit code 2.
(Step 3 runs: tests/test_train_deepspeed.py; crash recovery end to end: tests/test_faults.py.)"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE, make_tiny_llama
from src.common import cli
from src.common.errors import DataError, UsageError


def _sigint_as_in_a_terminal() -> None:
    """A child of a shell's background job starts with SIGINT ignored (so Python installs no KeyboardInterrupt
    handler); a command typed in a terminal has the default. Tests of Ctrl-C give their child the latter."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("APOLLO_DEBUG", None)
    return {**env, **extra}


def _run(module, *args, input=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env=_env(**env), timeout=300, input=input)


def _write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def _preds(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


class PlantedCode:
    """Unpickling this creates a marker file: proof that code from a model or checkpoint folder ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def tiny_recs(tiny_model_dir, tmp_path_factory):
    """Step 1 records for the tiny model: 3-shot and 0-shot prompts of the same items (the same ids)."""
    from test_eval import make_records

    from src.common.chat_formats import resolve_format
    from src.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    from transformers import AutoConfig

    fmt = resolve_format(tok, AutoConfig.from_pretrained(tiny_model_dir))
    three = make_records(tmp_path_factory.mktemp("k3"), tok, fmt, k=2)
    zero = make_records(tmp_path_factory.mktemp("k0"), tok, fmt, k=0)
    assert [r["id"] for r in three] == [r["id"] for r in zero] and three[0]["prompt"] != zero[0]["prompt"]
    return three, zero


# ------------------------------------------------------------------------------------- step 4: stale predictions
def test_step4_recomputes_predictions_of_other_prompts_or_other_weights(tiny_model_dir, smollm2_tokenizer, tiny_recs,
                                                                        tmp_path):
    from src.evaluate import eval as step4

    model = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, model)
    three, zero = tiny_recs
    inp = tmp_path / "test.jsonl"
    out = tmp_path / "res"
    args = ["--model", str(model), "--input", str(inp), "--out", str(out), "--max-new-tokens", "4", "--no-progress",
            "--limit", "4"]

    def run_json():
        return json.loads((out / "run.json").read_text())

    _write_jsonl(inp, three)
    assert step4.main(args) == 0 and run_json()["predicted_now"] == 4
    assert step4.main(args) == 0 and run_json()["predicted_now"] == 0  # same prompts, same weights: reused
    _write_jsonl(inp, zero)  # step 1 rerun with other shots into the same folder: same ids, other prompts
    assert step4.main(args) == 0 and run_json()["predicted_now"] == 4
    preds = _preds(out / "predictions.jsonl")
    assert len(preds) == 4 and len({p["fingerprint"] for p in preds}) == 4
    shutil.rmtree(model)
    make_tiny_llama(smollm2_tokenizer, model, seed=1)  # retrained into the same checkpoint path
    assert step4.main(args) == 0 and run_json()["predicted_now"] == 4
    assert not {p["fingerprint"] for p in preds} & {p["fingerprint"] for p in _preds(out / "predictions.jsonl")}


# ---------------------------------------------------------------------------------------- training on nothing
def test_step2_fails_when_every_answer_is_truncated_away(smollm2_dir, tmp_path, capsys):
    from src.prepare import train_data

    out = tmp_path / "o"
    code = cli.run(train_data.main, ["--data", str(SAMPLE / "train.json"), "--model", str(smollm2_dir), "--out",
                                     str(out), "--max-seq-len", "32"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and not (out / "train").exists()
    assert err.startswith("error: no training row has a loss token: ")
    assert "lost all their answer tokens to truncation at --max-seq-len 32" in err


def _rows(path, labels):
    import datasets

    datasets.Dataset.from_list([{"input_ids": [5, 6, 7, 8], "labels": lab, "position_ids": [0, 1, 2, 3]}
                                for lab in labels]).save_to_disk(str(path))
    return path


def test_step3_refuses_rows_without_label_tokens_and_takes_step2_folders(tmp_path):
    from src.train.data import load_rows

    with pytest.raises(ValueError, match="no row has a label token"):
        load_rows(_rows(tmp_path / "empty", [[-100] * 4] * 3))
    step2 = tmp_path / "step2"
    _rows(step2 / "train", [[-100, 6, 7, 8], [-100] * 4])
    # a mixture.json as step 2's first format wrote it: its rows digest begins with the fingerprint in state.json
    digest = json.loads((step2 / "train" / "state.json").read_text())["_fingerprint"]
    (step2 / "mixture.json").write_text(json.dumps({"format_version": 1, "rows_sha256": digest}))
    assert len(load_rows(step2)) == 2  # step 2's output folder, as well as its train/ subfolder


# ------------------------------------------------------------------------------ checkpoints: rotation, replace
def _ckpt(out, step, tag="x"):
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "tag": tag}))
    return d


def test_rotation_never_removes_the_checkpoint_just_written(tmp_path):
    from src.train import checkpoint as ckpt

    for step in (4, 6):
        _ckpt(tmp_path, step, "older run")
    new = _ckpt(tmp_path, 2, "this run")
    removed = ckpt.rotate(tmp_path, 2, keep=new)
    assert [p.name for p in removed] == ["checkpoint-4"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-6"]


def test_a_crash_between_the_two_renames_of_a_resave_keeps_the_step(tmp_path):
    from src.train import checkpoint as ckpt

    _ckpt(tmp_path, 4, "first save")
    tmp = tmp_path / ".tmp-checkpoint-4"
    tmp.mkdir()
    (tmp / "trainer_state.json").write_text(json.dumps({"step": 4, "tag": "second save"}))
    code = ("import sys; from pathlib import Path; from src.train import checkpoint as c; "
            "c._replace_dir(Path(sys.argv[1]), Path(sys.argv[2]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp), str(tmp_path / "checkpoint-4")], cwd=ROOT,
                          env=_env(**{ckpt.CRASH_ENV: "replace-4"}), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 17 and not (tmp_path / "checkpoint-4").exists()  # died between the renames
    ckpt.clean_stale(tmp_path)  # what the next run does first
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["tag"] == "first save"
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert not list(tmp_path.glob(".*"))


# -------------------------------------------------------------------------------------------- never unpickle
def test_planted_rng_state_is_refused_without_running_it(tmp_path):
    import torch

    from src.train.weights_only import UnsafeCheckpointError, load_weights_only

    marker = tmp_path / "code-ran"
    rng = tmp_path / "random_states_0.pkl"
    torch.save({"step": 0, "random_state": PlantedCode(marker)}, rng)
    with pytest.raises(UnsafeCheckpointError, match="random_states_0.pkl: refused to load"):
        load_weights_only(rng)
    assert not marker.exists()


def test_deepspeed_and_accelerate_loads_go_through_the_weights_only_load(tmp_path):
    """Pins the library internals weights_only.py leans on (DeepSpeed 0.19's checkpoint engine, accelerate 1.15's
    load helper): inside forced_weights_only their loads refuse a planted pickle and still read plain tensors."""
    import torch
    from accelerate.utils.other import load as accelerate_load
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from src.train.weights_only import UnsafeCheckpointError, forced_weights_only

    marker = tmp_path / "code-ran"
    planted, plain = tmp_path / "planted.pt", tmp_path / "plain.pt"
    torch.save({"module": PlantedCode(marker)}, planted)
    torch.save({"module": {"w": torch.ones(2)}}, plain)
    engine = TorchCheckpointEngine()
    with forced_weights_only():
        for load in (engine.load, accelerate_load):
            with pytest.raises(UnsafeCheckpointError, match="planted.pt: refused to load"):
                load(str(planted), map_location="cpu")
            assert torch.equal(load(str(plain), map_location="cpu")["module"]["w"], torch.ones(2))
    assert not marker.exists()


def test_a_model_folder_with_only_pickled_weights_is_refused(tiny_model_dir, tmp_path):
    import torch

    from src.models.loading import load_model

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": PlantedCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UsageError, match="pytorch_model.bin, pickled weights, which are never loaded"):
        load_model(folder)
    assert not marker.exists()
    # the chat (and step 4, upcycling: the same loader) end with that one line
    r = _run("src.evaluate.cli_demo", "--model", folder, input="hello\n")
    assert r.returncode == 2 and not marker.exists()
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
    assert "pickled weights" in r.stderr and "Traceback" not in r.stderr
    r = _run("util.upcycle_moe", "--model", folder, "--out", tmp_path / "moe")
    assert r.returncode == 2 and "pickled weights" in r.stderr and not marker.exists()


def test_averaging_reads_only_safetensors_and_drops_trainer_state(tiny_model_dir, tmp_path):
    from util.average_checkpoints import save_average

    ckpts = []
    for step in (1, 2):
        d = tmp_path / f"checkpoint-{step}"
        shutil.copytree(tiny_model_dir, d)
        (d / "trainer_state.json").write_text(json.dumps({"step": step}))
        ckpts.append(d)
    out = save_average(ckpts, tmp_path / "avg")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "trainer_state.json").exists()


# ---------------------------------------------------------------------------------- one-line errors, exit codes
def _last_line_only(proc):
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def test_a_bad_record_is_one_line_and_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"question": "Q?", "options": {"A": "one", "B": None}, "answer": "A",
                                  "source": "medqa-usmle"}]))
    args = ["--bench", bench, "--model", tiny_model_dir, "--out", tmp_path / "o"]
    r = _run("src.prepare.bench_prompts", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert _last_line_only(r) == (f"error: {bench}: record 0, field 'options': option 'B': expected a string, "
                                  f"got NoneType")
    assert "Traceback" in _run("src.prepare.bench_prompts", *args, "--debug").stderr
    assert "Traceback" in _run("src.prepare.bench_prompts", *args, APOLLO_DEBUG="1").stderr


def test_flag_parse_errors_and_interrupts_are_one_line(capsys):
    from src.prepare import bench_prompts

    assert cli.run(bench_prompts.main, ["--shots", "x"]) == 2
    assert capsys.readouterr().err == "error: --shots: invalid int value: 'x'\n"

    def interrupted(argv):
        raise KeyboardInterrupt

    assert cli.run(interrupted, []) == 130
    assert capsys.readouterr().err.startswith("interrupted (Ctrl-C)")


def test_missing_models_and_offline_hub_ids_are_one_line(tmp_path):
    r = _run("src.prepare.bench_prompts", "--model", tmp_path / "nope", "--out", tmp_path / "o")
    assert r.returncode == 2 and _last_line_only(r) == f"error: --model: no such model folder: {tmp_path / 'nope'}"
    r = _run("src.evaluate.eval", "--model", "no-such-org/no-such-model", "--input", SAMPLE / "bench_test.json",
             "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert _last_line_only(r).startswith("error: ")
    from src.models.loading import load_tokenizer

    with pytest.raises(UsageError, match="no-such-org/no-such-model: not a local folder, and the hub is offline"):
        load_tokenizer("no-such-org/no-such-model")


def test_step1_and_step4_reject_nonsense_counts(tiny_model_dir, tiny_recs, tmp_path):
    from src.evaluate import eval as step4
    from src.prepare import bench_prompts

    with pytest.raises(UsageError, match="--shots: must be at least 0, got -1"):
        bench_prompts.main(["--model", str(tiny_model_dir), "--shots", "-1", "--out", str(tmp_path / "o")])
    with pytest.raises(UsageError, match="--max-tokens: no test item fits in 5 tokens"):
        # the shipped sample, not data/raw/ (step 0 has not run on a fresh clone)
        bench_prompts.main(["--model", str(tiny_model_dir), "--max-tokens", "5", "--bench", str(SAMPLE / "bench_test.json"),
                       "--dev", str(SAMPLE / "bench_dev.json"), "--out", str(tmp_path / "o")])
    inp = _write_jsonl(tmp_path / "t.jsonl", tiny_recs[0][:3])
    for flag, value in (("--limit", "-1"), ("--limit", "0"), ("--max-new-tokens", "0"), ("--batch-size", "0")):
        with pytest.raises(UsageError, match=f"{flag}: must be at least 1, got {value}"):
            step4.main(["--model", str(tiny_model_dir), "--input", str(inp), "--out", str(tmp_path / "r"),
                        flag, value])
    assert not (tmp_path / "r").exists()


def test_malformed_bench_items_are_rejected_not_accepted(tmp_path):
    from src.prepare.bench_items import load_bench

    good = {"question": "Q?", "options": "(A) one\n(B) two", "answer": "A", "source": "medqa-usmle"}
    cases = [({"options": {"A": "one", "B": ["y", 1]}}, "options", "option 'B': expected a string, got list"),
             ({"options": "(A) one\n(B) two\n\nAnswer: B"}, "options", "text after the last option"),
             ({"language": 7}, "language", "must be a language code string, got int")]
    for change, field, message in cases:
        path = tmp_path / "b.json"
        path.write_text(json.dumps([good, {**good, **change}]))
        with pytest.raises(DataError, match=message) as e:
            load_bench(path)
        assert e.value.index == 1 and e.value.field == field
        items, rejects = load_bench(path, skip_errors=True)  # --on-error skip: a reject, not a TypeError
        assert len(items) == 1 and rejects[0]["field"] == field
    # an option running over two lines is still one option
    path.write_text(json.dumps([{**good, "options": "(A) one\ncontinued\n(B) two"}]))
    assert load_bench(path)[0][0].options[0] == ("A", "one\ncontinued")


def test_non_utf8_input_names_the_file_and_byte_offset(tmp_path):
    from src.common import io

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    for read in (io.read_json, lambda p: list(io.iter_jsonl(p)), lambda p: list(io.iter_json_array(p))):
        with pytest.raises(DataError, match=r"bad.jsonl: record at byte 19: not UTF-8 text"):
            read(bad)


def test_ctrl_c_is_one_line_and_exit_130(tiny_model_dir, tiny_recs, tmp_path):
    inp = _write_jsonl(tmp_path / "t.jsonl", tiny_recs[0])
    proc = subprocess.Popen([sys.executable, "-m", "src.evaluate.eval", "--model", str(tiny_model_dir), "--input",
                             str(inp), "--out", str(tmp_path / "r"), "--max-new-tokens", "64", "--batch-size", "1",
                             "--min-new-tokens", "64"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    for line in proc.stdout:  # wait until it is predicting
        if line.startswith("[step 4]"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted")


def test_chat_survives_invalid_utf8_on_stdin(tiny_model_dir):
    env = _env()
    r = subprocess.run([sys.executable, "-m", "src.evaluate.cli_demo", "--model", str(tiny_model_dir), "--greedy",
                        "--max-new-tokens", "3"], input=b"caf\xe9 au lait?\nsecond question\nquit\n",
                       capture_output=True, cwd=ROOT, env=env, timeout=300)
    out = r.stdout.decode("utf-8", "replace")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "not valid UTF-8" in out and out.count("Assistant: ") == 2


# ------------------------------------------------------------------------------------- one writer per --out
@pytest.fixture()
def other_writer(tmp_path):
    """Another process holding OUT's lock, as a second run of a step would."""
    out = tmp_path / "out"
    code = "import sys; from src.common import locks; locks.hold(sys.argv[1], 'step 4'); print('held', flush=True); " \
           "sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=ROOT, env=_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield out, proc.pid
    proc.stdin.close()
    proc.wait(timeout=60)


def test_a_second_writer_of_one_out_is_refused(other_writer, tiny_model_dir, smollm2_dir, tiny_recs, rows, tmp_path):
    from src.evaluate import eval as step4
    from src.prepare import train_data

    out, pid = other_writer
    inp = _write_jsonl(tmp_path / "t.jsonl", tiny_recs[0][:2])
    with pytest.raises(UsageError, match=rf"--out: {out} is being written by another process \(step 4, pid {pid},"):
        step4.main(["--model", str(tiny_model_dir), "--input", str(inp), "--out", str(out), "--no-progress"])
    assert not (out / "predictions.jsonl").exists()
    with pytest.raises(UsageError, match=rf"--out: {out} is being written by another process \(step 4, pid {pid},"):
        train_data.main(["--data", str(SAMPLE / "train.json"), "--model", str(smollm2_dir), "--out", str(out)])
    r = _run("src.train.train", "--model", tiny_model_dir, "--train", rows, "--out", out)
    assert r.returncode == 2 and _last_line_only(r).startswith(f"error: --out: {out} is being written by another")


def test_the_lock_dies_with_its_process(tmp_path):
    from src.common import locks

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", "import sys, os; from src.common import locks; "
                             "locks.hold(sys.argv[1], 'x'); os.kill(os.getpid(), 9)", str(out)], cwd=ROOT, env=_env())
    proc.wait(timeout=60)
    assert proc.returncode == -9 and (out / locks.LOCK_NAME).is_file()
    assert locks.hold(out, "next run") == out / locks.LOCK_NAME  # kill -9 leaves no stale lock


def test_steps_1_and_2_rerun_with_the_same_settings_and_refuse_others_without_overwrite(tiny_model_dir, tmp_path,
                                                                                      capsys):
    """A rerun into the same --out rewrites the same files; other settings (which would replace results made
    differently) need --overwrite, and the refusal names what changed."""
    from src.prepare import bench_prompts, train_data

    one = ["--model", str(tiny_model_dir), "--bench", str(SAMPLE / "bench_test.json"), "--dev",
           str(SAMPLE / "bench_dev.json"), "--out", str(tmp_path / "s1")]
    assert bench_prompts.main(one) == 0
    first = (tmp_path / "s1" / "test.jsonl").read_bytes()
    assert bench_prompts.main(one) == 0 and (tmp_path / "s1" / "test.jsonl").read_bytes() == first
    with pytest.raises(UsageError, match=r"--out: .* step 1 outputs made with other settings \(shots: 3 -> 0\)"):
        bench_prompts.main([*one, "--shots", "0"])
    assert (tmp_path / "s1" / "test.jsonl").read_bytes() == first  # untouched
    assert bench_prompts.main([*one, "--shots", "0", "--overwrite"]) == 0
    assert json.loads((tmp_path / "s1" / "report.json").read_text())["settings"]["shots"] == 0

    two = ["--model", str(tiny_model_dir), "--data", str(SAMPLE / "train.json"), "--out", str(tmp_path / "s2"),
           "--num-proc", "1"]
    assert train_data.main(two) == 0
    digest = json.loads((tmp_path / "s2" / "mixture.json").read_text())["rows_sha256"]
    assert train_data.main(two) == 0
    capsys.readouterr()
    assert cli.run(train_data.main, [*two, "--seed", "7"]) == 2
    assert "step 2 outputs made with other settings (seed: 42 -> 7); pass --overwrite" in capsys.readouterr().err
    assert json.loads((tmp_path / "s2" / "mixture.json").read_text())["rows_sha256"] == digest
    assert not (tmp_path / "s2" / ".lock").exists()  # the refusal releases the lock
    assert train_data.main([*two, "--seed", "7", "--overwrite"]) == 0
    assert json.loads((tmp_path / "s2" / "mixture.json").read_text())["rows_sha256"] != digest


def test_atomically_written_outputs_get_ordinary_permissions(tmp_path):
    """Outputs are written beside their target and renamed into place; the temporary file tempfile makes is private
    (0600), which the output must not keep: a results folder shared with a group reads like any other file."""
    import os
    import stat

    from src.common.io import JsonArrayWriter, write_json, write_jsonl

    mask = os.umask(0o022)
    os.umask(mask)
    write_json(tmp_path / "a.json", {"x": 1})
    write_jsonl(tmp_path / "b.jsonl", [{"x": 1}])
    w = JsonArrayWriter(tmp_path / "c.json")
    w.write({"x": 1})
    w.close()
    for name in ("a.json", "b.jsonl", "c.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
