"""Step 3 speed: training tokens/s of our trainer (accelerate + DeepSpeed ZeRO-1, one process) against a plain HF
loop (forward with labels, backward, clip, AdamW step, zero_grad) on the same model, rows and machine.

    python bench/train_speed.py [--layers 4] [--seq 1024] [--batch-size 2] [--grad-accum 2] [--steps 3] [--json F]
    python bench/train_speed.py --preset qwen2-0.5b --seq 4096 --batch-size 1 --steps 20   # on a GPU: tokens/s, MFU

Model: SmolLM2-135M's architecture (its tokenizer and config from models/SmolLM2-135M-Instruct when present) with
``--layers`` decoder layers and random weights (seeded), or ``--model PATH``; ``--preset qwen2-0.5b`` builds a
Qwen2-0.5B-shaped model (24 layers, hidden 896, vocab 151,936). Rows: ``seq``-token packed rows of 2-4 documents with
per-document position ids, all the same length so every step does the same work; both loops get the same batches
(our collator's output) in the same order. fp32 on CPU; bf16 on GPU (DeepSpeed bf16 for ours, autocast bf16 with
fp32 weights for the plain loop).

Timing: per optimizer step (data collation included in both), the first ``--warmup`` steps dropped. Each run is a
fresh process; the plain loop runs first and after each of ``--rounds`` runs of ours. Each loop reports its best
run's median step and its best single step (other jobs on a shared machine only ever add time). The ratio ours/plain
is the headline (target >= 0.9: the machinery may cost at most 10%).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SMOLLM2 = ROOT / "models" / "SmolLM2-135M-Instruct"


def build_model_dir(args, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    if args.model:
        return Path(args.model)
    tok_src = SMOLLM2 if SMOLLM2.is_dir() else None
    if tok_src is None:
        raise SystemExit(f"{SMOLLM2} is missing (run 0.download_data.sh) or pass --model PATH")
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    if args.preset == "qwen2-0.5b":
        config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                             tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        config = AutoConfig.from_pretrained(tok_src)
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


def plain_loop(model_dir: Path, rows_dir: Path, args, attn_impl: str) -> list[float]:
    """The reference-style loop: HF loss, backward, clip 1.0, torch AdamW, zero_grad. Returns per-step seconds."""
    import torch

    from src.models.loading import load_tokenizer
    from src.train.data import BatchPlan, Collator, load_rows
    from src.train.optim import build_optimizer

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn_impl)
    model.to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = build_optimizer(model, 1e-5, 0.1)
    rows = load_rows(rows_dir)
    collate = Collator(load_tokenizer(model_dir).pad_token_id, flatten=attn_impl.startswith("flash"))
    plan = BatchPlan(len(rows), 1, args.batch_size, args.grad_accum)
    times, cpu_times = [], []
    for step in range(args.warmup + args.steps):
        if on_gpu:
            torch.cuda.synchronize()
        t, c = time.perf_counter(), time.process_time()
        for micro in range(args.grad_accum):
            batch = collate([rows[i] for i in plan.rows(step * args.grad_accum + micro, 0)])
            inputs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()
                      if k not in ("num_tokens", "doc_len_sq", "language_ids")}
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
                loss = model(**inputs, use_cache=False).loss / args.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    del model, opt
    return {"wall": times[args.warmup:], "cpu": cpu_times[args.warmup:]}


def ours(model_dir: Path, rows_dir: Path, out: Path, args) -> dict:
    """Our trainer as users run it in one process (python -m src.train.train), per-step seconds from its log."""
    import shutil
    import subprocess

    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "src.train.train", "--model", str(model_dir), "--train", str(rows_dir),
            "--out", str(out), "--zero", "1", "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
            "--max-steps", str(args.warmup + args.steps), "--save-every", "-1", "--eval-every", "-1",
            "--no-progress", "--lr", "1e-5"]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    if args.peak_tflops:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(args))
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][args.warmup:]
    return {"wall": [r["step_seconds"] for r in recs], "cpu": [r["step_cpu_seconds"] for r in recs],
            "mfu": [r["mfu"] for r in recs if "mfu" in r]}


def _env(args) -> dict:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    return env


def plain(model_dir: Path, rows_dir: Path, args) -> dict:
    """The plain loop in a fresh process too (same start-up conditions as ours)."""
    import subprocess

    argv = [sys.executable, __file__, "--child-plain", str(model_dir), str(rows_dir), "--seq", str(args.seq),
            "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    out = subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, text=True, env=_env(args)).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="an HF model folder (default: built, see --layers/--preset)")
    p.add_argument("--preset", choices=["smollm2", "qwen2-0.5b"], default="smollm2")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the SmolLM2-shaped model")
    p.add_argument("--seq", type=int, default=1024, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step (both loops)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1 on CPU: per-step CPU time then measures the work done even "
                        "on a busy shared machine; 0 = torch's default)")
    p.add_argument("--rounds", type=int, default=1, help="ours runs this many times, between plain runs")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child-plain", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    import torch

    from src.train.runtime import choose_attn_impl

    on_gpu = torch.cuda.is_available()
    attn_impl = choose_attn_impl("auto", on_gpu)
    if args.child_plain:
        print(json.dumps(plain_loop(Path(args.child_plain[0]), Path(args.child_plain[1]), args, attn_impl)))
        return 0
    tokens_per_step = args.batch_size * args.grad_accum * args.seq
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        tmp = Path(tmp)
        model_dir = build_model_dir(args, tmp / "model")
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir)
        rows_dir = build_rows(args, cfg.vocab_size, tmp / "rows")
        print(f"[bench] {cfg.model_type} {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; rows of {args.seq} "
              f"tokens, batch {args.batch_size} x {args.grad_accum} accumulation; {args.threads or torch.get_num_threads()} thread(s); "
              f"{torch.cuda.get_device_name() if on_gpu else platform.processor() or 'CPU'}", flush=True)
        plain_runs, our_runs = [plain(model_dir, rows_dir, args)], []
        show = lambda name, r: print(f"[bench] {name}: median step {statistics.median(r['wall']):.2f}s wall, "  # noqa
                                     f"{statistics.median(r['cpu']):.2f}s CPU", flush=True)
        show("plain", plain_runs[-1])
        for _ in range(args.rounds):
            our_runs.append(ours(model_dir, rows_dir, tmp / "out", args))
            show("ours ", our_runs[-1])
            plain_runs.append(plain(model_dir, rows_dir, args))
            show("plain", plain_runs[-1])

    def best(runs, key):  # the best run's median step: a shared machine only ever adds time
        return min(statistics.median(r[key]) for r in runs)

    res = {
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU, {args.threads or torch.get_num_threads()} thread(s)",
        "model": f"{cfg.model_type} {cfg.num_hidden_layers}L h{cfg.hidden_size}", "seq": args.seq,
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "steps": args.steps, "rounds": args.rounds,
        "attn": attn_impl, "tokens_per_step": tokens_per_step,
    }
    for key in ("wall", "cpu"):
        res[f"plain_tokens_per_s_{key}"] = tokens_per_step / best(plain_runs, key)
        res[f"ours_tokens_per_s_{key}"] = tokens_per_step / best(our_runs, key)
        res[f"ratio_{key}"] = res[f"ours_tokens_per_s_{key}"] / res[f"plain_tokens_per_s_{key}"]
    mfu = [x for r in our_runs for x in r["mfu"]]
    if mfu:
        res["ours_mfu_median"] = statistics.median(mfu)
    print(json.dumps(res, indent=1))
    print(f"[bench] ours/plain tokens/s: {res['ratio_wall']:.3f} by wall time, {res['ratio_cpu']:.3f} by CPU time; "
          f"target >= 0.9")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
