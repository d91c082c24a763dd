"""Faults that real runs meet, end to end on tiny models: kill -9 during a checkpoint save and in mid-training, then
``--resume latest`` gives the uninterrupted losses; kill -9 of step 4, then a rerun gives the uninterrupted
predictions and score; a full disk while saving is one line, leaves no partial checkpoint and the last complete one
loadable. Processes are killed at points they announce, never after a guessed delay."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port

STEPS = 4


def _env(**extra) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**env, **{k: str(v) for k, v in extra.items()}}


def _train_cmd(model, rows, out, *more) -> list[str]:
    return [sys.executable, "-m", "src.train.train", "--model", str(model), "--train", str(rows), "--out", str(out),
            "--lr", "1e-2", "--batch-size", "2", "--grad-accum", "1", "--max-steps", str(STEPS), "--save-every", "2",
            "--eval-every", "-1", "--no-progress", *map(str, more)]


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "train_log.jsonl").read_text().splitlines())}


def _run_until(cmd, line_start: str, **env) -> subprocess.Popen:
    """Start ``cmd`` and return once it prints a line starting with ``line_start`` (it keeps running)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    for line in proc.stdout:
        if line.startswith(line_start):
            return proc
    proc.wait(timeout=60)
    raise AssertionError(f"{cmd[2]} ended ({proc.returncode}) before printing {line_start!r}")


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_kill9_during_save_and_mid_training_then_resume_gives_the_same_losses(tiny_model_dir, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    ref = tmp_path / "ref"
    done = subprocess.run(_train_cmd(tiny_model_dir, rows, ref), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "killed"
    # kill -9 while checkpoint-4 is half saved (its files written, not yet renamed)
    proc = _run_until(_train_cmd(tiny_model_dir, rows, out), "[train] APOLLO_TRAIN_CRASH_IN_SAVE_AT_STEP=pause-4",
                      APOLLO_TRAIN_CRASH_IN_SAVE_AT_STEP="pause-4")
    _kill9(proc)
    assert (out / ".tmp-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")  # the last complete checkpoint loads
    # resume, and kill -9 again in mid-training (after step 3 is logged, before the next save)
    proc = _run_until(_train_cmd(tiny_model_dir, rows, out, "--resume", "latest"), "[train] resumed from")
    while proc.poll() is None and 3 not in _losses(out):  # poll the log the run appends to
        time.sleep(0.05)
    if proc.poll() is None:
        _kill9(proc)
    final = subprocess.run(_train_cmd(tiny_model_dir, rows, out, "--resume", "latest"), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    got, want = _losses(out), _losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6)
    assert not (out / ".tmp-checkpoint-4").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_kill9_of_step4_then_rerun_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    from test_eval import make_records

    from src.common.chat_formats import resolve_format
    from src.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    from transformers import AutoConfig

    recs = make_records(tmp_path, tok, resolve_format(tok, AutoConfig.from_pretrained(tiny_model_dir)), k=1)[:12]
    inp = tmp_path / "test.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")

    def cmd(out):
        return [sys.executable, "-m", "src.evaluate.eval", "--model", str(tiny_model_dir), "--input", str(inp),
                "--out", str(out), "--max-new-tokens", "16", "--batch-size", "2", "--no-progress", "--threads", "1"]

    ref = tmp_path / "ref"
    assert subprocess.run(cmd(ref), cwd=ROOT, env=_env(), capture_output=True, timeout=600).returncode == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pred = out / "predictions.jsonl"
    while proc.poll() is None and not (pred.is_file() and pred.read_text().count("\n") >= 2):
        time.sleep(0.05)  # poll the file the run appends to
    killed_early = proc.poll() is None
    if killed_early:
        _kill9(proc)
    assert subprocess.run(cmd(out), cwd=ROOT, env=_env(), capture_output=True, timeout=600).returncode == 0
    if killed_early:
        assert json.loads((out / "run.json").read_text())["resumed"] >= 2
    assert (out / "predictions.jsonl").read_text() == (ref / "predictions.jsonl").read_text()
    assert json.loads((out / "score.json").read_text()) == json.loads((ref / "score.json").read_text())


def _tmpfs(path: Path, megabytes: int) -> bool:
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tiny_model_dir, rows, tmp_path):
    from transformers import AutoModelForCausalLM

    disk = tmp_path / "disk"
    # one tiny-model checkpoint is about 77 MB: the first fits, the second runs out of space
    if not _tmpfs(disk, 120):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = disk / "ckpts"
        cmd = _train_cmd(tiny_model_dir, rows, out, "--log-dir", tmp_path / "logs")
        cmd[cmd.index("--save-every") + 1] = "1"
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 2, r.stderr[-3000:]
        assert r.stderr.strip().splitlines()[-1] == f"error: no space left on device: {out}"
        assert "Traceback" not in r.stderr
        assert not list(out.glob(".tmp-*"))  # the partial checkpoint is removed
        AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_two_processes_end_like_one_a_mistake_is_one_line_and_ctrl_c_is_130(tiny_model_dir, rows, tmp_path):
    """3.single_node_train.sh with 2 processes (src/train/launch.py): the ranks' error line once, exit code 2, no
    launcher traceback; Ctrl-C to the process group: one "interrupted" line, exit code 130."""
    script = ["bash", str(ROOT / "3.single_node_train.sh")]
    env = _env(NUM_PROCESSES=2, MAIN_PORT=free_port())
    bad = subprocess.run([*script, *_train_cmd(tiny_model_dir, tmp_path / "missing", tmp_path / "a")[3:]], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-3000:]
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'missing'}: training rows not found (step 2 writes them: "
                      "2.data_process_train.sh)"], bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr and "ChildFailedError" not in bad.stderr

    cmd = [*script, *_train_cmd(tiny_model_dir, rows, tmp_path / "b", "--max-steps", 100000, "--save-every", 0)[3:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, "MAIN_PORT": str(free_port())}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "b" / "train_log.jsonl").exists():  # a first step done: both ranks are training
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert [line for line in stderr.splitlines() if line.startswith("interrupted")] == [
        "interrupted (Ctrl-C): what was written so far is kept; rerun the same command to resume"], stderr[-3000:]
    assert "Traceback" not in stderr


def test_launcher_report_keeps_each_ranks_own_message_once(tmp_path):
    """What src/train/launch.py prints from torch elastic's failure records (real ProcessFailure objects read from
    error files as the ranks write them through src/common/cli.py)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from src.common import cli
    from src.train import launch

    def failure(rank, code, message=None):
        path = tmp_path / f"error{rank}.json"
        if message is not None:
            os.environ["TORCHELASTIC_ERROR_FILE"] = str(path)
            try:
                cli.emit(message)
            finally:
                del os.environ["TORCHELASTIC_ERROR_FILE"]
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file=str(path))

    same = {0: failure(0, 2, "error: --lr: must be positive"), 1: failure(1, 2, "error: --lr: must be positive")}
    assert launch.report_failures(same) == 2
    # rank 1 failed on its own; rank 0 was stopped by the launcher (SIGTERM) and wrote nothing: rank 1 is the report
    one = {0: failure(0, -signal.SIGTERM), 1: failure(1, 1, "error: internal error: RuntimeError: boom")}
    assert launch.report_failures(one) == 1
    killed = {0: failure(0, -signal.SIGKILL)}
    assert launch.report_failures(killed) == 128 + signal.SIGKILL
