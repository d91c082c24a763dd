"""Export a Post-MoE checkpoint to transformers' own Qwen2MoeForCausalLM, which stock tools (AutoModelForCausalLM,
vLLM, lm-eval) load without our code. docs/moe.md "Export to a stock class".

    python -m util.moe_export --model ckpts/<exp>_moe/checkpoint-3 --out models/<exp>-qwen2moe

Qwen2-MoE represents Qwen2- and Llama-family decoders exactly: the same RMSNorm, rotary embedding (every rope type
goes through the same `rope_parameters` code), SwiGLU MLP and attention; `qkv_bias` follows the base model (True for
Qwen2, False for Llama), `head_dim` is carried over, dense layers go to `mlp_only_layers`, each expert has the dense
intermediate size, and without a shared expert `shared_expert_intermediate_size=0` (a zero-width MLP whose output is
exactly 0). Whatever it cannot represent is refused, naming the setting. The export is checked before it is saved:
the exported model must give the source model's logits on a probe sequence.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from src.models import moe, router

STOCK_CLASS = "Qwen2MoeForCausalLM"
# Base-config fields that are not Qwen2-MoE fields: checked by _refuse_unrepresentable, then dropped.
_CHECKED_FIELDS = ("attention_bias", "mlp_bias", "pretraining_tp")
_DROPPED_FIELDS = ("model_type", "architectures", "transformers_version", moe.MOE_CONFIG_KEY, *_CHECKED_FIELDS)
PROBE_TOKENS = 24
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}  # max abs logit difference, relative to the logits' scale
LOW_PRECISION_TOLERANCE = 5e-2


def _refuse_unrepresentable(dense, settings: moe.MoESettings) -> None:
    router.check_exportable(settings.routing)
    model_type = dense.model_type
    if model_type not in ("qwen2", "llama"):
        raise ValueError(f"model_type={model_type!r}: only Qwen2- and Llama-based Post-MoE models export to "
                         f"{STOCK_CLASS} (no stock transformers MoE class represents this architecture exactly); "
                         "use src.models.loading.load_model")
    if getattr(dense, "attention_bias", False):
        raise ValueError(f"attention_bias=True: {STOCK_CLASS} has no o_proj bias, so this model cannot be exported")
    if getattr(dense, "mlp_bias", False):
        raise ValueError(f"mlp_bias=True: {STOCK_CLASS}'s experts have no biases")
    if model_type == "llama" and getattr(dense, "layer_types", None) and set(dense.layer_types) != {"full_attention"}:
        raise ValueError(f"layer_types={dense.layer_types}: only full attention exports from a Llama-family model")


def qwen2_moe_config(dense, settings: moe.MoESettings):
    """The Qwen2MoeConfig that represents `dense` (a Qwen2 or Llama config) upcycled with `settings`."""
    from transformers import Qwen2MoeConfig

    _refuse_unrepresentable(dense, settings)
    fields = {k: v for k, v in dense.to_dict().items() if k not in _DROPPED_FIELDS}
    return Qwen2MoeConfig(
        **fields, num_experts=settings.num_experts, num_experts_per_tok=settings.top_k,
        norm_topk_prob=settings.norm_topk_prob, moe_intermediate_size=dense.intermediate_size,
        shared_expert_intermediate_size=dense.intermediate_size if settings.shared_expert else 0,
        decoder_sparse_step=1, mlp_only_layers=[i for i in range(dense.num_hidden_layers)
                                                if i not in settings.moe_layers],
        router_aux_loss_coef=settings.router_aux_loss_coef, output_router_logits=False,
        qkv_bias=dense.model_type == "qwen2", architectures=[STOCK_CLASS])


@torch.no_grad()
def max_logit_difference(a: nn.Module, b: nn.Module, vocab_size: int) -> tuple[float, float]:
    """Max abs logit difference of two models on a fixed probe sequence, and the logits' scale."""
    probe = torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(a.parameters()).device)
    want = a(input_ids=probe).logits.float()
    got = b(input_ids=probe.to(next(b.parameters()).device)).logits.float().to(want.device)
    return (got - want).abs().max().item(), want.abs().max().item()


def to_qwen2_moe(moe_model: nn.Module) -> nn.Module:
    """The stock Qwen2MoeForCausalLM equal to our Post-MoE model (same weights, key for key), in eval mode."""
    settings = moe.moe_settings(moe_model)
    config = qwen2_moe_config(moe_model.config, settings)
    dtype = next(moe_model.parameters()).dtype
    exported = moe.build_empty(config, dtype)
    state = dict(moe_model.state_dict())
    target = exported.state_dict()
    for key in target.keys() - state.keys():  # only the zero-width shared expert and its gate may be absent
        if ".shared_expert" not in key or settings.shared_expert:
            raise ValueError(f"export: no source weight for {key}")
        state[key] = torch.zeros_like(target[key])
    exported.load_state_dict(state, strict=True)
    if getattr(moe_model, "generation_config", None) is not None:
        exported.generation_config = moe_model.generation_config
    return exported.to(next(moe_model.parameters()).device).eval()


def export_qwen2_moe(moe_model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Write our Post-MoE model as a stock Qwen2MoeForCausalLM folder after checking it gives the same logits."""
    exported = to_qwen2_moe(moe_model)
    was_training = moe_model.training
    moe_model.eval()
    diff, scale = max_logit_difference(moe_model, exported, moe_model.config.vocab_size)
    moe_model.train(was_training)
    dtype = next(moe_model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE) * max(1.0, scale)
    if diff > tolerance:
        raise ValueError(f"export: the {STOCK_CLASS} copy differs from the source by {diff:.3g} in the logits "
                         f"(tolerance {tolerance:.3g}, {dtype}); nothing written")
    out = Path(out_dir)
    if tokenizer is not None:
        # The export's model type (qwen2_moe) would select the Qwen2 release format; the source model's own chat
        # format is recorded so that step 4, the chats and serving keep using it (chat_formats.resolve_format).
        from src.common.chat_formats import RECORDED_FORMAT, resolve_format

        setattr(exported.config, RECORDED_FORMAT, resolve_format(tokenizer, moe_model.config).name)
    exported.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
