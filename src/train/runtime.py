"""Step 3's run-time choices: the DeepSpeed config, FLOP counts for MFU, and how Post-MoE checkpoints are recognised
and built under ZeRO-3 (the attention kernel: attention.py; the loss: loss.py; Liger and torch.compile:
kernels.py)."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DENSE_LR, MOE_LR = 1e-5, 1e-4  # the paper's learning rates
# bf16 dense peak FLOP/s by GPU name (for MFU); --peak-tflops overrides.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
               ("A10G", 70.0), ("A10", 125.0), ("4090", 165.0), ("3090", 71.0), ("V100", 125.0)]



def moe_module():
    """src.models.moe (imported late: it pulls in transformers)."""
    from src.models import moe

    return moe


def is_moe_path(path) -> bool:
    return Path(str(path)).is_dir() and moe_module().is_moe_checkpoint(path)


def deepspeed_config(zero: int, *, batch_size: int, bf16: bool, clip: float) -> dict:
    cfg = json.loads((CONFIG_DIR / f"zero{zero}.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = batch_size
    cfg["bf16"] = {"enabled": bool(bf16)}
    cfg["gradient_clipping"] = clip
    return cfg


def peak_flops(config, device) -> float | None:
    """Per-device peak FLOP/s for MFU: ``config.peak_tflops`` (--peak-tflops), else the known GPU's."""
    if config.peak_tflops:
        return config.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def flop_params(model) -> int:
    """Parameters that cost 6 FLOPs per token (forward + backward): all but the input embedding table (the output
    projection counts even when tied to it); routed experts count k/E of their size."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    cfg = model.config
    post_moe = getattr(cfg, "post_moe", None) or {}
    n_exp = post_moe.get("num_experts") or getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    k = post_moe.get("top_k") or getattr(cfg, "num_experts_per_tok", None)
    total = 0
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", p.numel())
        if p is emb:
            continue
        if n_exp and k and ".experts" in name:
            n = n * k / n_exp
        total += n
    if out is not None and out.weight is emb:
        total += getattr(emb, "ds_numel", emb.numel())
    return int(total)


@contextmanager
def no_zero3_init(plugin):
    """Build models unpartitioned inside a ZeRO-3 run (transformers uses deepspeed.zero.Init while the DeepSpeed
    config it is told about says stage 3)."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def set_sync_gradients(accelerator, value: bool) -> None:
    """Tell accelerate (and through it DeepSpeed) whether this micro-batch ends the optimizer step. accelerate 1.15
    decides it from its own counter of ``gradient_accumulation_steps``, which is wrong for the last step of an epoch
    when it has fewer micro-batches than --grad-accum; its ``sync_gradients`` flag is settable and is what
    ``accelerator.backward`` and DeepSpeed's step read. tests/test_library_internals.py pins it."""
    accelerator.sync_gradients = value
