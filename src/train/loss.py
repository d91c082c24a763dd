"""Step 3's token cross-entropy without the full logits (``--loss``).

The loss of a micro-batch is the summed cross-entropy of predicting ``labels[t+1]`` from position ``t`` (steps.py
``token_losses``). The ``full`` loss computes the logits of every position ([tokens, vocabulary], then fp32): for
Qwen2-0.5B's 151,936-token vocabulary and 16,384 tokens that is 10 GB of fp32 logits plus as much again for their
gradient. Two losses that never hold them:

- ``chunked`` (plain torch, CPU and GPU): the final hidden states of the label positions only, times the output
  projection, a chunk of rows at a time (``chunk_rows``). The gradients of a chunk (w.r.t. its hidden states and the
  projection weight, accumulated in fp32) are computed right after its loss, so no chunk's logits are kept for the
  backward or recomputed; the backward only scales them.
- ``liger``: Liger-Kernel's fused linear cross-entropy (Triton, CUDA; ``--kernels liger``), the same idea fused into
  kernels.

Both need the hidden states the model feeds its output projection: ``final_hidden`` takes them there (a forward
pre-hook on ``get_output_embeddings()``) and lets the projection run on an empty slice, so the model's forward is
the usual one (peft, DeepSpeed, Post-MoE hooks included) minus the logits.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from src.common.defaults import IGNORE_INDEX
from src.common.errors import UsageError

CHOICES = ("auto", "full", "chunked", "liger")
# fp32 log-probabilities per chunk: 3,533 rows at Qwen2's 151,936-token vocabulary. Each chunk also adds its share to
# an fp32 weight gradient, a [vocabulary, hidden] pass over memory, so the chunks are not made smaller than needed.
CHUNK_BYTES = 2 * 2**30
# Families whose logits are exactly output_projection(final hidden state): no softcap, scale or bias in between.
PLAIN_HEAD_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: ``labels[t+1]``, and -100 after the last one."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


# --------------------------------------------------------------------------------------------- the hidden states
def unwrap(model):
    """The model inside DeepSpeed's engine (``model.module``); a peft model answers for its base model."""
    return model.module if hasattr(model, "module") else model


@dataclass
class Captured:
    hidden: torch.Tensor | None = None
    head: torch.nn.Module | None = None


@contextmanager
def final_hidden(model):
    """Within the block, a forward of ``model`` records the hidden states its output projection receives
    (``Captured.hidden``, [B, S, H], part of the autograd graph) and projects an empty slice of them instead: the
    logits come out [B, 0, V] and are never computed. transformers' causal LMs apply ``get_output_embeddings()`` to
    the final (normed) hidden states (pinned by tests/test_library_internals.py)."""
    head = unwrap(model).get_output_embeddings()
    seen = Captured(head=head)

    def take(module, args):
        seen.hidden = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(take)
    try:
        yield seen
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------- chunked loss
class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden[i] @ weight.T, targets[i]) chunk by chunk, with the gradients computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, with_grads: bool):
        need_h = with_grads and ctx.needs_input_grad[0]
        need_w = with_grads and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], targets[start:start + chunk]
            # logits in the model's dtype, log-softmax in fp32: what F.cross_entropy(logits.float()) computes
            logp = torch.log_softmax(F.linear(h, weight), dim=-1, dtype=torch.float32)
            rows = torch.arange(y.numel(), device=y.device)
            total -= logp[rows, y].sum()
            if need_h or need_w:
                dlogits = logp.exp_()  # softmax, in place
                dlogits[rows, y] -= 1.0  # d(loss)/d(logits)
                dlogits = dlogits.to(hidden.dtype)
                if need_h:
                    grad_h[start:start + chunk] = dlogits @ weight
                if need_w:
                    grad_w.add_(dlogits.t() @ h)  # accumulated over the chunks in fp32
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: as many as fit ``CHUNK_BYTES`` of fp32 log-probabilities."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def chunked_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy (fp32) of ``hidden [N, H] @ weight.T`` against ``targets [N]`` (no ignored targets),
    ``chunk`` rows at a time (default ``chunk_rows``)."""
    with_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk or chunk_rows(weight.shape[0]),
                                            with_grads)


def hidden_ce_sum(seen: Captured, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """The summed token cross-entropy of a micro-batch from its captured final hidden states: the same shift and the
    same ignored positions as steps.token_losses, logits only for the label positions."""
    shifted = shift_labels(labels)
    keep = shifted != IGNORE_INDEX
    weight = seen.head.weight
    hidden = seen.hidden[keep].to(weight.dtype)  # [N, H]
    targets = shifted[keep]
    if targets.numel() == 0:  # no label in this micro-batch: a zero that still reaches every parameter
        return seen.hidden.sum() * 0.0
    if kind == "liger":
        from src.train.kernels import liger_loss

        return liger_loss()(weight, hidden, targets).float()
    return chunked_ce_sum(hidden, weight, targets)


# ---------------------------------------------------------------------------------------------------- the choice
def _no_chunked_reason(model, zero: int) -> str | None:
    """Why the losses without full logits cannot run on this model and setup (None: they can)."""
    cfg = unwrap(model).config
    family = getattr(cfg, "model_type", None)
    if family not in PLAIN_HEAD_FAMILIES:
        return f"checked only for {', '.join(PLAIN_HEAD_FAMILIES)} models, not {family}"
    head = unwrap(model).get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        return "the output projection has a bias"
    if zero == 3:
        return "ZeRO-3 partitions the output projection, which these losses read directly"
    return None


def choose(requested: str, model, *, zero: int, kernels: str, on_gpu: bool) -> tuple[str, str]:
    """(loss, why) for ``--loss``. auto: liger's fused loss when Liger's kernels are on, else chunked on a GPU and
    full on CPU (the chunked loss saves memory, not time, on a CPU: docs/train.md)."""
    why_not = _no_chunked_reason(model, zero)
    if requested == "full":
        return "full", "as requested"
    if requested in ("chunked", "liger"):
        if why_not:
            raise UsageError("--loss", f"{requested}: {why_not}; use --loss full")
        if requested == "liger" and kernels != "liger":
            raise UsageError("--loss", "liger needs Liger's kernels (--kernels liger or auto on a GPU with "
                                       "requirements-gpu.txt installed)")
        return requested, "as requested"
    if why_not:
        return "full", why_not
    if kernels == "liger":
        return "liger", "Liger fused linear cross-entropy"
    if on_gpu:
        return "chunked", f"no [tokens, vocabulary] fp32 logits: chunks of {CHUNK_BYTES / 2**30:g} GiB"
    return "full", "CPU: the chunked loss saves memory, not time, here"
