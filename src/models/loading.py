"""One way to load any checkpoint the project handles: a dense HF model (local folder or hub id), a Post-MoE
checkpoint written by ``src.models.moe`` or a LoRA adapter folder (``src.models.adapter``). Every stage (step 4,
training, chat, tools) loads through here."""
from __future__ import annotations

from pathlib import Path

import torch


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 is ~17x slower on CPUs without bf16 hardware, see STACK.md)."""
    device = torch.device(device) if device is not None else None
    return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32


def load_tokenizer(name_or_path, padding_side: str = "left"):
    """The model's tokenizer with a pad token (EOS when it has none) and the requested padding side."""
    from transformers import AutoTokenizer

    from . import adapter

    if adapter.is_adapter_dir(name_or_path) and not adapter.has_tokenizer(name_or_path):
        name_or_path = adapter.adapter_base(name_or_path)  # a bare peft adapter: its base's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name_or_path, torch_dtype: torch.dtype | None = None, device=None):
    """Load a causal LM for inference or training; MoE checkpoints of ours are detected from their config, LoRA adapter
    folders from their adapter_config.json (loaded on their base and merged, see adapter.py)."""
    from . import adapter, moe

    dtype = torch_dtype or default_dtype(device)
    if adapter.is_adapter_dir(name_or_path):
        model = adapter.load_adapter(name_or_path, torch_dtype=dtype)
    elif Path(str(name_or_path)).is_dir() and moe.is_moe_checkpoint(name_or_path):
        model = moe.load_model(name_or_path, torch_dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return model.to(device) if device is not None else model
