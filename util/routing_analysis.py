"""Which experts each language's tokens are routed to, per MoE layer: the paper's routing heat maps.

    python -m util.routing_analysis --model ckpts/<exp>/checkpoint-N --input data/<exp>/test.jsonl --out results/routing

Reads a processed test set (jsonl; each line needs "prompt" and "language"), runs the prompts through an MoE
checkpoint in eval mode (learned router only, nothing forced), batched with left padding; padding is not counted.
Writes routing.png (one panel per language: MoE layers x experts, each cell the share of the layer's selections) and
routing.json (the same ratios plus token counts). Fixes the reference tool (docs/moe.md): any batch size,
padding excluded, every layer read from the checkpoint's own config.
"""
from __future__ import annotations

import argparse
import sys
import json
import math
from pathlib import Path

import torch

from src.common import languages as registry
from src.common.errors import DataError
from src.common.io import iter_jsonl
from src.models import moe
from src.models.loading import load_model, load_tokenizer


def read_prompts(path: Path, limit: int | None) -> dict[str, list[str]]:
    """language -> prompts in file order (at most `limit` per language)."""
    prompts: dict[str, list[str]] = {}
    for n, item in enumerate(iter_jsonl(path)):
        for field in ("prompt", "language"):
            if not isinstance(item.get(field), str):
                raise DataError(path, n, field, "missing, or not a string")
        bucket = prompts.setdefault(item["language"], [])
        if limit is None or len(bucket) < limit:
            bucket.append(item["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no items")
    return prompts


def language_order(languages: list[str]) -> list[str]:
    """The paper's major-language order first, then the others alphabetically."""
    majors = [code for code in registry.major_languages() if code in languages]
    return majors + sorted(set(languages) - set(majors))


@torch.no_grad()
def count_routing(model, tokenizer, prompts: dict[str, list[str]], languages: list[str], batch_size: int,
                  max_length: int) -> tuple[moe.RoutingStats, dict[str, int], int]:
    """Run every prompt through the model; returns the stats (language key = index in `languages`), tokens per
    language and how many prompts were cut to their last max_length tokens."""
    device = next(model.parameters()).device
    encoded, truncated = [], 0
    for index, language in enumerate(languages):
        for prompt in prompts[language]:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # step-1 prompts are fully formatted
            truncated += len(ids) > max_length
            encoded.append((index, ids[-max_length:]))  # keep the end: the question and the answer cue
    encoded.sort(key=lambda e: len(e[1]))  # similar lengths per batch: little padding
    tokens = {language: 0 for language in languages}
    with moe.RoutingStats(model) as stats:
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start:start + batch_size]
            width = max(len(ids) for _, ids in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            language_ids = torch.full((len(batch), width), -1, dtype=torch.long)  # -1: padding, not counted
            for row, (index, ids) in enumerate(batch):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                language_ids[row, width - len(ids):] = index
                tokens[languages[index]] += len(ids)
            # In eval mode language ids only label tokens for the statistics; the router alone decides.
            model(input_ids=input_ids.to(device), attention_mask=(language_ids >= 0).long().to(device),
                  language_ids=language_ids.to(device), use_cache=False, logits_to_keep=1)
    return stats, tokens, truncated


def plot(ratios: dict[str, list[list[float]]], tokens: dict[str, int], layers: list[int], experts: list[str],
         out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ratios)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(cols * (0.55 * len(experts) + 1.2), rows * (0.45 * len(layers) + 2.2)))
    vmax = max(max(max(r) for r in grid) for grid in ratios.values()) or 1.0
    image = None
    for ax, name in zip(axes.flat, names):
        image = ax.imshow(ratios[name], vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto")
        full_name = registry.languages().get(name, {}).get("name")
        ax.set_title(f"{name}{f' ({full_name})' if full_name else ''}: {tokens[name]} tokens", fontsize=9)
        ax.set_xticks(range(len(experts)), experts, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers], fontsize=7)
        for y, row in enumerate(ratios[name]):
            for x, value in enumerate(row):
                ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if value > 0.6 * vmax else "white")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="share of the layer's expert selections")
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m util.routing_analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="MoE checkpoint folder (written by save_moe or the trainer)")
    parser.add_argument("--input", required=True, type=Path, help="processed test/dev jsonl (prompt, language)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for routing.png and routing.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="at most this many items per language")
    parser.add_argument("--max-length", type=int, default=2048, help="longer prompts keep their last tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if not moe.is_moe_checkpoint(args.model):
        parser.error(f"{args.model} is not an MoE checkpoint (its config.json has no '{moe.MOE_CONFIG_KEY}' field)")
    model = load_model(args.model, device=args.device)
    tokenizer = load_tokenizer(args.model)
    settings = moe.moe_settings(model)
    prompts = read_prompts(args.input, args.limit)
    languages = language_order(list(prompts))
    stats, tokens, truncated = count_routing(model, tokenizer, prompts, languages, args.batch_size, args.max_length)

    family_names = registry.families()
    experts = ([family_names[e] for e in range(settings.num_experts)] if len(family_names) == settings.num_experts
               else [f"expert {e}" for e in range(settings.num_experts)])
    layers = list(settings.moe_layers)
    ratios = stats.ratios()
    per_language = {language: [ratios[layer].get(index, [0.0] * settings.num_experts) for layer in layers]
                    for index, language in enumerate(languages)}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(per_language, tokens, layers, experts, args.out / "routing.png",
         f"{Path(args.model).name}: expert selections per language (top-{settings.top_k})")
    report = {"model": str(args.model), "input": str(args.input), "moe_layers": layers, "experts": experts,
              "top_k": settings.top_k, "truncated_prompts": truncated, "languages": {
                  language: {"items": len(prompts[language]), "tokens": tokens[language],
                             "ratios": {str(layer): row for layer, row in zip(layers, per_language[language])}}
                  for language in languages}}
    (args.out / "routing.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"[routing] {sum(tokens.values())} tokens from {sum(map(len, prompts.values()))} prompts in "
          f"{len(languages)} languages ({truncated} truncated) -> {args.out / 'routing.png'}, routing.json")
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
