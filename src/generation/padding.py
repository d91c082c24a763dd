"""Left padding, written once: prompts of different lengths decoded in one batch end at the same column, so every
row's next token comes from the last position. Used for token lists (a prefill batch, HF generate's inputs) and for
tensors (cache columns and attention-mask columns merged from several batches)."""
from __future__ import annotations

import torch


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, attention mask) of ``rows`` left-padded with ``pad_id`` to the longest: mask 0 on padding, 1 on tokens."""
    width = max(len(r) for r in rows)
    ids = [[pad_id] * (width - len(r)) + list(r) for r in rows]
    mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
    return ids, mask


def left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with zeros in front along ``dim`` up to ``width`` (cache columns, attention-mask columns)."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
