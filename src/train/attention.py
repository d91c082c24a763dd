"""Step 3's attention kernels for packed rows, and which one a run uses (``--attn-impl``).

Rows are packed documents with per-document position ids and no attention mask (docs/train.md). The choices, fastest
first on a GPU:

- ``flash_attention_2``: the flash-attn package through transformers (only when it is installed).
- ``varlen``: torch's own varlen flash attention (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10, CUDA,
  Ampere or newer), registered below as a transformers attention function. The collator flattens a micro-batch into
  one padding-free row and passes the document boundaries (``cu_seq_lens_q/k``, ``max_length_q/k``) exactly as it
  does for flash_attention_2; every document attends causally to itself only.
- ``flex``: transformers' own ``flex_attention``: from the per-document position ids it builds a block mask that
  keeps each document to itself (``masking_utils.packed_sequence_compatibility_function``), and FlexAttention skips
  the masked blocks. It has no backward on CPU in torch 2.13.
- ``sdpa``: the block-diagonal document mask materialised for scaled_dot_product_attention (what runs on CPU).
- ``eager``: plain matmul attention, for debugging.

``auto`` takes the first that can run here and says why (``choose``).
"""
from __future__ import annotations

import importlib.util

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from src.common.errors import UsageError

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch
    varlen_attn = None

VARLEN = "varlen"
CHOICES = ("auto", VARLEN, "flex", "sdpa", "eager", "flash_attention_2")
# Our names for transformers' implementations.
HF_NAME = {"flex": "flex_attention"}
# Implementations that take a micro-batch flattened into one row with its document boundaries (data.Collator).
FLATTENED = (VARLEN, "flash_attention_2", "flash_attention_3")


def varlen_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, *, scale=None,
                  window_size=(-1, -1), enable_gqa: bool = False):
    """The one call into torch's varlen flash attention ([T, H, D] tensors; CUDA). Tests put a CPU reference with the
    same signature here. torch 2.13 makes the attention causal only when ``window_size == (-1, 0)`` (a tuple: a list
    compares unequal and would silently give bidirectional attention)."""
    return varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size,
                       enable_gqa=enable_gqa)


def _document_bounds(kwargs: dict, batch: int, length: int, device):
    """cu_seq_lens and max lengths: the collator's when given, else from the position ids as transformers' flash path
    does (a new document wherever the position id is the smallest), else one document per row."""
    if all(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")):
        return (kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], int(kwargs["max_length_q"]),
                int(kwargs["max_length_k"]))
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids.expand(batch, -1))
        return cu_q, cu_k, int(max_q), int(max_k)
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return cu, cu, length, length


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """A transformers ``AttentionInterface`` function (query [B, H, S, D], output [B, S, H, D]). Whole sequences
    without a padding mask (training rows, a prefill) go to the varlen kernel, one causal attention per document;
    anything else (a KV cache, a padding mask: step 4 during the dev evaluation) goes to transformers' sdpa with the
    mask ``varlen_mask`` built for it."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, softcap=softcap, **kwargs)
    if dropout or softcap is not None or sliding_window is not None or is_causal is False \
            or not getattr(module, "is_causal", True):
        raise ValueError("--attn-impl varlen: this layer asks for attention dropout, a logit softcap, a sliding window "
                         "or bidirectional attention, which the varlen path does not do; use --attn-impl flex or sdpa")
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    cu_q, cu_k, max_q, max_k = _document_bounds(kwargs, batch, length, query.device)
    out = varlen_kernel(query.transpose(1, 2).reshape(batch * length, heads, dim),
                        key.transpose(1, 2).reshape(batch * length, kv_heads, dim),
                        value.transpose(1, 2).reshape(batch * length, kv_heads, value.shape[-1]),
                        cu_q, cu_k, max_q, max_k, scale=scaling, window_size=(-1, 0), enable_gqa=heads != kv_heads)
    return out.view(batch, length, heads, -1), None


def varlen_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, **kwargs):
    """The mask function registered with ``varlen``: no mask at all for whole unpadded sequences (the varlen kernel
    takes the document boundaries instead of a [S, S] mask), otherwise sdpa's mask for the sdpa fallback above."""
    whole = (q_length == kv_length and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
             and (attention_mask is None or bool(attention_mask.all())))
    if whole:
        return None
    extra = {} if mask_function is None else {"mask_function": mask_function}
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **extra, **kwargs)


# transformers' public extension points (AttentionInterface and its mask registry, 5.23).
ALL_ATTENTION_FUNCTIONS.register(VARLEN, varlen_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN, varlen_mask)


# -------------------------------------------------------------------------------------------------------- choice
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def varlen_unavailable(on_gpu: bool) -> str | None:
    """Why torch's varlen kernel cannot run here (None: it can)."""
    if varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
    if not on_gpu:
        return "torch's varlen flash attention needs a CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 0):
        return f"flash attention needs an Ampere or newer GPU ({torch.cuda.get_device_name()})"
    if not torch.backends.cuda.is_flash_attention_available():
        return "this torch build has no flash attention"
    return None


def flex_unavailable(on_gpu: bool) -> str | None:
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return f"torch {torch.__version__} has no FlexAttention"
    if not on_gpu:
        return "FlexAttention has no backward on CPU (torch 2.13)"
    return None


def _has_sliding_window(config) -> bool:
    return "sliding_attention" in (getattr(config, "layer_types", None) or ())


def choose(requested: str, on_gpu: bool, config=None) -> tuple[str, str]:
    """(transformers implementation name, why) for ``--attn-impl``; a requested kernel that cannot run here is one
    clear error line."""
    if requested != "auto":
        why_not = {VARLEN: varlen_unavailable, "flex": flex_unavailable}.get(requested, lambda _: None)(on_gpu)
        if why_not:
            raise UsageError("--attn-impl", f"{requested}: {why_not}")
        return HF_NAME.get(requested, requested), "as requested"
    if not on_gpu:
        return "sdpa", "CPU: sdpa with the block-diagonal document mask"
    if flash_attn_installed():
        return "flash_attention_2", "flash_attn installed"
    varlen_missing = varlen_unavailable(on_gpu)
    if varlen_missing is None and not _has_sliding_window(config):
        return VARLEN, "torch varlen_attn; flash_attn not installed"
    varlen_missing = varlen_missing or "the model has sliding-window layers"
    flex_missing = flex_unavailable(on_gpu)
    if flex_missing is None:
        return "flex_attention", f"FlexAttention with a document block mask; varlen: {varlen_missing}"
    return "sdpa", f"sdpa with the document mask; varlen: {varlen_missing}; flex: {flex_missing}"


def needs_flat_rows(impl: str) -> bool:
    """Whether the collator should flatten a micro-batch into one row with cu_seq_lens for this implementation."""
    return impl in FLATTENED
