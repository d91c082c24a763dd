"""LoRA and QLoRA for step 3, with peft (pinned in requirements.txt; the 3D expert support needs >= 0.17).

``--lora-r R`` wraps the loaded model in a peft LoRA model before DeepSpeed sees it; the optimizer then holds only the
trainable parameters. What is trainable (docs/train.md "LoRA"):

- LoRA (rank R, scale alpha / R) on the linear layers named by ``--lora-targets``: ``all-linear`` is every
  ``nn.Linear`` except the output projection and the Post-MoE routers (attention, dense MLPs, shared experts);
- Post-MoE routers (``mlp.gate`` of each sparse block, and its ``shared_expert_gate``): trained in full by default
  (``--lora-router full``: they are small and they are what the Post-MoE stage learns), or frozen;
- Post-MoE fused experts (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``): ``--lora-experts
  frozen`` (default), ``full`` (trained as they are, saved whole in the adapter) or ``lora`` (peft's
  ``target_parameters``: one rank-R pair per expert, folded into the 3D weight at each forward).

Full-trained modules (routers, experts with ``full``) are peft ``modules_to_save``, so the adapter folder carries them
and loading it (``src.models.adapter``) restores them. ``--qlora`` loads the base in 4-bit NF4 with bitsandbytes (CUDA
only) and prepares it with peft's ``prepare_model_for_kbit_training``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from src.common.errors import UsageError

ALL_LINEAR = "all-linear"
ROUTER_CHOICES = ("full", "frozen")
EXPERT_CHOICES = ("frozen", "full", "lora")
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


# ------------------------------------------------------------------------------------------------------------ flags
def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA / QLoRA (peft; docs/train.md 'LoRA')")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0: full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (scale alpha/r; default 2r)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (must be 0 with "
                                                                   "--lora-experts lora)")
    g.add_argument("--lora-targets", default=ALL_LINEAR,
                   help="linear layers that get LoRA: all-linear (all but the output projection and the routers) or "
                        "comma-separated layer names, e.g. q_proj,v_proj")
    g.add_argument("--lora-router", choices=ROUTER_CHOICES, default="full", help="Post-MoE routers: trained in full "
                                                                                 "or frozen")
    g.add_argument("--lora-experts", choices=EXPERT_CHOICES, default="frozen",
                   help="Post-MoE fused experts: frozen, trained in full, or LoRA per expert")
    g.add_argument("--qlora", action="store_true", help="load the base in 4-bit NF4 (bitsandbytes, CUDA GPU only)")


def check(config) -> None:
    """Refuse inconsistent LoRA flags of a ``TrainConfig`` with one line (called while it is built; the message
    starts with the flag, as the parser's own errors do)."""
    if config.lora_r < 0:
        raise UsageError("", "--lora-r must be >= 0")
    if not enabled(config):
        given = [f for f, v in (("--lora-alpha", config.lora_alpha is not None),
                                ("--lora-dropout", config.lora_dropout),
                                ("--lora-targets", config.lora_targets != ALL_LINEAR),
                                ("--lora-router", config.lora_router != "full"),
                                ("--lora-experts", config.lora_experts != "frozen"), ("--qlora", config.qlora)) if v]
        if given:
            raise UsageError("", f"{', '.join(given)}: only with --lora-r R (> 0)")
        return
    if not 0.0 <= config.lora_dropout < 1.0:
        raise UsageError("", "--lora-dropout must be in [0, 1)")
    if config.lora_experts == "lora" and config.lora_dropout:
        raise UsageError("", "--lora-experts lora needs --lora-dropout 0 (peft applies LoRA to a 3D parameter as a "
                             "weight delta, which cannot drop inputs)")
    if config.qlora:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("", "--qlora needs a CUDA GPU (bitsandbytes 4-bit); on CPU use --lora-r alone")
        if config.zero == 3:
            raise UsageError("", "--qlora works with --zero 1 or 2 (ZeRO-3 cannot partition 4-bit weights)")


def enabled(config) -> bool:
    return getattr(config, "lora_r", 0) > 0


def alpha(config) -> float:
    return config.lora_alpha if config.lora_alpha is not None else 2.0 * config.lora_r


def settings(config) -> dict | None:
    """The LoRA settings of a run (None without LoRA): part of the resume signature and of trainer_state.json."""
    if not enabled(config):
        return None
    return {"r": config.lora_r, "alpha": alpha(config), "dropout": config.lora_dropout,
            "targets": config.lora_targets, "router": config.lora_router, "experts": config.lora_experts,
            "qlora": bool(config.qlora)}


# ----------------------------------------------------------------------------------------------------- the model
def load_4bit(name_or_path, dtype, device, *, is_moe: bool):
    """The base in 4-bit NF4 (double quantisation, compute in ``dtype``) on this process's GPU. bitsandbytes is imported
    only here: it has no CPU use and is not a dependency of CPU installs."""
    if is_moe:
        raise SystemExit("--qlora: Post-MoE checkpoints are not loaded in 4-bit (use --lora-r alone)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SystemExit("--qlora needs bitsandbytes on a CUDA machine: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    from src.models.loading import load_model

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    return load_model(name_or_path, torch_dtype=dtype, quantization_config=quant, device_map={"": device})


def _module_names(model) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def moe_parts(model) -> tuple[list[str], list[str]]:
    """Full module names of the Post-MoE routers and of the fused expert modules (empty lists for a dense model)."""
    from src.models import moe

    names = _module_names(model)
    routers, experts = [], []
    for block in moe.sparse_blocks(model):
        routers += [names[id(m)] for m in (block.gate, block.shared_expert_gate) if m is not None]
        experts.append(names[id(block.experts)])
    return routers, experts


def lora_targets(model, spec: str, exclude: list[str]) -> list[str]:
    """Leaf names of the linear layers that get LoRA (``q_proj``, ...): ``all-linear`` or a comma-separated list,
    checked against the model. The output projection and the ``exclude`` modules (routers) are never targets."""
    import torch

    out = model.get_output_embeddings()
    skip = {id(out)} | {id(model.get_submodule(n)) for n in exclude}
    leaves, excluded_leaves = set(), set()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            (excluded_leaves if id(m) in skip else leaves).add(name.rpartition(".")[-1])
    clash = sorted(excluded_leaves & leaves)
    if clash:  # peft matches by leaf name: a router sharing a name with a LoRA target would be adapted too
        raise SystemExit(f"--lora-targets: layer names {clash} are both routers/output and ordinary linear layers")
    if spec == ALL_LINEAR:
        return sorted(leaves)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in wanted if w not in leaves]
    if unknown or not wanted:
        raise SystemExit(f"--lora-targets {spec}: no linear layer named {unknown or spec!r} that LoRA may adapt "
                         f"(choose from {', '.join(sorted(leaves))})")
    return wanted


def build_config(model, config):
    """peft LoraConfig for this model and these flags."""
    from peft import LoraConfig

    routers, experts = moe_parts(model)
    save = (routers if config.lora_router == "full" else []) + (experts if config.lora_experts == "full" else [])
    params = [f"{e}.{p}" for e in experts for p in EXPERT_PARAMS] if config.lora_experts == "lora" else None
    return LoraConfig(r=config.lora_r, lora_alpha=alpha(config), lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(model, config.lora_targets, routers), modules_to_save=save or None,
                      target_parameters=params, bias="none", task_type="CAUSAL_LM")


def base_reference(base) -> str:
    """How the adapter names its base: an absolute path for a local folder (so it loads from anywhere), else the id."""
    path = Path(str(base))
    return str(path.resolve()) if path.exists() else str(base)


def apply(model, config, *, base, is_moe: bool):
    """The peft LoRA model for these flags (``model`` itself without ``--lora-r``)."""
    if not enabled(config):
        return model
    if not is_moe:
        for flag, value, default in (("--lora-experts", config.lora_experts, "frozen"),
                                     ("--lora-router", config.lora_router, "full")):
            if value != default:
                raise SystemExit(f"{flag} {value}: {base} is a dense model (no experts, no router)")
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    from peft import get_peft_model

    peft_model = get_peft_model(model, build_config(model, config))
    peft_model.peft_config["default"].base_model_name_or_path = base_reference(base)
    return peft_model


def is_lora(model) -> bool:
    """True for a peft model (checked without importing peft, which full fine-tuning runs do not need)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def plain_view(model):
    """The transformers model inside a peft model (LoRA layers active): what step 4's decoder expects."""
    return model.get_base_model() if is_lora(model) else model


def param_counts(model) -> dict[str, int]:
    """Trainable and total parameters, and the trainable ones split into LoRA, routers and experts (full sizes under
    ZeRO-3, where parameters are partitioned)."""
    counts = {"trainable": 0, "total": 0, "lora": 0, "router": 0, "experts": 0}
    for name, p in model.named_parameters():
        n = getattr(p, "ds_numel", p.numel())
        counts["total"] += n
        if not p.requires_grad:
            continue
        counts["trainable"] += n
        if "lora_" in name:
            counts["lora"] += n
        elif ".experts" in name:
            counts["experts"] += n
        elif "gate.modules_to_save" in name:
            counts["router"] += n
    return counts


def describe(counts: dict[str, int]) -> str:
    share = counts["trainable"] / max(counts["total"], 1)
    parts = [f"{counts['lora'] / 1e6:.2f}M LoRA"]
    parts += [f"{counts[k] / 1e6:.2f}M {k}" for k in ("router", "experts") if counts[k]]
    return (f"{counts['trainable'] / 1e6:.2f}M of {counts['total'] / 1e6:.1f}M parameters trainable "
            f"({100 * share:.2f}%: {', '.join(parts)})")


# ------------------------------------------------------------------------------------------------ checkpoints
def save_adapter_files(model, tokenizer, out_dir) -> None:
    """adapter_config.json + adapter_model.safetensors (+ the tokenizer when given); the caller makes sure the
    trainable parameters are whole (gathered under ZeRO-3)."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def save_adapter(accelerator, engine, unwrapped, tokenizer, out_dir) -> None:
    """The adapter folder of a checkpoint, written by the main process (a collective under ZeRO-3: every rank gathers
    the trainable parameters, the only ones the adapter holds)."""
    zero3 = getattr(engine, "zero_optimization_stage", lambda: 0)() == 3
    if zero3:
        import deepspeed

        trainable = [p for p in unwrapped.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            if accelerator.is_main_process:
                save_adapter_files(unwrapped, tokenizer, out_dir)
    elif accelerator.is_main_process:
        save_adapter_files(unwrapped, tokenizer, out_dir)


def state_save_kwargs(model) -> dict:
    """``accelerator.save_state`` extras: with LoRA the DeepSpeed state leaves out the frozen base (it is --model)."""
    return {"exclude_frozen_parameters": True} if is_lora(model) else {}


def drop_frozen_tied_weights_on_save(engine) -> None:
    """Make ``save_checkpoint(exclude_frozen_parameters=True)`` leave out every frozen weight of a LoRA run.

    DeepSpeed 0.19.8 (pinned) drops frozen weights by their ``named_parameters()`` names, which name a tied weight once:
    the tied output projection (``lm_head.weight``) stayed in the saved module state with the whole embedding matrix,
    as large as the rest of a small model. This wraps that one engine method (library internal: re-check on upgrade;
    tests/test_lora.py's folder-size test fails if it stops working)."""
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters=False, **kwargs):
        sd = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters and sd is not None:
            for name, p in engine.module.named_parameters(remove_duplicate=False):
                if not p.requires_grad:
                    sd.pop(name, None)
        return sd

    engine.module_state_dict = module_state_dict


def state_load_kwargs(model) -> dict:
    """``accelerator.load_state`` extras matching state_save_kwargs: the saved module state lacks the frozen base."""
    return {"load_module_strict": False} if is_lora(model) else {}
