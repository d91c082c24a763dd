"""Upcycle a dense checkpoint into a Post-MoE one (docs/moe.md; ``scripts/upcycle_moe.sh`` runs this). The model
code is src/models/moe.py (``upcycle``, ``save_moe``) and src/models/moe_export.py.

    python -m util.upcycle_moe --model models/SmolLM2-135M-Instruct --out models/SmolLM2-135M-MoE
    python -m util.upcycle_moe --model models/Qwen2-0.5B --out models/Qwen2-0.5B-MoE --moe-layers 22,23 \\
        --export-qwen2-moe models/Qwen2-0.5B-MoE-hf
    python -m util.upcycle_moe --model models/Qwen2-0.5B --out models/Qwen2-0.5B-LS --moe-layers all \\
        --experts 12 --top-k 1 --routing hard --shared-expert          # the language-specific variant

Defaults are the paper's: 7 language-family experts, top-2, the last 2 layers. With renormalised top-k weights
(the default) the upcycled model must compute what the dense one did: the logits on a short text are compared and
nothing is saved if they differ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from src.common.errors import UsageError
from src.models import moe, moe_export, router
from src.models.loading import check_model_source, load_model, load_tokenizer

CHECK_TEXT = "The patient presented with fever and a persistent cough. Le patient a de la fièvre. 患者发烧。"
# Max abs logit difference allowed, relative to the logits' scale: fp32 is near exact; bf16/fp16 round the k weights.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
LOW_PRECISION_TOLERANCE = 5e-2
HARD_LANGUAGE_LOSS = 0.1  # default router language loss with --routing hard: of the order of an aux loss weight


def parse_layers(text: str) -> int | str | list[int]:
    """'2' -> the last 2 layers; '22,23' -> those layer indices; '22,' -> layer 22 alone; 'all' -> every layer."""
    if text == "all":
        return text
    try:
        return [int(t) for t in text.split(",") if t.strip()] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--moe-layers takes N, all, or a comma-separated list of indices, "
                                         f"got {text!r}") from None


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m util.upcycle_moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="dense checkpoint folder (local; this step is offline)")
    parser.add_argument("--out", required=True, help="output folder for the MoE checkpoint")
    parser.add_argument("--experts", type=int, default=7, help="experts per MoE layer (default 7: language families)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--moe-layers", type=parse_layers, default=2,
                        help="N (the last N layers, default 2), all, or comma-separated layer indices, e.g. "
                             "22,23 (one index: 22,)")
    parser.add_argument("--routing", choices=sorted(router.RULES), default="hybrid",
                        help="training rule for the language ids: hybrid (default: the language/family expert is "
                             "always among the k), hard (top-1 to the language expert, weight 1; needs --top-k 1), "
                             "learned (the router alone)")
    parser.add_argument("--router-language-loss-coef", type=float, default=None,
                        help="weight of the router's cross-entropy against the language expert (default 0; "
                             f"{HARD_LANGUAGE_LOSS} with --routing hard, which needs it to train the router)")
    parser.add_argument("--no-norm-topk", action="store_true",
                        help="reference routing: raw softmax probabilities of the k experts (not function-preserving)")
    parser.add_argument("--shared-expert", action="store_true",
                        help="add a sigmoid-gated shared expert (a copy of the MLP with a zeroed output projection)")
    parser.add_argument("--aux-loss-coef", type=float, default=0.0,
                        help="load-balancing loss coefficient stored in the config (default 0, as in the paper)")
    parser.add_argument("--router-init-std", type=float, default=None,
                        help="router weights ~ N(0, std); default the config's initializer_range")
    parser.add_argument("--seed", type=int, default=42, help="seed of the router initialisation")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="dtype to upcycle and save in (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an --out (or export folder) that holds files")
    parser.add_argument("--export-qwen2-moe", "--export-stock", metavar="DIR", dest="export_qwen2_moe",
                        help="also write a stock transformers Qwen2MoeForCausalLM copy (Qwen2- and Llama-based "
                             "models; refused, naming the setting, when it cannot be exact)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    source = Path(args.model)
    if not (source / "config.json").is_file():
        parser.error(f"{source} is not a local model folder (run 0.download_data.sh to fetch or convert models)")
    if moe.is_moe_checkpoint(source):
        parser.error(f"{source} is already an MoE checkpoint")
    language_loss = args.router_language_loss_coef
    if language_loss is None:
        language_loss = HARD_LANGUAGE_LOSS if args.routing == "hard" else 0.0
    try:
        router.check_settings(args.routing, args.top_k, not args.no_norm_topk, language_loss)
    except ValueError as e:
        parser.error(str(e))
    from src.common.outputs import check_out

    check_model_source(source, weights=True)  # whole safetensors weights only: never unpickle a pytorch_model.bin
    check_out(args.out, [source], overwrite=args.overwrite)
    if args.export_qwen2_moe:
        check_out(args.export_qwen2_moe, [source, args.out], overwrite=args.overwrite, flag="--export-qwen2-moe")
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(source)
    model = load_model(source, torch_dtype=args.dtype).eval()  # "auto": the checkpoint's own dtype
    input_ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids
    if input_ids.numel() == 0:
        parser.error(f"the tokenizer in {source} turns the check text into no tokens")
    dense_params = sum(p.numel() for p in model.parameters())
    after = upcycle_checked(model, input_ids, args, language_loss)
    save(model, tokenizer, source, Path(args.out), dense_params)
    if args.export_qwen2_moe:
        export(model, tokenizer, input_ids, after, Path(args.out), Path(args.export_qwen2_moe))
    return 0


def upcycle_checked(model, input_ids: torch.Tensor, args, language_loss: float) -> torch.Tensor:
    """Upcycle ``model`` in place; with renormalised top-k weights it must give the dense model's logits (else a
    RuntimeError, nothing saved). Returns the upcycled model's logits on the check text."""
    before = logits(model, input_ids)
    moe.upcycle(model, num_experts=args.experts, top_k=args.top_k, moe_layers=args.moe_layers,
                norm_topk_prob=not args.no_norm_topk, shared_expert=args.shared_expert,
                router_aux_loss_coef=args.aux_loss_coef, router_init_std=args.router_init_std,
                routing=args.routing, router_language_loss_coef=language_loss)
    after = logits(model, input_ids)
    diff = (after - before).abs().max().item()
    dtype = next(model.parameters()).dtype
    tolerance = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE) * max(1.0, before.abs().max().item())
    print(f"[upcycle] max |logit difference| dense vs MoE on {input_ids.shape[1]} tokens: {diff:.3g} ({dtype})")
    norm_topk_prob = moe.moe_settings(model).norm_topk_prob
    if norm_topk_prob and diff > tolerance:
        raise RuntimeError(f"the upcycled model does not reproduce the dense one (max |logit difference| {diff:.3g}, "
                           f"tolerance {tolerance:.3g}); nothing saved")
    if not norm_topk_prob:
        print("[upcycle] raw top-k probabilities (--no-norm-topk): the output differs from the dense model by design")
    return after


