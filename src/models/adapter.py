"""LoRA adapter folders (written by step 3 with ``--lora-r``, or any peft LoRA adapter): recognise one and find its base.
Loading one (its base with the adapter merged into the weights) is ``src.models.loading``'s job, like every model's.

An adapter folder holds ``adapter_config.json`` (peft's; ``base_model_name_or_path`` names the base: an HF folder,
a hub id or a Post-MoE checkpoint), ``adapter_model.safetensors`` and, from step 3, the tokenizer. Step 4, the chat
and proxy-tuning load it through ``src.models.loading`` like any checkpoint; ``util/merge_lora.py`` writes the merged
model as a full checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

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

