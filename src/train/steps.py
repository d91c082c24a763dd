"""The pieces of one training step: model inputs from a collated batch, the token losses, the MoE auxiliary loss,
and the numbers logged after the step (grad norm, expert load)."""
from __future__ import annotations

from src.common.defaults import IGNORE_INDEX


def model_inputs(batch: dict, device, *, is_moe: bool) -> dict:
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
              "position_ids": batch["position_ids"].to(device, non_blocking=True),
              "use_cache": False}
    if "cu_seq_lens_q" in batch:  # flattened rows for flash-attention varlen
        for k in ("cu_seq_lens_q", "cu_seq_lens_k"):
            inputs[k] = batch[k].to(device, non_blocking=True)
        inputs["max_length_q"] = inputs["max_length_k"] = batch["max_length_q"]
    if is_moe:
        inputs["language_ids"] = batch["language_ids"].to(device, non_blocking=True)
    return inputs


def token_losses(logits, labels):
    """Per-position cross-entropy of predicting ``labels[t+1]`` from position ``t`` (0 where ignored), fp32."""
    import torch.nn.functional as F

    shift = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    v = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, v).float(), shift.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(shift.shape), shift


def forward_loss(model, batch, device, *, is_moe: bool, moe=None):
    """Summed token cross-entropy of one micro-batch (and the MoE auxiliary loss, or None)."""
    out = model(**model_inputs(batch, device, is_moe=is_moe))
    losses, _ = token_losses(out.logits, batch["labels"].to(device, non_blocking=True))
    aux = moe.aux_loss(model.module if hasattr(model, "module") else model) if is_moe else None
    return losses.sum(), aux


def grad_norm(engine) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except AttributeError:
        return None
    if g is None:
        return None
    return float(g.item() if hasattr(g, "item") else g)


def routing_metrics(accelerator, routing) -> dict:
    """Expert load per MoE layer since the last call (all ranks, padding excluded): the share of routed token
    slots each expert got, and the load imbalance max/mean (1.0 = perfectly balanced)."""
    import torch

    blocks = routing.blocks
    table = torch.zeros(len(blocks), blocks[0].num_experts, dtype=torch.float64)
    for i, block in enumerate(blocks):
        for counts in routing.counts.get(block.layer_idx, {}).values():
            table[i] += counts.double()
    routing.reset()
    table = accelerator.reduce(table.to(accelerator.device), reduction="sum").cpu()
    out = {}
    for i, block in enumerate(blocks):
        total = table[i].sum().item()
        if total <= 0:
            continue
        share = table[i] / total
        out[f"routing/layer{block.layer_idx}/imbalance"] = float(share.max() * share.numel())
        for e, v in enumerate(share.tolist()):
            out[f"routing/layer{block.layer_idx}/expert{e}"] = v
    return out
