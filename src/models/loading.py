"""One way to load any checkpoint the project handles: a dense HF model (local folder or hub id) or a Post-MoE
checkpoint written by ``src.models.moe``. Every stage (step 4, training, chat, tools) loads through here."""
from __future__ import annotations

from pathlib import Path

import torch


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 is ~17x slower on CPUs without bf16 hardware, see STACK.md)."""
    device = torch.device(device) if device is not None else None
    return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32


def _moe_config_kwargs(name_or_path) -> dict:
    """{"config": base config} for one of our MoE folders: transformers cannot read their config.json (by design,
    see src.models.moe.MOE_MODEL_TYPE) and would otherwise warn while looking for the tokenizer class."""
    from . import moe

    if Path(str(name_or_path)).is_dir() and moe.is_moe_checkpoint(name_or_path):
        return {"config": moe.base_config(name_or_path)}
    return {}


def load_config(name_or_path):
    """The model's transformers config; for our MoE folders the base model's config (with its post_moe field)."""
    from transformers import AutoConfig

    return _moe_config_kwargs(name_or_path).get("config") or AutoConfig.from_pretrained(name_or_path)


def load_tokenizer(name_or_path, padding_side: str = "left"):
    """The model's tokenizer with a pad token (EOS when it has none) and the requested padding side."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **_moe_config_kwargs(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name_or_path, torch_dtype: torch.dtype | None = None, device=None):
    """Load a causal LM for inference or training; MoE checkpoints of ours are detected from their config."""
    from . import moe

    dtype = torch_dtype or default_dtype(device)
    if Path(str(name_or_path)).is_dir() and moe.is_moe_checkpoint(name_or_path):
        model = moe.load_model(name_or_path, torch_dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return model.to(device) if device is not None else model
