"""The pieces of one training step: model inputs from a collated batch, the token losses, the MoE auxiliary loss,
and the numbers logged after the step (grad norm, expert load)."""
from __future__ import annotations

from src.common.defaults import IGNORE_INDEX
from src.train.loss import final_hidden, hidden_ce_sum, shift_labels, unwrap


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

    shift = shift_labels(labels)
    v = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, v).float(), shift.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="none").view(shift.shape), shift


def forward_loss(model, batch, device, *, is_moe: bool, moe=None, loss: str = "full"):
    """Summed token cross-entropy of one micro-batch (and the MoE auxiliary loss, or None). ``loss``: ``full`` from
    the model's logits, ``chunked``/``liger`` from its final hidden states without the full logits (loss.py)."""
    inputs = model_inputs(batch, device, is_moe=is_moe)
    labels = batch["labels"].to(device, non_blocking=True)
    if loss == "full":
        ce_sum = token_losses(model(**inputs).logits, labels)[0].sum()
    else:
        with final_hidden(model) as seen:
            model(**inputs)
        ce_sum = hidden_ce_sum(seen, labels, loss)
    aux = moe.aux_loss(unwrap(model)) if is_moe else None
    return ce_sum, aux


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
