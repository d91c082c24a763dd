"""Import a published Apollo-MoE checkpoint (model_type "upcycling-qwen2-moe") without running its code.

    python -m util.import_apollo_moe --src DIR --out DIR [--export-stock DIR]

Reads only the folder's config.json and its safetensors (the Python files shipped beside them are never imported,
opened or copied) and writes our Post-MoE checkpoint (--out, loaded by src.models.loading.load_model and every stage)
and/or transformers' stock Qwen2MoeForCausalLM (--export-stock). Tokenizer and generation files are copied as data,
without any `auto_map` entry. docs/moe.md "Importing the published Apollo-MoE weights" lists the format.

Which layers are MoE is read from the weights (a layer with `mlp.gate.weight` is sparse), not from the config's
`mlp_only_layers`: the reference's config class recomputes that list in code, so the saved field need not be what
the weights are; a difference is reported. Routing at inference is the reference's: softmax in fp32, top-k, raw
probabilities unless `norm_topk_prob`, plus the sigmoid-gated shared expert when the checkpoint has one.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch

from src.common.errors import DataError
from src.models import moe, moe_export

APOLLO_MODEL_TYPE = "upcycling-qwen2-moe"
# config.json fields of the reference's MoE config that are not Qwen2 fields (listed in docs/moe.md).
MOE_FIELDS = ("decoder_sparse_step", "num_experts_per_tok", "num_experts", "norm_topk_prob", "output_router_logits",
              "router_aux_loss_coef", "mlp_only_layers", "share_flag", "attn_init_change", "language_gate",
              "moe_intermediate_size", "shared_expert_intermediate_size")
DROPPED_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", *MOE_FIELDS)
DATA_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "chat_template.jinja", "generation_config.json")
_EXPERT_KEY = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def read_config(src: Path) -> dict:
    file = src / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{src}: no config.json")
    config = json.loads(file.read_text(encoding="utf-8"))
    if config.get("model_type") != APOLLO_MODEL_TYPE:
        raise DataError(file, 0, "model_type", f"expected {APOLLO_MODEL_TYPE!r}, got {config.get('model_type')!r}")
    for field in ("num_experts", "num_experts_per_tok", "num_hidden_layers", "intermediate_size"):
        if not isinstance(config.get(field), int):
            raise DataError(file, 0, field, "missing, or not an integer")
    return config


def weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors files (this importer reads safetensors only, never .bin)")
    return files


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def moe_layout(weights: dict[str, torch.Tensor], config: dict, src: Path) -> tuple[list[int], bool, list[str]]:
    """(MoE layer indices, has a shared expert, notes), from the weight names, checked against config.json."""
    file = src / "config.json"
    layers = sorted(i for i in range(config["num_hidden_layers"]) if f"model.layers.{i}.mlp.gate.weight" in weights)
    if not layers:
        raise DataError(file, 0, "num_experts", "no layer has a router (model.layers.N.mlp.gate.weight)")
    notes = []
    for i in layers:
        experts = {int(m.group(3)) for k in weights if (m := _EXPERT_KEY.match(k)) and int(m.group(2)) == i}
        if experts != set(range(config["num_experts"])):
            raise DataError(file, 0, "num_experts", f"layer {i} has experts {sorted(experts)}, the config says "
                                                    f"{config['num_experts']}")
        width = weights[f"model.layers.{i}.mlp.experts.0.gate_proj.weight"].shape[0]
        if width != config["intermediate_size"]:
            raise DataError(file, 0, "moe_intermediate_size", f"layer {i}'s experts are {width} wide; upcycled "
                                                              f"experts have the dense size {config['intermediate_size']}")
    shared = [f"model.layers.{i}.mlp.shared_expert.gate_proj.weight" in weights for i in layers]
    if len(set(shared)) > 1:
        raise DataError(file, 0, "share_flag", "only some MoE layers have a shared expert")
    dense = [i for i in range(config["num_hidden_layers"]) if i not in layers]
    if "mlp_only_layers" in config and sorted(config["mlp_only_layers"]) != dense:
        notes.append(f"config.json says mlp_only_layers={config['mlp_only_layers']}, the weights have dense layers "
                     f"{dense}: the weights decide")
    return layers, shared[0], notes


def fuse_experts(weights: dict[str, torch.Tensor], layers: list[int], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert projections -> our fused layout (gate rows first in gate_up_proj [E, 2I, H]; down_proj [E, H, I])."""
    out = {k: v for k, v in weights.items() if not _EXPERT_KEY.match(k)}
    for i in layers:
        prefix = f"model.layers.{i}.mlp.experts"
        proj = {p: [weights[f"{prefix}.{e}.{p}_proj.weight"] for e in range(num_experts)] for p in ("gate", "up", "down")}
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(proj["gate"], proj["up"])])
        out[f"{prefix}.down_proj"] = torch.stack(proj["down"])
    return out


