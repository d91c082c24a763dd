"""Step 3's typed config: every flag of ``python -m src.train.train`` (src/train/train.py's ``build_parser``, the
LoRA flags of ``lora.add_args`` and the speed flags included), checked once when it is built, before any process
group, accelerator or output folder exists. ``Trainer(config)``, ``lora.apply``, the dev evaluation and the trackers'
hyperparameters read it. See src/common/config.py for the base class.

A refused value or combination is one line starting with the flag, as the parser's own errors are (``error: --lora-r
must be >= 0``, exit code 2, through ``cli.run``). The settings an exact resume must share are the trainer's
``signature`` (trainer.py), recorded in every checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass

from src.common.config import StepConfig
from src.common.errors import UsageError
from src.train import lora


@dataclass(kw_only=True)
class TrainConfig(StepConfig):
    # inputs and outputs
    model: str
    train: str
    dev: str | None = None
    out: str
    allow_tokenizer_mismatch: bool = False
    expect: str = "any"
    # optimisation
    zero: int = 1
    lr: float | None = None  # default: runtime.DENSE_LR or MOE_LR, by the model's kind
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    clip: float = 1.0
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 2
    warmup_ratio: float = 0.03
    max_steps: int | None = None
    stop_at_step: int | None = None
    gradient_checkpointing: bool = False
    seed: int = 42
    num_workers: int | None = None
    # evaluation, checkpoints, logging
    eval_every: int | None = None
    dev_limit: int | None = None
    dev_batch_size: int = 8
    dev_max_new_tokens: int = 128
    dev_mode: str = "generate"
    save_every: int | None = None
    max_ckpts: int = 3
    resume: str | None = None
    overwrite: bool = False
    log_dir: str | None = None
    run_name: str | None = None
    log_every: int = 1
    wandb: bool = False
    wandb_project: str = "apollomoe"
    peak_tflops: float | None = None
    no_progress: bool = False
    # speed (docs/train.md "GPU speed")
    attn_impl: str = "auto"
    loss: str = "auto"
    kernels: str = "auto"
    compile: bool = False
    # LoRA / QLoRA (lora.py)
    lora_r: int = 0
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: str = lora.ALL_LINEAR
    lora_router: str = "full"
    lora_experts: str = "frozen"
    qlora: bool = False

    def __post_init__(self):
        super().__post_init__()
        lora.check(self)
        self._check_speed()
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                raise UsageError("", f"--{name.replace('_', '-')} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError("", "--max-steps must be >= 1")

    def _check_speed(self) -> None:
        """Refuse a speed option that cannot run on this machine or with this setup."""
        import torch

        from src.train import attention, kernels

        on_gpu = torch.cuda.is_available()
        if self.attn_impl in ("varlen", "flex"):
            attention.choose(self.attn_impl, on_gpu)  # raises a UsageError naming what is missing
        for name in ("kernels", "loss"):
            why_not = kernels.liger_unavailable(on_gpu, None) if getattr(self, name) == "liger" else None
            if why_not:
                raise UsageError("", f"--{name} liger: {why_not}")
        if self.loss == "liger" and self.kernels == "none":
            raise UsageError("", "--loss liger: needs Liger's kernels (--kernels liger or auto), not --kernels none")
        if self.zero == 3 and self.loss in ("chunked", "liger"):
            raise UsageError("", f"--loss {self.loss}: ZeRO-3 partitions the output projection, which this loss reads "
                                 "directly; use --zero 1 or 2, or --loss full")
        if self.zero == 3 and self.compile:
            raise UsageError("", "--compile: with --zero 1 or 2 (ZeRO-3 gathers each layer's weights in hooks inside "
                                 "the compiled layers; not supported here)")
