"""Optional speed-ups of the model's own computation in step 3: Liger-Kernel (``--kernels``) and torch.compile
(``--compile``).

Liger-Kernel (``requirements-gpu.txt``; Triton, so CUDA only) is imported only when it is used. On a supported family
its instance patch swaps in fused RMSNorm, SwiGLU and RoPE kernels; the loss uses its fused linear cross-entropy
(loss.py). Post-MoE models keep their sparse blocks: Liger binds its SwiGLU forward onto every layer's ``mlp``, which
in an upcycled layer is our sparse block, so the SwiGLU kernel goes onto the dense layers' MLPs only
(``_swiglu_dense_mlps``).
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from types import MethodType

import torch

from src.common.defaults import IGNORE_INDEX
from src.common.errors import UsageError

CHOICES = ("auto", "liger", "none")
# Liger's public per-family entry points (liger-kernel 0.8.5); each takes rope, rms_norm, swiglu, cross_entropy,
# fused_linear_cross_entropy and model=.
LIGER_APPLY = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2",
               "qwen3": "apply_liger_kernel_to_qwen3", "mistral": "apply_liger_kernel_to_mistral"}
INSTALL_HINT = "pip install -r requirements-gpu.txt"


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_unavailable(on_gpu: bool, family: str | None) -> str | None:
    if not on_gpu:
        return "Liger's kernels are Triton kernels and need a CUDA GPU"
    if not liger_installed():
        return f"liger-kernel is not installed ({INSTALL_HINT})"
    if family is not None and family not in LIGER_APPLY:  # None: not known yet (checked again once loaded)
        return f"no Liger kernels wired for model type {family} (supported: {', '.join(LIGER_APPLY)})"
    return None


def choose(requested: str, on_gpu: bool, family: str | None) -> tuple[str, str]:
    """(kernels, why) for ``--kernels``: auto is liger on a GPU where it is installed and supports the family."""
    if requested == "none":
        return "none", "as requested"
    why_not = liger_unavailable(on_gpu, family)
    if requested == "liger":
        if why_not:
            raise UsageError("--kernels", f"liger: {why_not}")
        return "liger", "as requested"
    if why_not:
        return "none", why_not
    return "liger", "Liger-Kernel installed"


def apply_liger(model, *, is_moe: bool) -> str:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on this model instance (its cross-entropy is used by loss.py, not
    patched into the model). Returns what was applied, for the start-up line."""
    import liger_kernel.transformers as liger

    apply = getattr(liger, LIGER_APPLY[model.config.model_type])
    apply(rope=True, rms_norm=True, swiglu=not is_moe, cross_entropy=False, fused_linear_cross_entropy=False,
          model=model)
    if not is_moe:
        return "RMSNorm, SwiGLU, RoPE"
    n = _swiglu_dense_mlps(model, liger.LigerSwiGLUMLP)
    return f"RMSNorm, RoPE, SwiGLU on the {n} dense layers"


def _swiglu_dense_mlps(model, swiglu_cls) -> int:
    """Liger's SwiGLU forward on the MLPs that are not Post-MoE sparse blocks, bound the way Liger's own instance
    patch binds it (liger-kernel 0.8.5, ``monkey_patch._patch_swiglu_module``)."""
    from src.models.moe import SparseMoeBlock, decoder_layers

    n = 0
    for layer in decoder_layers(model):
        if not isinstance(layer.mlp, SparseMoeBlock):
            layer.mlp.forward = MethodType(swiglu_cls.forward, layer.mlp)
            n += 1
    return n


@lru_cache(maxsize=1)
def liger_loss():
    """Liger's fused linear cross-entropy, summed like steps.token_losses, with the projection-weight gradient
    accumulated over its chunks in fp32 (its default would accumulate in the weights' bf16)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", accum_dtype=torch.float32)


def compile_layers(model) -> int:
    """torch.compile every decoder layer in place (``nn.Module.compile``: parameter and state-dict names are unchanged,
    so checkpoints are too). Layers of the same shape share one compiled graph; the embeddings, mask building and
    loss stay eager. Returns the number of layers."""
    from src.models.moe import decoder_layers

    layers = decoder_layers(model)
    for layer in layers:
        layer.compile()
    return len(layers)