def build_model(config: dict, src: Path):
    """Our Post-MoE model holding the checkpoint's weights, in eval mode, and the import notes."""
    from transformers import Qwen2Config

    weights = read_weights(weight_files(src))
    layers, shared, notes = moe_layout(weights, config, src)
    dense_config = Qwen2Config(**{k: v for k, v in config.items() if k not in DROPPED_FIELDS})
    routing = "hybrid" if config.get("language_gate") else "learned"
    settings = moe.MoESettings(config["num_experts"], config["num_experts_per_tok"], tuple(layers),
                               bool(config.get("norm_topk_prob", False)), shared,
                               float(config.get("router_aux_loss_coef", 0.0)), routing)
    dtype = next(iter(weights.values())).dtype
    model = moe.build_empty(dense_config, dtype)
    moe.build_sparse_blocks(model, settings, router_init_std=0.0)
    state = fuse_experts(weights, layers, settings.num_experts)
    if dense_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict())
    if dense_config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    unexpected, missing = sorted(state.keys() - expected), sorted(expected - state.keys())
    if unexpected or missing:
        raise DataError(src / "config.json", 0, None, f"the weights do not match the config: unexpected "
                                                      f"{unexpected[:5]}, missing {missing[:5]}")
    model.load_state_dict(state, strict=False)
    setattr(model.config, moe.MOE_CONFIG_KEY, settings.to_config())
    return model.eval(), settings, notes


def copy_data_files(src: Path, out: Path) -> list[str]:
    """Tokenizer and generation files, as data; `auto_map` (a pointer to Python code) is removed from JSON files."""
    copied = []
    for name in DATA_FILES:
        if not (src / name).is_file():
            continue
        if name.endswith(".json"):
            entry = json.loads((src / name).read_text(encoding="utf-8"))
            if isinstance(entry, dict):
                entry.pop("auto_map", None)
            (out / name).write_text(json.dumps(entry, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src / name, out / name)
        copied.append(name)
    return copied


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m util.import_apollo_moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="the Apollo-MoE checkpoint folder (config.json + safetensors)")
    parser.add_argument("--out", help="write our Post-MoE checkpoint here")
    parser.add_argument("--export-stock", metavar="DIR", help="write a stock transformers Qwen2MoeForCausalLM here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output folders' files")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.out and not args.export_stock:
        parser.error("give --out, --export-stock or both")
    from src.common.outputs import check_out, staged_folder

    src = Path(args.src)
    targets = [Path(t) for t in (args.out, args.export_stock) if t]
    for flag, target in (("--out", args.out), ("--export-stock", args.export_stock)):
        if target:
            check_out(target, [src] + [t for t in targets if t != Path(target)], overwrite=args.overwrite, flag=flag)

    config = read_config(src)
    model, settings, notes = build_model(config, src)
    for note in notes:
        print(f"[import] note: {note}")
    if args.out:
        with staged_folder(args.out) as tmp:  # whole or not at all
            moe.save_moe(model, None, tmp)
            copy_data_files(src, tmp)
    if args.export_stock:
        with staged_folder(args.export_stock) as tmp:
            moe_export.export_qwen2_moe(model, tmp)
            copy_data_files(src, tmp)
    skipped = sorted(p.name for p in src.iterdir()
                     if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", *DATA_FILES))
    print(f"[import] read {src}/config.json and {len(weight_files(src))} safetensors file(s): {settings.num_experts} "
          f"experts, top-{settings.top_k}, MoE layers {list(settings.moe_layers)}, shared expert "
          f"{settings.shared_expert}, norm_topk_prob {settings.norm_topk_prob}, training rule {settings.routing}")
    print(f"[import] wrote {', '.join(str(t) for t in targets)}; not read: {', '.join(skipped) or 'nothing'} "
          "(code and other files are never opened)")
    return 0


if __name__ == "__main__":
    import sys

    from src.common import cli

    sys.exit(cli.run(main))
