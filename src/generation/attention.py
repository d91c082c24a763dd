"""Prefill on top of a cached prefix at the price of a plain causal prefill.

Step 4 computes a prefix shared by several prompts once (``engine.plan_groups``: system block, instruction, shared
shots) and prefills each prompt's suffix on a copy of its KV cache. For that call transformers' SDPA path needs an
explicit mask (the suffix's queries see the whole prefix and the suffix causally), and with a mask the attention
kernels cannot skip the masked half: on a CPU, prefilling 730 suffix tokens after a 70-token prefix took longer
(3.0 s) than the whole 800-token prompt from scratch (2.9 s, SmolLM2), which would cancel the saving.

torch's ``is_causal`` is aligned top-left (query i sees keys <= i), so it only fits a query block as long as the keys.
``prefix_causal_sdpa`` therefore puts P placeholder queries in front of the suffix's S queries, runs the causal
kernel without a mask and drops the placeholders' outputs: each real query sees the P prefix keys and the suffix
causally, which is exactly what the mask said. Its attention costs (P+S)^2/2 (the placeholders' share included)
against S(P+S) for the masked kernel, so it is used while the prefix is shorter than the suffix (P < S: system block
and instruction, or a shared first shot); a long shared prefix (``--shot-mode fixed``: every shot) keeps the masked
kernel, which is then the cheaper one.

It is used only when the mask is exactly that pattern for every row (no padding, no sliding window); any other call
goes to transformers' ``sdpa`` unchanged. ``prefix_attention(model)`` switches a model that uses ``sdpa`` to it for
the duration of one call (the engine's prefills), so a model is never left changed.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "prefix_causal_sdpa"
_checked: tuple = (None, False)  # (weakref to the last mask checked, result): every layer gets the same mask object


def is_prefix_causal(mask, q_len: int, k_len: int) -> bool:
    """True when ``mask`` ([B, 1, q, k] bool, True = attend) lets query i see keys 0 .. k-q+i, in every row."""
    global _checked
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4 \
            or tuple(mask.shape[-2:]) != (q_len, k_len):
        return False
    ref, result = _checked
    if ref is not None and ref() is mask:
        return result
    want = torch.ones((q_len, k_len), dtype=torch.bool, device=mask.device).tril(diagonal=k_len - q_len)
    result = bool((mask == want).all())
    _checked = (weakref.ref(mask), result)
    return result


def prefix_causal_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """An ``AttentionInterface`` function: see the module docstring."""
    q_len, k_len = query.shape[2], key.shape[2]
    P = k_len - q_len
    fast = (0 < P < q_len and not module.training and dropout == 0.0 and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and kwargs.get("cache") is None and is_causal is not False
            and is_prefix_causal(attention_mask, q_len, k_len))
    if not fast:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    B, H, _, D = query.shape
    padded = torch.cat([query.new_zeros((B, H, P, D)), query], dim=2)
    gqa = key.shape[1] != H
    out = torch.nn.functional.scaled_dot_product_attention(padded, key, value, is_causal=True, scale=scaling,
                                                           enable_gqa=gqa)
    return out[:, :, P:].transpose(1, 2).contiguous(), None


# The registries are transformers' public extension point (AttentionInterface / AttentionMaskInterface, 5.23).
ALL_ATTENTION_FUNCTIONS.register(NAME, prefix_causal_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def attn_implementation(config) -> str | None:
    """The attention implementation a loaded model dispatches on at each call. transformers 5.23 keeps it in the
    private ``config._attn_implementation`` and reads it on every forward; the public
    ``model.set_attn_implementation`` re-validates and walks every submodule, too slow to flip around each prefill.
    tests/test_library_internals.py fails if a release stops dispatching on it."""
    return getattr(config, "_attn_implementation", None)


def _set_attn_impl(config, name: str) -> None:
    config._attn_implementation = name  # see attn_implementation


def decode_step_mask(model, attention_mask, q_len: int):
    """The mask to pass for one decoding step (``q_len == 1``) of a full-attention model on ``sdpa``: the 4D boolean
    mask transformers' ``sdpa_mask`` would build from the 2D padding mask (query = the last position, so the causal
    part allows every key and the mask is the padding mask itself). transformers uses a 4D mask as it is; handed the
    2D mask it would first read it back to see whether it has padding at all (a host sync per step). Anything else
    is returned unchanged. tests/test_library_internals.py pins the equality with ``sdpa_mask``."""
    cfg = getattr(model, "config", None)
    if q_len != 1 or attention_mask is None or attention_mask.dim() != 2 or cfg is None or attn_implementation(cfg) != "sdpa":
        return attention_mask
    return attention_mask[:, None, None, :].bool()


@contextmanager
def prefix_attention(model):
    """Use ``prefix_causal_sdpa`` for calls inside the block when ``model`` uses ``sdpa`` (else change nothing)."""
    cfg = getattr(model, "config", None)
    if cfg is None or attn_implementation(cfg) != "sdpa":
        yield
        return
    _set_attn_impl(cfg, NAME)
    try:
        yield
    finally:
        _set_attn_impl(cfg, "sdpa")
