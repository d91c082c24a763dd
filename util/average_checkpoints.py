"""Average the weights of several checkpoints of the same architecture (model soup / checkpoint averaging).

    python -m util.average_checkpoints --ckpt ckpts/run/checkpoint-200 --ckpt ckpts/run/checkpoint-300 \
        --out models/run-avg [--weights 0.3 0.7] [--overwrite]

The result is the element-wise (optionally weighted) mean, computed in float32 and stored in the first checkpoint's
dtype, saved as a loadable checkpoint: the first checkpoint's config, tokenizer and other small files are copied
beside the averaged ``model.safetensors``. Works for dense and Post-MoE checkpoints alike (both are safetensors
folders). Tensors are read one at a time, so memory stays near the size of one model.

Every input is checked first (whole safetensors files; a step 3 checkpoint's recorded digests). --out must lie apart
from the inputs and from any step 3 checkpoint (src/common/outputs.py); it is written into a temporary sibling and
renamed into place when complete, and an --out that holds files is replaced only with --overwrite.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


NOT_COPIED = {"model.safetensors.index.json", "trainer_state.json"}


def _tensor_files(ckpt: Path) -> dict[str, Path]:
    """name -> safetensors file holding it (single file or sharded)."""
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: no *.safetensors weights found")
    where = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                where[name] = f
    return where


def average(ckpts: list[Path], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    if len(ckpts) < 2:
        raise ValueError("give at least two checkpoints to average")
    weights = weights or [1.0] * len(ckpts)
    if len(weights) != len(ckpts):
        raise ValueError(f"{len(weights)} weights for {len(ckpts)} checkpoints")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be non-negative and not all zero")
    weights = [w / sum(weights) for w in weights]
    index = [_tensor_files(Path(c)) for c in ckpts]
    names = set(index[0])
    for ckpt, idx in zip(ckpts[1:], index[1:]):
        if set(idx) != names:
            diff = sorted(names ^ set(idx))[:5]
            raise ValueError(f"{ckpt} has different tensors than {ckpts[0]} (e.g. {diff}): not the same architecture")
    out: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        acc, dtype, shape = None, None, None
        for ckpt, idx, w in zip(ckpts, index, weights):
            with safe_open(idx[name], framework="pt") as st:
                t = st.get_tensor(name)
            if shape is None:
                dtype, shape = t.dtype, t.shape
                acc = torch.zeros(shape, dtype=torch.float32)
            elif t.shape != shape:
                raise ValueError(f"{ckpt}: tensor {name!r} has shape {tuple(t.shape)}, "
                                 f"but {ckpts[0]} has {tuple(shape)}")
            acc += w * t.float()
        out[name] = acc.to(dtype) if dtype.is_floating_point else acc.round().to(dtype)
    return out


def save_average(ckpts: list[Path], out_dir: Path, weights: list[float] | None = None, *,
                 overwrite: bool = False) -> Path:
    from src.common.outputs import check_out, staged_folder
    from src.models.loading import check_model_source

    for ckpt in ckpts:
        check_model_source(ckpt, weights=True, flag="--ckpt")
    check_out(out_dir, ckpts, overwrite=overwrite)
    tensors = average(ckpts, weights)
    with staged_folder(out_dir) as tmp:
        for f in Path(ckpts[0]).iterdir():  # config, tokenizer, generation config: everything but weights
            # not the weights, and not a training checkpoint's trainer_state.json: it describes another model
            if f.is_file() and not f.name.endswith(".safetensors") and f.name not in NOT_COPIED:
                shutil.copyfile(f, tmp / f.name)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m util.average_checkpoints", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, action="append", required=True, help="a checkpoint folder (repeat)")
    p.add_argument("--weights", type=float, nargs="+", default=None, help="one weight per checkpoint (normalised)")
    p.add_argument("--out", type=Path, required=True,
                   help="new folder for the averaged model, apart from the inputs and from checkpoints")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that already holds files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    save_average(args.ckpt, args.out, args.weights, overwrite=args.overwrite)
    print(f"[average] {len(args.ckpt)} checkpoints -> {args.out}")
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
