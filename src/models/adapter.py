"""LoRA adapter folders (written by step 3 with ``--lora-r``, or any peft LoRA adapter): recognise one, find its base,
load it as a plain model with the adapter merged into the weights.

An adapter folder holds ``adapter_config.json`` (peft's; ``base_model_name_or_path`` names the base: an HF folder,
a hub id or a Post-MoE checkpoint), ``adapter_model.safetensors`` and, from step 3, the tokenizer. Step 4, the chat
and proxy-tuning load it through ``src.models.loading`` like any checkpoint; ``util/merge_lora.py`` writes the merged
model as a full checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_dir(path) -> bool:
    return Path(str(path)).is_dir() and (Path(str(path)) / ADAPTER_CONFIG).is_file()


def adapter_base(path) -> str:
    """The base model an adapter folder was trained on (a folder path or a hub id)."""
    path = Path(path)
    config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path, cannot tell which model it adapts")
    # A relative folder is taken from the current directory, else from beside the adapter (a moved run folder).
    if not Path(base).is_absolute() and not Path(base).exists() and (path / base).exists():
        return str(path / base)
    return str(base)


def has_tokenizer(path) -> bool:
    return (Path(path) / "tokenizer_config.json").is_file()


def load_adapter(path, torch_dtype: torch.dtype | None = None, merge: bool = True):
    """The adapter's base (through ``loading.load_model``, so Post-MoE bases work) with the adapter applied; merged into
    plain weights by default (no LoRA cost at inference, and the result is an ordinary transformers model)."""
    if not (Path(path) / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
    from peft import PeftModel

    from src.models.loading import load_model

    base = load_model(adapter_base(path), torch_dtype=torch_dtype)
    model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model
