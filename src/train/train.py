"""Step 3: train a dense or Post-MoE causal LM on step 2's packed rows with accelerate + DeepSpeed (ZeRO-1/2/3).

Launch with ``3.single_node_train.sh`` (one node) or ``scripts/multi_node_train_{dense,moe}.sh`` (one command per node);
``python -m src.train.train ...`` alone runs one process. See docs/train.md for every flag.

The command line is here; the trainer itself (setup, ``train_step``, evaluation, checkpoints, resume) is
``src/train/trainer.py``; the step's pieces are in ``steps.py``, run-time choices in ``runtime.py``, the attention
kernel in ``attention.py``, the loss without full logits in ``loss.py``, Liger and torch.compile in ``kernels.py``, the
dev evaluation in ``dev_eval.py``, the data in ``data.py``, the optimizer in ``optim.py`` and checkpoints in
``checkpoint.py``.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

from src.train import lora
from src.train.config import TrainConfig
from src.train.runtime import DENSE_LR, MOE_LR


def build_parser() -> argparse.ArgumentParser:
    """Every flag of step 3; ``TrainConfig`` (src/train/config.py) checks them."""
    p = argparse.ArgumentParser(prog="python -m src.train.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--model", required=True, help="base model: HF folder or hub id, or a Post-MoE checkpoint")
    g.add_argument("--train", required=True, help="step 2 output folder (datasets.save_to_disk rows)")
    g.add_argument("--dev", default=None, help="step 1 dev.jsonl for in-training evaluation (optional)")
    g.add_argument("--out", required=True, help="checkpoint folder: OUT/checkpoint-<step>/")
    g.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="train on step 2 rows made with another tokenizer than --model's (refused without it: the ids "
                        "would mean other tokens); ids beyond the model's vocabulary are refused even so")
    g.add_argument("--expect", choices=["any", "dense", "moe"], default="any",
                   help="fail early unless --model is of this kind (the MoE launch script passes moe)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--zero", type=int, choices=[1, 2, 3], default=1, help="DeepSpeed ZeRO stage (configs/zeroN.json)")
    g.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {DENSE_LR} dense, {MOE_LR} MoE)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay (none on biases and norm weights)")
    g.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip", type=float, default=1.0, help="gradient clipping (max global norm)")
    g.add_argument("--epochs", type=int, default=1, help="passes over the rows (step 2 already repeats SFT data)")
    g.add_argument("--batch-size", type=int, default=2, help="rows per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--max-steps", type=int, default=None,
                   help="total optimizer steps (default: epochs x steps per epoch); the schedule ends here")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="end this run (with a checkpoint) at this step without changing the schedule; "
                        "continue later with --resume (time-limited jobs)")
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--num-workers", type=int, default=None, help="data loader workers (default 2 on GPU, 0 on CPU)")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=None,
                   help="dev evaluation every N optimizer steps (default: about 10 per run); 0: at the end only; "
                        "<0: never")
    g.add_argument("--dev-limit", type=int, default=None, help="evaluate on this many dev prompts (evenly spread)")
    g.add_argument("--dev-batch-size", type=int, default=8)
    g.add_argument("--dev-max-new-tokens", type=int, default=128)
    g.add_argument("--dev-mode", default="generate", help="step 4 prediction mode (generate or its scoring mode)")
    g.add_argument("--save-every", type=int, default=None,
                   help="checkpoint every N optimizer steps (default: about 20 per run); 0: at the end only; "
                        "<0: never (benchmarks, smoke tests)")
    g.add_argument("--max-ckpts", type=int, default=3, help="keep the newest N checkpoints (<= 0: keep all)")
    g.add_argument("--resume", default=None, help="latest (newest checkpoint in --out, fresh start if none) or a "
                                                  "checkpoint folder")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that holds checkpoints of an earlier run: delete them, its "
                        "train_log.jsonl and dev/ first (without it such a run refuses to start)")
    g.add_argument("--log-dir", default=None, help="TensorBoard folder (default OUT/logs)")
    g.add_argument("--run-name", default=None, help="run name for the trackers (default: the name of --out)")
    g.add_argument("--log-every", type=int, default=1, help="log every N optimizer steps")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`; "
                                                        "WANDB_MODE=offline works without an account)")
    g.add_argument("--wandb-project", default="apollomoe")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak FLOP/s (TFLOP/s) for MFU (default: known GPUs' bf16 dense peak)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_speed_args(p)
    lora.add_args(p)
    return p


def add_speed_args(p: argparse.ArgumentParser) -> None:
    from src.train import attention, kernels, loss

    g = p.add_argument_group("speed (docs/train.md 'GPU speed'; the start-up line says what runs and why)")
    g.add_argument("--attn-impl", choices=attention.CHOICES, default="auto",
                   help="attention for packed rows: auto (GPU: flash_attention_2 when flash-attn is installed, else "
                        "varlen, torch's varlen flash attention, else flex; CPU: sdpa), varlen, flex (FlexAttention "
                        "with a document block mask), sdpa (block-diagonal mask), eager, flash_attention_2")
    g.add_argument("--loss", choices=loss.CHOICES, default="auto",
                   help="token cross-entropy: full (fp32 logits of every position), chunked (no full logits, plain "
                        "torch), liger (Liger's fused linear cross-entropy); auto: liger with --kernels liger, else "
                        "chunked on GPU and full on CPU")
    g.add_argument("--kernels", choices=kernels.CHOICES, default="auto",
                   help="Liger-Kernel's RMSNorm/SwiGLU/RoPE kernels (requirements-gpu.txt, CUDA): auto (liger on a "
                        "GPU when installed), liger, none")
    g.add_argument("--compile", action="store_true", help="torch.compile every decoder layer")


# ----------------------------------------------------------------------------------------------------------- setup
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """DeepSpeed always needs a process group: give a plain ``python -m src.train.train`` a world of one."""
    if "LOCAL_RANK" in os.environ or "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                      MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))


def check_inputs(config: TrainConfig) -> None:
    """The model folder and step 2's rows, checked before any process group, accelerator or output folder exists:
    a wrong path is one line, not a failure deep in DeepSpeed's setup (the trainer checks them in full again)."""
    from src.models.loading import check_model_source
    from src.train.data import rows_folder

    check_model_source(config.model, weights=True)
    rows_folder(config.train)


def main(argv=None) -> int:
    config = TrainConfig.from_args(build_parser().parse_args(argv))
    check_inputs(config)
    single_process_env()
    from src.train.trainer import Trainer

    Trainer(config).fit()
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
