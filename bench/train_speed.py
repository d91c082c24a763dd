"""Step 3 speed: training tokens/s, MFU, peak memory and per-step losses of our trainer's paths (attention kernel,
loss, Liger, torch.compile, Post-MoE) against a plain HF loop, on the same model, rows and machine.

    python bench/train_speed.py [--layers 4] [--seq 1024] [--batch-size 2] [--grad-accum 2] [--steps 3] [--json F]
    python bench/train_speed.py --methods sdpa,varlen,varlen+liger,compile,ours,moe --preset qwen2-0.5b --seq 4096 \\
        --batch-size 4 --grad-accum 2 --steps 20 --threads 0 --method-timeout 120 --jsonl results/train.jsonl  # GPU

Methods (``--methods``, comma-separated, run in this order; default ``plain,ours``, the figures docs/train.md holds):

- ``plain``: a reference-style HF loop (forward with labels, backward, clip 1.0, torch AdamW, zero_grad; stock
  attention: sdpa, or flash_attention_2 when flash-attn is installed). With ``--rounds`` it runs first and again
  after each round, as before.
- ``ours``: our trainer (``python -m src.train.train``, one process, DeepSpeed ZeRO-1) with its automatic choices.
- ``sdpa``, ``chunked``, ``varlen``, ``flex``, ``varlen+liger``: our trainer with that attention/loss/kernels
  combination (``METHODS`` below); ``compile``: ``ours`` plus ``--compile``.
- ``moe``: ``ours`` on a Post-MoE model upcycled from the benchmark model with ``util/upcycle_moe.py`` (7 experts,
  top-2, the last 2 layers); its line adds tokens/s x compute parameters against the dense ``ours`` run's (list
  ``ours`` before it).

Each method runs in a fresh process; its result is printed as one JSON line the moment it ends (and appended to
``--jsonl``), so a run cut short still reports what it measured. A method that cannot run here is reported as
skipped with the reason; one that fails or passes ``--method-timeout`` is reported as such, with the steps it logged.
Per method: tokens/s by wall and by CPU time (median step after ``--warmup``; data collation included), MFU when the
peak FLOP/s is known (GPU or ``--peak-tflops``), peak memory (``torch.cuda.max_memory_allocated`` on a GPU, the
process's peak RSS on CPU), the loss of every step (all methods read the same rows in the same order) and its
largest relative difference from the first method's.

Model: SmolLM2-135M's architecture (tokenizer and config from models/SmolLM2-135M-Instruct) with ``--layers`` decoder
layers and random weights (seeded), or ``--model PATH``; ``--preset qwen2-0.5b`` is Qwen2-0.5B's shape (24 layers,
hidden 896, vocabulary 151,936). Rows: ``--seq``-token packed rows of 2-4 documents with per-document position ids,
all the same length so every step does the same work. fp32 on CPU, bf16 on GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.common.defaults import DEFAULT_MODEL  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SMOLLM2 = DEFAULT_MODEL
# Trainer flags per method (the model and the shared settings are added by trainer_argv).
METHODS = {
    "ours": [],
    "sdpa": ["--attn-impl", "sdpa", "--loss", "full", "--kernels", "none"],
    "chunked": ["--attn-impl", "sdpa", "--loss", "chunked", "--kernels", "none"],
    "varlen": ["--attn-impl", "varlen", "--loss", "chunked", "--kernels", "none"],
    "flex": ["--attn-impl", "flex", "--loss", "chunked", "--kernels", "none"],
    "varlen+liger": ["--attn-impl", "varlen", "--loss", "liger", "--kernels", "liger"],
    "compile": ["--compile"],
    "moe": [],
}
ALL_METHODS = ("plain", *METHODS)


# ------------------------------------------------------------------------------------------------ the inputs
def build_model_dir(args, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    if args.model:
        return Path(args.model)
    if not SMOLLM2.is_dir():
        raise SystemExit(f"{SMOLLM2} is missing (run 0.download_data.sh) or pass --model PATH")
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    if args.preset == "qwen2-0.5b":
        config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                             tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        config = AutoConfig.from_pretrained(SMOLLM2)
        config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_rows(args, vocab_size: int, out: Path) -> Path:
    import datasets

    rng = random.Random(0)
    rows = []
    n_rows = args.batch_size * args.grad_accum * (args.steps + args.warmup + 1)
    for _ in range(n_rows):
        cuts = sorted(rng.sample(range(16, args.seq - 16), rng.randint(1, 3)))
        lengths = [b - a for a, b in zip([0] + cuts, cuts + [args.seq])]
        ids, labels, pos, langs = [], [], [], []
        for n in lengths:
            doc = [rng.randrange(100, vocab_size) for _ in range(n)]
            prompt = min(n - 1, rng.randint(4, 32))
            ids += doc
            labels += [-100] * prompt + doc[prompt:]
            pos += list(range(n))
            langs += [rng.randrange(7)] * n
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "language_ids": langs})
    datasets.Dataset.from_list(rows).save_to_disk(str(out))
    return out


def upcycle(model_dir: Path, out: Path) -> str | None:
    """The Post-MoE benchmark model in ``out`` with util/upcycle_moe.py's defaults (7 experts, top-2, the last 2
    layers), unless it is there already; the reason when that fails."""
    if (out / "config.json").is_file():
        return None
    proc = subprocess.run([sys.executable, "-m", "util.upcycle_moe", "--model", str(model_dir), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=os.environ)
    return None if proc.returncode == 0 else f"upcycling failed: {(proc.stderr.strip().splitlines() or [''])[-1]}"


# ------------------------------------------------------------------------------------------ inside a child
def peaks() -> dict:
    import resource

    import torch

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux counts KiB
            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}


def child_train(argv: list[str]) -> dict:
    """Our trainer in this process; what it chose and its peak memory."""
    from src.train.config import TrainConfig
    from src.train.train import build_parser, single_process_env
    from src.train.trainer import Trainer

    single_process_env()
    trainer = Trainer(TrainConfig.from_args(build_parser().parse_args(argv)))
    trainer.fit()
    return {"compute_params": trainer.n_flop_params, "attention": trainer.attn_impl, "loss_kind": trainer.loss,
            "kernels": trainer.kernels, **peaks()}


def child_plain(model_dir: Path, rows_dir: Path, args) -> dict:
    """The reference-style loop: HF loss, backward, clip 1.0, torch AdamW, zero_grad; per-step times and losses."""
    import torch
    from transformers import AutoModelForCausalLM

    from src.models.loading import load_tokenizer
    from src.train.attention import flash_attn_installed
    from src.train.data import BatchPlan, Collator, load_rows
    from src.train.optim import build_optimizer
    from src.train.runtime import flop_params, peak_flops

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    attn = "flash_attention_2" if on_gpu and flash_attn_installed() else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model.to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = build_optimizer(model, 1e-5, 0.1)
    rows = load_rows(rows_dir)
    collate = Collator(load_tokenizer(model_dir).pad_token_id, flatten=attn.startswith("flash"))
    plan = BatchPlan(len(rows), 1, args.batch_size, args.grad_accum)
    n_params, cfg = flop_params(model), model.config
    recs = []
    for step in range(args.warmup + args.steps):
        if on_gpu:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        micro = [collate([rows[i] for i in plan.rows(step * args.grad_accum + m, 0)]) for m in range(args.grad_accum)]
        n_label = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        ce = torch.zeros((), device=device)
        for batch in micro:
            inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()
                      if k not in ("num_tokens", "doc_len_sq", "language_ids")}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                loss = model(**inputs, use_cache=False).loss
            (loss / args.grad_accum).backward()
            ce += loss.detach().float() * int((batch["labels"][:, 1:] != -100).sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()
        tokens = sum(b["num_tokens"] for b in micro)
        flops = 6.0 * n_params * tokens + 12.0 * cfg.num_hidden_layers * cfg.hidden_size * sum(
            b["doc_len_sq"] for b in micro)
        recs.append({"step": step + 1, "loss": float(ce) / max(n_label, 1), "tokens": tokens, "flops": flops,
                     "step_seconds": time.perf_counter() - t, "step_cpu_seconds": time.process_time() - c})
    peak = peak_flops(args, device)
    for r in recs:
        if peak:
            r["mfu"] = r.pop("flops") / (r["step_seconds"] * peak)
        r.pop("flops", None)
    return {"records": recs, "attention": attn, "loss_kind": "HF (full logits)", "kernels": "none",
            "compute_params": n_params, **peaks()}


# ------------------------------------------------------------------------------------------ running a method
GRACE_SECONDS = 20  # after SIGTERM, before SIGKILL


def _die_with_parent() -> None:
    """In the child, before it starts (Linux): a SIGTERM when this benchmark ends, however it ends, so a time limit
    around the benchmark never leaves a trainer holding the GPU. Its data workers follow it (torch's watchdog)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM first: the child turns it into SystemExit, so cleanup runs (a SIGKILL inside torch's extension-build
    lock would leave the lock file behind and every later run waiting on it); SIGKILL if it is still there later."""
    proc.terminate()
    try:
        proc.wait(GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_child(argv: list[str], args) -> tuple[str, dict | None, str]:
    """This script in a fresh process, within --method-timeout: (status, its last JSON line, stderr)."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # as scripts/env.sh sets it
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen([sys.executable, __file__, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    try:
        out, err = proc.communicate(timeout=args.method_timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, err = proc.communicate()
        return f"timed out after {args.method_timeout:g} s", None, err
    finally:
        if proc.poll() is None:  # the benchmark itself is being stopped (Ctrl-C, SIGTERM)
            _stop(proc)
    if proc.returncode != 0:
        return f"failed (exit code {proc.returncode})", None, err
    return "ok", json.loads(out.strip().splitlines()[-1]), err


def trainer_argv(method: str, model_dir: Path, rows_dir: Path, out: Path, args) -> list[str]:
    argv = ["--model", str(model_dir), "--train", str(rows_dir), "--out", str(out), "--zero", "1",
            "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
            "--max-steps", str(args.warmup + args.steps), "--save-every", "-1", "--eval-every", "-1",
            "--no-progress", "--lr", "1e-5", *METHODS[method]]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    return argv


def run_method(method: str, inputs: dict, out: Path, args) -> dict:
    """One method in a fresh process: its status, what our trainer chose, and its per-step records (also those a
    run that failed or timed out had logged)."""
    if method == "plain":
        status, report, err = run_child(["--child-plain", str(inputs["model"]), str(inputs["rows"]), *args.passed],
                                        args)
        records = (report or {}).pop("records", [])
    else:
        model = inputs["moe"] if method == "moe" else inputs["model"]
        failed = upcycle(inputs["model"], model) if method == "moe" else None
        if failed:
            return {"status": "failed", "error": failed, "records": []}
        argv = trainer_argv(method, model, inputs["rows"], out, args)
        status, report, err = run_child(["--child-train", json.dumps(argv)], args)
        log = out / "train_log.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    result = {"status": status, **(report or {})}
    if status != "ok":
        result["error"] = last_message(err)
    return {**result, "records": records}


def last_message(stderr: str) -> str:
    """The last line of a child's stderr that is not a progress bar (tqdm redraws its bar with carriage returns)."""
    lines = [line.strip() for line in re.split(r"[\r\n]", stderr) if line.strip()]
    messages = [line for line in lines if not re.search(r"\d+%\|", line)]
    return messages[-1] if messages else ""


def measure(run: dict, args) -> dict:
    """Tokens/s (median timed step), MFU, peak memory and the per-step losses of one run."""
    records = run.pop("records")
    timed = records[args.warmup:]
    out = {k: v for k, v in run.items() if v is not None}
    out["losses"] = [r["loss"] for r in records]
    if timed:
        tokens = statistics.median(r["tokens"] for r in timed)
        out["steps_timed"] = len(timed)
        out["tokens_per_s"] = tokens / statistics.median(r["step_seconds"] for r in timed)
        out["tokens_per_cpu_s"] = tokens / statistics.median(r["step_cpu_seconds"] for r in timed)
        mfu = [r["mfu"] for r in timed if "mfu" in r]
        if mfu:
            out["mfu"] = statistics.median(mfu)
    if run.get("cuda_peak_bytes"):
        out["peak_memory_bytes"], out["peak_memory"] = run["cuda_peak_bytes"], "torch.cuda.max_memory_allocated"
    elif run.get("peak_rss_bytes"):
        out["peak_memory_bytes"], out["peak_memory"] = run["peak_rss_bytes"], "process peak RSS"
    return out


# ------------------------------------------------------------------------------------------ comparisons
def skip_reason(method: str, on_gpu: bool, family: str) -> str | None:
    """Why a method cannot run on this machine (the trainer's own checks), or None."""
    from src.train import attention, kernels

    if method in ("varlen", "varlen+liger") and attention.varlen_unavailable(on_gpu):
        return attention.varlen_unavailable(on_gpu)
    if method == "flex":
        return attention.flex_unavailable(on_gpu)
    if method == "varlen+liger":
        return kernels.liger_unavailable(on_gpu, family)
    return None


def compare(line: dict, done: list[dict]) -> None:
    """Add to ``line`` its ratios to earlier results: tokens/s against the plain loop, the largest relative loss
    difference from the first method with losses, and for ``moe`` tokens/s x compute parameters against ``ours`` (or
    the dense run of the same paths)."""
    def best(method):
        runs = [d for d in done if d["method"] == method and d.get("tokens_per_s")]
        return max(runs, key=lambda d: d["tokens_per_s"]) if runs else None

    plain, tps = best("plain"), line.get("tokens_per_s")
    if plain and tps and line["method"] != "plain":
        line["vs_plain"] = tps / plain["tokens_per_s"]
    first = next((d for d in done if d["losses"]), None)
    if first and line["losses"] and first is not line:
        pairs = list(zip(line["losses"], first["losses"]))
        line["loss_max_rel_diff"] = {"vs": first["method"], "value": max(abs(a - b) / abs(b) for a, b in pairs)}
    dense = best("ours") or _same_paths(line, done)
    if line["method"] == "moe" and dense and tps and line.get("compute_params"):
        line["tokens_x_params_vs_dense"] = tps * line["compute_params"] / (
            dense["tokens_per_s"] * dense["compute_params"])


def _same_paths(line: dict, done: list[dict]) -> dict | None:
    """A dense run with the Post-MoE line's attention, loss and kernels (``ours``' automatic choices on this device),
    for a run that measured that path under its own name (varlen, varlen+liger) instead of ``ours``."""
    key = ("attention", "loss_kind", "kernels")
    runs = [d for d in done if d["method"] not in ("moe", "plain") and d.get("tokens_per_s")
            and all(d.get(k) == line.get(k) for k in key)]
    return max(runs, key=lambda d: d["tokens_per_s"]) if runs else None


def plan(methods: list[str], rounds: int) -> list[tuple[int, str]]:
    """(round, method) in run order: as before, the plain loop first and again after each round of the others."""
    others = [m for m in methods if m != "plain"]
    order = [(0, "plain")] if "plain" in methods else []
    for r in range(rounds):
        order += [(r, m) for m in others] + ([(r + 1, "plain")] if "plain" in methods and others else [])
    return order


def emit(line: dict, args) -> None:
    print(json.dumps(line), flush=True)
    if args.jsonl:
        Path(args.jsonl).parent.mkdir(parents=True, exist_ok=True)
        with open(args.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def headline(done: list[dict]) -> dict:
    """The figures docs/train.md keeps: the best run of each method, and ours / plain."""
    best = {}
    for d in done:
        if d.get("tokens_per_s") and d["tokens_per_s"] > best.get(d["method"], {}).get("tokens_per_s", 0):
            best[d["method"]] = d
    res = {f"{m}_tokens_per_s_{k}": d[f"tokens_per_{s}"] for m, d in best.items()
           for k, s in (("wall", "s"), ("cpu", "cpu_s"))}
    if "ours" in best and "plain" in best:
        for k in ("wall", "cpu"):
            res[f"ratio_{k}"] = res[f"ours_tokens_per_s_{k}"] / res[f"plain_tokens_per_s_{k}"]
    return res


# ------------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="plain,ours", help=f"comma-separated, from: {', '.join(ALL_METHODS)}")
    p.add_argument("--model", default=None, help="an HF model folder (default: built, see --layers/--preset)")
    p.add_argument("--preset", choices=["smollm2", "qwen2-0.5b"], default="smollm2")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the SmolLM2-shaped model")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (every method)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps (their losses are reported)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: known GPUs)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1 on CPU: per-step CPU time then measures the work done even "
                        "on a busy shared machine; 0 = torch's default, what a GPU run wants)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each method (the plain loop between rounds)")
    p.add_argument("--method-timeout", type=float, default=None, help="seconds per method run (default: none)")
    p.add_argument("--jsonl", default=None, help="append each method's JSON line to this file as it is printed")
    p.add_argument("--json", default=None, help="also write all results and the headline figures here")
    p.add_argument("--work-dir", default=None, help="keep the built model and rows here and reuse them in later "
                                                   "calls with the same settings (default: a temporary folder)")
    p.add_argument("--child-train", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-plain", nargs=2, default=None, help=argparse.SUPPRESS)
    return p


def prepare(args, work: Path) -> dict:
    """The benchmark model and rows in ``work``, reused when a --work-dir already holds them (the Post-MoE model is
    upcycled right before its method runs)."""
    from transformers import AutoConfig

    name = "model-" + (f"{args.preset}" if args.preset != "smollm2" else f"smollm2-{args.layers}L")
    model_dir = Path(args.model) if args.model else work / name
    if not (model_dir / "config.json").is_file():
        build_model_dir(args, model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    rows = work / f"rows-{model_dir.name}-{args.seq}x{args.batch_size}x{args.grad_accum}x{args.steps + args.warmup}"
    if not (rows / "dataset_info.json").is_file():
        build_rows(args, cfg.vocab_size, rows)
    return {"model": model_dir, "rows": rows, "config": cfg, "moe": work / f"{model_dir.name}-moe"}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.passed = ["--seq", str(args.seq), "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
    args.passed += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
    args.passed += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit's SIGTERM ends the child too
    if args.child_train or args.child_plain:
        report = child_train(json.loads(args.child_train)) if args.child_train else child_plain(
            Path(args.child_plain[0]), Path(args.child_plain[1]), args)
        print(json.dumps(report), flush=True)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown or 'empty'}; choose from {', '.join(ALL_METHODS)}")
    import torch

    on_gpu = torch.cuda.is_available()
    done = []
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        inputs = prepare(args, Path(args.work_dir or tmp))
        cfg = inputs["config"]
        context = {"bench": "train_speed", "device": torch.cuda.get_device_name() if on_gpu else
                   f"CPU ({platform.processor() or platform.machine()}), {args.threads or torch.get_num_threads()} "
                   f"thread(s)", "model": f"{cfg.model_type} {cfg.num_hidden_layers}L h{cfg.hidden_size}",
                   "seq": args.seq, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                   "steps": args.steps, "warmup": args.warmup}
        print(f"[bench] {context['model']}, vocabulary {cfg.vocab_size}; rows of {args.seq} tokens, batch "
              f"{args.batch_size} x {args.grad_accum} accumulation; {context['device']}", flush=True)
        for r, method in plan(methods, args.rounds):
            line = {**context, "method": method, "round": r}
            why = skip_reason(method, on_gpu, cfg.model_type)
            if why:
                if r == 0:
                    emit({**line, "status": "skipped", "reason": why}, args)
                continue
            line.update(measure(run_method(method, inputs, Path(tmp) / f"out-{method}-{r}", args), args))
            compare(line, done)
            done.append(line)
            emit(line, args)
    summarize(done, context, args)
    return 0


def summarize(done: list[dict], context: dict, args) -> None:
    res = {**context, **headline(done)}
    if "ratio_wall" in res:
        print(f"[bench] ours/plain tokens/s: {res['ratio_wall']:.3f} by wall time, {res['ratio_cpu']:.3f} by CPU "
              f"time; target >= 0.9", flush=True)
    for d in done:
        extra = [f"MFU {d['mfu']:.1%}"] if "mfu" in d else []
        if "tokens_x_params_vs_dense" in d:
            extra.append(f"tokens/s x compute params {d['tokens_x_params_vs_dense']:.2f} x the dense model's")
        if d.get("tokens_per_s"):
            print(f"[bench] {d['method']} (round {d['round']}): {d['tokens_per_s']:,.0f} tokens/s"
                  + "".join(f", {x}" for x in extra), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**res, "results": done}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
