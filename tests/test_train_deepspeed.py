"""Step 3 end to end on CPU with tiny models: accelerate + DeepSpeed ZeRO-2/ZeRO-3 with 2 processes (gloo), the
launch scripts, checkpoints (HF format, rotation, atomic save), exact resume, dev evaluation, multi-node and MoE."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _common(model, rows, out, *more) -> list[str]:
    return ["--model", str(model), "--train", str(rows), "--out", str(out), "--lr", "1e-2", "--batch-size", "2",
            "--grad-accum", "2", "--max-steps", str(STEPS), "--no-progress", *map(str, more)]


def single_node(args, *, nproc=2, check=True, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "3.single_node_train.sh", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=_env(NUM_PROCESSES=nproc, MAIN_PORT=free_port(), **env))
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def two_machines(script, args) -> list[subprocess.CompletedProcess]:
    """The multi-node script as 2 "machines" of 1 process each on this host (gloo)."""
    port = free_port()
    procs = [subprocess.Popen(["bash", script, "--machine-rank", str(r), "--main-ip", "127.0.0.1", "--main-port",
                               str(port), "--nodes", "2", "--gpus-per-node", "1", *map(str, args)], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
             for r in (0, 1)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for r, d in enumerate(done):
        assert d.returncode == 0, f"machine {r} failed:\n{d.stdout[-3000:]}\n{d.stderr[-5000:]}"
    return done


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "train_log.jsonl").read_text().splitlines())}


def generate_with_stock_transformers(path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = tok("The patient", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    return tok.decode(out[0])


@pytest.fixture(scope="module")
def rows_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """48 packed rows (2-3 documents each, prompt tokens without loss, a family id per document) drawn from a small
    fixed vocabulary, so a tiny model's loss drops fast."""
    import datasets

    rng = random.Random(0)
    vocab = [rng.randrange(200, 4000) for _ in range(40)]
    rows = []
    for _ in range(48):
        ids, labels, pos, langs = [], [], [], []
        for _ in range(rng.randint(2, 3)):
            n = rng.randint(10, 24)
            doc = [rng.choice(vocab) for _ in range(n)]
            lang = rng.randrange(7)
            ids += doc
            labels += [-100] * 3 + doc[3:]
            pos += list(range(n))
            langs += [lang] * n
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "language_ids": langs})
    path = tmp_path_factory.mktemp("rows") / "train"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory) -> Path:
    items = [("medqa-usmle", "en", "A patient has a fever. Which drug?"), ("medqa-mcmle", "zh", "患者发热，应选哪种药？"),
             ("medqa-usmle", "en", "Which organ makes insulin?"), ("medqa-mcmle", "zh", "哪个器官分泌胰岛素？"),
             ("medqa-usmle", "en", "What is the normal heart rate?")]
    path = tmp_path_factory.mktemp("dev") / "dev.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, (source, lang, q) in enumerate(items):
            prompt = f"Question: {q}\nOptions:\n(A) one\n(B) two\n(C) three\n(D) four\nAnswer: The answer is ("
            f.write(json.dumps({"id": f"{source}-{i}", "source": source, "language": lang, "prompt": prompt,
                                "answer": "ABCD"[i % 4], "letters": list("ABCD")}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, tiny_model_dir, rows_dir, dev_file) -> Path:
    out = tmp_path_factory.mktemp("zero2") / "ckpts"
    single_node(_common(tiny_model_dir, rows_dir, out, "--zero", 2, "--save-every", 2, "--max-ckpts", 2,
                        "--dev", dev_file, "--eval-every", 3, "--dev-max-new-tokens", 3))
    return out


def test_zero2_two_processes_trains_rotates_and_saves_hf_checkpoints(zero2_run):
    loss = losses(zero2_run)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert loss[STEPS] < loss[1] - 1.0, loss  # the loss decreases on this fixed set
    # rotation keeps the newest 2 (by step); the HF checkpoint loads with stock transformers and generates
    assert [p.name for p in sorted(zero2_run.glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-6"]
    last = zero2_run / "checkpoint-6"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == STEPS
    generate_with_stock_transformers(last)
    # dev evaluation with step 4's scorer at step 3 and at the end; TensorBoard logs
    for step in (3, 6):
        score = json.loads((zero2_run / "dev" / f"step-{step}" / "score.json").read_text())
        assert score["items"] == 5 and set(score["languages"]) == {"en", "zh"}
    assert list((zero2_run / "logs").rglob("events.out.tfevents.*"))
    rec = json.loads((zero2_run / "train_log.jsonl").read_text().splitlines()[0])
    assert rec["lr"] > 0 and rec["tokens_per_second"] > 0 and rec["grad_norm"] > 0


def test_resume_reproduces_the_uninterrupted_losses(zero2_run, tiny_model_dir, rows_dir, tmp_path):
    out = tmp_path / "resumed"
    single_node(_common(tiny_model_dir, rows_dir, out, "--zero", 2, "--save-every", 2, "--resume",
                        zero2_run / "checkpoint-4", "--eval-every", -1))
    full, resumed = losses(zero2_run), losses(out)
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)


def test_zero3_interrupted_save_keeps_the_last_checkpoint_and_resumes(zero2_run, tiny_model_dir, rows_dir, dev_file,
                                                                        tmp_path):
    out = tmp_path / "zero3"
    args = _common(tiny_model_dir, rows_dir, out, "--zero", 3, "--save-every", 2, "--eval-every", -1)
    crashed = single_node(args, check=False, APOLLO_TRAIN_CRASH_IN_SAVE_AT_STEP=4)
    assert crashed.returncode != 0
    assert (out / ".tmp-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    generate_with_stock_transformers(out / "checkpoint-2")  # the last complete checkpoint is intact
    before = losses(out)
    assert sorted(before) == [1, 2, 3, 4]
    # --resume latest picks checkpoint-2 (the half-written one is ignored and removed); dev eval under ZeRO-3
    single_node(args[:-2] + ["--resume", "latest", "--dev", dev_file, "--eval-every", 3, "--dev-max-new-tokens", 2])
    after = losses(out)
    assert sorted(after) == list(range(1, STEPS + 1)) and not (out / ".tmp-checkpoint-4").exists()
    for step in (3, 4):
        assert after[step] == pytest.approx(before[step], abs=1e-6)
    # ZeRO-3 computes the same training as ZeRO-2, up to the order of floating-point reductions (which lr 1e-2
    # amplifies over later steps)
    for step in (1, 2):
        assert after[step] == pytest.approx(losses(zero2_run)[step], rel=1e-5)
    assert (out / "dev" / "step-3" / "score.json").is_file()
    generate_with_stock_transformers(out / "checkpoint-6")


def test_multi_node_script_with_two_local_machines(zero2_run, tiny_model_dir, rows_dir, tmp_path):
    out = tmp_path / "multinode"
    # --stop-at-step ends the run early without changing the schedule: the steps match the single-node run's
    two_machines("scripts/multi_node_train_dense.sh",
                 _common(tiny_model_dir, rows_dir, out, "--zero", 2, "--stop-at-step", 2, "--eval-every", -1))
    got, full = losses(out), losses(zero2_run)
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        assert got[step] == pytest.approx(full[step], abs=1e-6)
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2


def test_wrong_model_kind_fails_fast(tiny_model_dir, rows_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "src.train.train", "--expect", "moe", "--model", str(tiny_model_dir),
                           "--train", str(rows_dir), "--out", str(tmp_path / "x")], cwd=ROOT, capture_output=True,
                          text=True, env=_env(), timeout=120)
    assert proc.returncode != 0 and "not a Post-MoE checkpoint" in proc.stderr


def test_moe_zero2_and_zero3_train_and_evaluate(tiny_model_dir, rows_dir, dev_file, tmp_path):
    moe = pytest.importorskip("src.models.moe")
    from src.common.io import iter_jsonl
    from src.evaluate.predict import predict
    from src.models.loading import load_model, load_tokenizer

    moe_dir = tmp_path / "tiny-moe"
    model = load_model(tiny_model_dir)
    moe.upcycle(model, num_experts=7, top_k=2, moe_layers=1, router_aux_loss_coef=0.01)
    moe.save_moe(model, load_tokenizer(tiny_model_dir), moe_dir)
    extra = ("--max-steps", 2, "--eval-every", -1, "--gradient-checkpointing")
    out2, out3 = tmp_path / "moe2", tmp_path / "moe3"
    single_node(_common(moe_dir, rows_dir, out2, "--zero", 2, *extra))
    two_machines("scripts/multi_node_train_moe.sh", _common(moe_dir, rows_dir, out3, "--zero", 3, *extra))
    l2, l3 = losses(out2), losses(out3)
    assert sorted(l2) == sorted(l3) == [1, 2]
    for step in (1, 2):
        assert l3[step] == pytest.approx(l2[step], rel=1e-4)
    rec = json.loads((out2 / "train_log.jsonl").read_text().splitlines()[0])
    assert rec["aux_loss"] > 0  # the load-balancing loss is part of the objective when its coefficient is > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out3 / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/aux_loss", "routing/layer1/imbalance"} <= set(tags)
    shares = [events.Scalars(f"routing/layer1/expert{e}")[-1].value for e in range(7)]
    assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    records = list(iter_jsonl(dev_file))
    for out in (out2, out3):
        ckpt = out / "checkpoint-2"
        assert moe.is_moe_checkpoint(ckpt)
        trained = load_model(ckpt)
        assert moe.is_moe(trained)
        preds = predict(trained, load_tokenizer(ckpt), records, max_new_tokens=2, progress=False)
        assert len(preds) == len(records)


def test_one_process_with_a_double_batch_computes_the_same_steps(zero2_run, tiny_model_dir, rows_dir, tmp_path):
    """The loss is the mean over the step's label tokens on all ranks: 1 process x 4 rows (ZeRO-1, plain python, no
    launcher) trains exactly as 2 processes x 2 rows (ZeRO-2)."""
    out = tmp_path / "one"
    args = _common(tiny_model_dir, rows_dir, out, "--zero", 1, "--stop-at-step", 2, "--save-every", -1,
                   "--eval-every", -1)
    args[args.index("--batch-size") + 1] = "4"
    proc = subprocess.run([sys.executable, "-m", "src.train.train", *args], cwd=ROOT, capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, full = losses(out), losses(zero2_run)
    assert sorted(got) == [1, 2] and not list(out.glob("checkpoint-*"))
    for step in (1, 2):
        assert got[step] == pytest.approx(full[step], rel=1e-5)


# ------------------------------------------------------------------------------- reliability (issue: lost work)
class _PlantedCode:
    """Unpickling this creates a marker file: proof that code from a checkpoint folder ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_never_unpickles_code_planted_in_the_state_folder(zero2_run, tiny_model_dir, rows_dir, tmp_path):
    import shutil

    import torch

    out = tmp_path / "ckpts"
    ckpt = out / "checkpoint-4"
    shutil.copytree(zero2_run / "checkpoint-4", ckpt)
    marker = tmp_path / "code-ran"
    target = next((ckpt / "state").rglob("mp_rank_00_model_states.pt"))
    torch.save({"module": _PlantedCode(marker)}, target)
    proc = single_node(_common(tiny_model_dir, rows_dir, out, "--zero", 2, "--resume", ckpt, "--eval-every", -1),
                       check=False)
    assert proc.returncode == 2 and not marker.exists(), proc.stderr[-3000:]
    # both ranks refuse; src/train/launch.py prints the line once, with no launcher traceback after it
    line = f"error: {target}: refused to load: it holds objects other than tensors and plain data"
    assert proc.stderr.count(line) == 1, proc.stderr[-3000:]
    assert "Unsupported global: GLOBAL io.open" in proc.stderr
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_a_fresh_run_refuses_an_older_runs_folder_and_overwrite_replaces_it(zero2_run, tiny_model_dir, rows_dir,
                                                                            tmp_path):
    import shutil

    out = tmp_path / "ckpts"
    shutil.copytree(zero2_run, out, ignore=shutil.ignore_patterns("logs", "dev"))
    cmd = [sys.executable, "-m", "src.train.train", *_common(tiny_model_dir, rows_dir, out, "--zero", 1,
                                                             "--max-steps", 2, "--save-every", 1, "--max-ckpts", 2,
                                                             "--eval-every", -1)]
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --out: ")
    assert "--resume latest" in refused.stderr and "--overwrite" in refused.stderr
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    done = subprocess.run(cmd + ["--overwrite"], cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # the new run keeps its own checkpoints (before: rotation by step removed each one as it was saved)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert sorted(losses(out)) == [1, 2]
