"""Step 3 memory and speed: LoRA against full fine-tuning of the same model on the same rows, with our trainer.

    python bench/lora_memory.py [--model models/SmolLM2-135M-Instruct] [--seq 512] [--batch-size 1] [--grad-accum 2]
                                [--steps 3] [--warmup 1] [--lora-r 16] [--rounds 1] [--json F]
    python bench/lora_memory.py --layers 2 --seq 64 --steps 1 --warmup 0          # a seconds-long smoke run

Each run is a fresh process (``python -m src.train.train``: one process, DeepSpeed ZeRO-1, no checkpoint, no dev
evaluation), full fine-tuning first, then ``--lora-r`` with the default targets (all-linear), alternating for
``--rounds``. Rows: ``seq``-token packed rows of 2-4 documents (random tokens, fixed seed), the same for both.

Measured per run:
- peak memory: the child's resident-set high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's own
  count, read after training: every page the process held at its peak, Python, torch and DeepSpeed included, so the
  ratio understates the saving on the model itself). On a GPU also ``torch.cuda.max_memory_allocated``;
- tokens/s: training tokens over the timed steps' wall time, from the trainer's own log, the first ``--warmup`` steps
  dropped; also by CPU time (``--threads 1`` by default, so a busy shared machine inflates wall time only);
- trainable parameters (from the trainer's TensorBoard scalars ``params/trainable``, ``params/total``).

Printed: one line per run, then the ratios LoRA/full of peak memory (target <= 0.6) and of tokens/s (target >= 0.9).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.common.defaults import DEFAULT_MODEL  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SMOLLM2 = DEFAULT_MODEL


def build_model_dir(args, out: Path) -> Path:
    """--model as given, or SmolLM2-135M's architecture cut to --layers with random weights (seeded)."""
    if args.layers is None:
        return Path(args.model)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(args.model)
    config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
    return out


def build_rows(args, vocab_size: int, out: Path) -> Path:
    import datasets

    rng = random.Random(0)
    rows = []
    for _ in range(args.batch_size * args.grad_accum * (args.steps + args.warmup)):
        cuts = sorted(rng.sample(range(8, args.seq - 8), rng.randint(1, 3)))
        ids, labels, pos = [], [], []
        for n in (b - a for a, b in zip([0] + cuts, cuts + [args.seq])):
            doc = [rng.randrange(100, vocab_size) for _ in range(n)]
            prompt = min(n - 1, rng.randint(2, 16))
            ids, labels, pos = ids + doc, labels + [-100] * prompt + doc[prompt:], pos + list(range(n))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    datasets.Dataset.from_list(rows).save_to_disk(str(out))
    return out


def child_train(argv: list[str]) -> None:
    """Run the trainer in this process, then report its peak memory."""
    import resource

    import torch

    from src.train.train import main

    code = main(argv)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux counts KiB
    print(json.dumps({"code": code, "peak_rss_bytes": rss, "cuda_peak_bytes": peak}), flush=True)


