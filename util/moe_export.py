"""Export a Post-MoE checkpoint of this project to transformers' own Qwen2MoeForCausalLM, which stock tools
(AutoModelForCausalLM, vLLM, lm-eval) load without our code (docs/moe.md "Export to a stock class"; the conversion
itself is src/models/moe_export.py).

    python -m util.moe_export --model ckpts/<exp>_moe/checkpoint-3 --out models/<exp>-qwen2moe [--overwrite]

The copy is checked before it is written (the same logits as the source on a probe sequence) and read back after.
What Qwen2-MoE cannot represent exactly is refused with one line naming the setting, and nothing is written.
"""
from __future__ import annotations

import argparse
import sys

from src.common.errors import UsageError
from src.models import moe
from src.models.moe_export import PROBE_TOKENS, export_qwen2_moe, max_logit_difference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m util.moe_export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Post-MoE checkpoint folder of this project")
    parser.add_argument("--out", required=True, help="output folder for the stock Qwen2MoeForCausalLM copy")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder's files")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not moe.is_moe_checkpoint(args.model):
        parser.error(f"{args.model} is not a Post-MoE checkpoint of this project (its config.json has no "
                     f"'{moe.MOE_CONFIG_KEY}' field)")
    from src.common.outputs import check_out, staged_folder
    from src.models.loading import load_model, load_tokenizer

    out = check_out(args.out, [args.model], overwrite=args.overwrite)
    model = load_model(args.model, torch_dtype="auto")  # exported in the checkpoint's own dtype
    tokenizer = load_tokenizer(args.model)
    try:
        with staged_folder(out) as tmp:  # whole or not at all
            export_qwen2_moe(model, tmp, tokenizer)
    except ValueError as e:
        raise UsageError("--model", f"{args.model}: {e}") from None
    # Read back as another tool will see it: a stock folder, which the loader opens with transformers' own class.
    stock = load_model(out, torch_dtype=next(model.parameters()).dtype).eval()
    diff, _ = max_logit_difference(model, stock, model.config.vocab_size)
    settings = moe.moe_settings(model)
    print(f"[export] read {args.model} ({model.config.model_type}, {settings.num_experts} experts, top-"
          f"{settings.top_k}, MoE layers {list(settings.moe_layers)}) -> wrote {out} ({type(stock).__name__}); "
          f"max |logit difference| reloaded vs source on {PROBE_TOKENS} probe tokens: {diff:.3g}; skipped nothing")
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