def save(model, tokenizer, source: Path, out: Path, dense_params: int) -> None:
    from src.common.outputs import staged_folder

    with staged_folder(out) as tmp:  # whole or not at all
        moe.save_moe(model, tokenizer, tmp)
    settings = moe.moe_settings(model)
    moe_params = sum(p.numel() for p in model.parameters())
    print(f"[upcycle] {source} -> {out}: {settings.num_experts} experts, top-{settings.top_k}, MoE layers "
          f"{list(settings.moe_layers)}, norm_topk_prob={settings.norm_topk_prob}, "
          f"shared_expert={settings.shared_expert}, aux_loss_coef={settings.router_aux_loss_coef}, "
          f"routing={settings.routing}, router_language_loss_coef={settings.router_language_loss_coef}")
    print(f"[upcycle] parameters: dense {dense_params / 1e6:.1f}M -> MoE {moe_params / 1e6:.1f}M")


def export(model, tokenizer, input_ids: torch.Tensor, after: torch.Tensor, out: Path, exported_dir: Path) -> None:
    """The stock Qwen2MoeForCausalLM copy (--export-qwen2-moe), read back as another tool would."""
    from src.common.outputs import staged_folder

    try:
        with staged_folder(exported_dir) as tmp:
            moe_export.export_qwen2_moe(model, tmp, tokenizer)
    except ValueError as e:
        raise UsageError("--export-qwen2-moe", f"export refused: {e} (the MoE checkpoint {out} was written)") from None
    exported = load_model(exported_dir, torch_dtype=next(model.parameters()).dtype).eval()
    export_diff = (logits(exported, input_ids) - after).abs().max().item()
    print(f"[upcycle] exported {type(exported).__name__} -> {exported_dir}; max |logit difference| "
          f"vs our MoE: {export_diff:.3g}")


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
