"""Optimizer and learning-rate schedule of step 3.

- AdamW (torch's), two parameter groups: weight decay on matrices (and embeddings), none on biases and normalisation
  weights. The rule is "tensors with fewer than 2 dimensions get no decay", which covers every bias and every norm
  weight whatever the model family calls them (the reference matched ``LayerNorm.weight`` only, so Qwen2's
  ``*norm.weight`` were decayed, docs/reference.md, "Trainer").
- Cosine schedule with linear warmup over ``ceil(warmup_ratio * total_steps)`` steps, decaying to exactly 0 at the
  real end of training (the reference stretched it by a hidden 0.35 epoch and ended at ~16% of the peak).
"""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def no_decay_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that get no weight decay (for logs and tests)."""
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or n.endswith(".bias"))]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.999),
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """torch AdamW over ``param_groups``. ``fused`` defaults to True when the parameters are on CUDA (the trainer
    passes it explicitly: DeepSpeed moves the model to the GPU after the optimizer is built)."""
    if fused is None:
        fused = torch.cuda.is_available() and next(model.parameters()).device.type == "cuda"
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, **kwargs)


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return min(total_steps, math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0


def cosine_multiplier(step: int, total_steps: int, warmup: int) -> float:
    """LR multiplier of the update made at optimizer step ``step`` (0-based).

    Warmup: (step + 1) / (warmup + 1), so no update is wasted at lr 0. Then a half cosine from 1 at step ``warmup``
    to 0 at step ``total_steps`` (the step after the last update): the last update gets a small positive lr and the
    schedule reaches 0 exactly when training ends.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if total_steps <= warmup:
        return 0.0
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.03):
    w = warmup_steps(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_multiplier(s, total_steps, w))
