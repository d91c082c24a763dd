"""Merge a LoRA adapter folder (step 3 with --lora-r) into its base and write a full checkpoint.

    python -m util.merge_lora --adapter ckpts/run/checkpoint-200 --out models/run-merged [--dtype float32]

The base comes from the adapter's adapter_config.json. A dense base gives an ordinary Hugging Face folder
(``AutoModelForCausalLM.from_pretrained`` loads it); a Post-MoE base gives a Post-MoE checkpoint (the project's loader,
or ``export_qwen2_moe`` for stock Qwen2-MoE). The tokenizer is taken from the adapter folder (else the base's).
Step 4 does not need this: it loads an adapter folder directly, merged in memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from src.common.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m util.merge_lora", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", required=True, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint (must not exist or be empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the merge is computed and stored in")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds files")
    return p


def merge(adapter_dir, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    from src.models import moe
    from src.models.adapter import is_adapter_dir
    from src.models.loading import load_adapter, load_tokenizer

    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    model = load_adapter(adapter_dir, torch_dtype=dtype, merge=True)
    tokenizer = load_tokenizer(adapter_dir)
    out = Path(out_dir)
    if moe.is_moe(model):
        moe.save_moe(model, tokenizer, out)
    else:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> int:
    from src.common.outputs import check_out, staged_folder
    from src.models.adapter import adapter_base, is_adapter_dir
    from src.models.loading import check_model_source

    args = build_parser().parse_args(argv)
    check_model_source(args.adapter, weights=True, flag="--adapter")
    if not is_adapter_dir(args.adapter):
        raise UsageError("--adapter", f"{args.adapter}: not an adapter folder (no adapter_config.json)")
    out = check_out(args.out, [args.adapter, adapter_base(args.adapter)], overwrite=args.overwrite)
    with staged_folder(out) as tmp:  # whole or not at all
        merge(args.adapter, tmp, getattr(torch, args.dtype))
    print(f"[merge_lora] merged {args.adapter} into {out}")
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