def tb_scalars(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(log_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {tag: events.Scalars(tag)[0].value for tag in ("params/trainable", "params/total")}


def one_run(kind: str, model_dir: Path, rows_dir: Path, out: Path, args) -> dict:
    train_argv = ["--model", str(model_dir), "--train", str(rows_dir), "--out", str(out), "--zero", "1",
                  "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
                  "--max-steps", str(args.steps + args.warmup), "--save-every", "-1", "--eval-every", "-1",
                  "--no-progress", "--lr", "1e-5"]
    if kind == "lora":
        train_argv += ["--lora-r", str(args.lora_r)]
    if args.gradient_checkpointing:
        train_argv.append("--gradient-checkpointing")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run([sys.executable, __file__, "--child-train", json.dumps(train_argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[bench] the {kind} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()][args.warmup:]
    tokens = sum(r["tokens"] for r in recs)
    return {"kind": kind, "peak_rss_bytes": report["peak_rss_bytes"], "cuda_peak_bytes": report["cuda_peak_bytes"],
            "tokens_per_second": tokens / sum(r["step_seconds"] for r in recs),
            "tokens_per_cpu_second": tokens / sum(r["step_cpu_seconds"] for r in recs), **tb_scalars(out / "logs")}


def best(runs: list[dict], kind: str) -> dict:
    """Per kind: the lowest peak and the median speed over the rounds (other jobs only ever add time and memory)."""
    mine = [r for r in runs if r["kind"] == kind]
    return {"peak_rss_bytes": min(r["peak_rss_bytes"] for r in mine),
            "cuda_peak_bytes": min((r["cuda_peak_bytes"] or 0) for r in mine) or None,
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in mine),
            "tokens_per_cpu_second": statistics.median(r["tokens_per_cpu_second"] for r in mine),
            "trainable": mine[0]["params/trainable"], "total": mine[0]["params/total"]}


def summary(full: dict, lora: dict) -> dict:
    out = {"rss_ratio": lora["peak_rss_bytes"] / full["peak_rss_bytes"],
           "tokens_per_second_ratio": lora["tokens_per_second"] / full["tokens_per_second"],
           "tokens_per_cpu_second_ratio": lora["tokens_per_cpu_second"] / full["tokens_per_cpu_second"]}
    if full["cuda_peak_bytes"] and lora["cuda_peak_bytes"]:
        out["cuda_peak_ratio"] = lora["cuda_peak_bytes"] / full["cuda_peak_bytes"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(SMOLLM2), help="HF model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--layers", type=int, default=None, help="instead: --model's architecture with this many layers "
                                                            "and random weights (smoke runs)")
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default)")
    p.add_argument("--rounds", type=int, default=1, help="full + LoRA pairs to run")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child-train", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_train:
        child_train(json.loads(args.child_train))
        return 0
    if not Path(args.model).is_dir():
        raise SystemExit(f"[bench] {args.model} is not a model folder (run 0.download_data.sh, or pass --model)")
    from transformers import AutoConfig

    from tqdm.auto import tqdm

    runs = []
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        tmp = Path(tmp)
        model_dir = build_model_dir(args, tmp / "model")
        rows_dir = build_rows(args, AutoConfig.from_pretrained(model_dir).vocab_size, tmp / "rows")
        for i in tqdm([(r, k) for r in range(args.rounds) for k in ("full", "lora")], desc="runs", unit="run"):
            run = one_run(i[1], model_dir, rows_dir, tmp / f"out-{i[0]}-{i[1]}", args)
            runs.append(run)
            tqdm.write(f"[bench] {run['kind']:4}: peak RSS {run['peak_rss_bytes'] / 2**20:,.0f} MiB"
                       + (f", GPU peak {run['cuda_peak_bytes'] / 2**20:,.0f} MiB" if run["cuda_peak_bytes"] else "")
                       + f", {run['tokens_per_second']:.1f} tokens/s ({run['tokens_per_cpu_second']:.1f} by CPU "
                       f"time), {run['params/trainable']:,.0f} of {run['params/total']:,.0f} parameters trainable")
    full, lora = best(runs, "full"), best(runs, "lora")
    ratios = summary(full, lora)
    print(f"[bench] {args.model}{f' ({args.layers} layers)' if args.layers else ''}, rows {args.batch_size} x "
          f"{args.grad_accum} x {args.seq} tokens, LoRA r {args.lora_r}: trainable {lora['trainable']:,.0f} vs "
          f"{full['trainable']:,.0f} ({100 * lora['trainable'] / full['trainable']:.2f}%)")
    print(f"[bench] LoRA / full: peak RSS {ratios['rss_ratio']:.2f} (target <= 0.6), tokens/s "
          f"{ratios['tokens_per_second_ratio']:.2f} ({ratios['tokens_per_cpu_second_ratio']:.2f} by CPU time; "
          f"target >= 0.9)" + (f", GPU peak {ratios['cuda_peak_ratio']:.2f}" if "cuda_peak_ratio" in ratios else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "runs": runs, "full": full, "lora": lora,
                                               **ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
