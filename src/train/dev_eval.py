"""Dev evaluation during training: step 4's engine and scorer on step 1's dev prompts, sharded over the ranks."""
from __future__ import annotations

import math
from pathlib import Path

from src.train.config import TrainConfig
from src.train.runtime import moe_module, no_zero3_init


def load_dev(path, limit: int | None) -> list[dict]:
    """Step 1's dev records, read and checked as step 4 reads them (a dev.jsonl that step 1 left half rewritten,
    another run's, or one with a bad record is refused with one line), ``limit`` of them evenly spread."""
    from src.evaluate.records import load_records

    records = load_records(Path(path))
    if limit is not None and 0 < limit < len(records):
        # Evenly spread, so that a small limit still covers every language of the (language-grouped) dev set.
        records = [records[(i * len(records)) // limit] for i in range(limit)]
    return records


def evaluate_dev(accelerator, model, tokenizer, records, predict, score, config: TrainConfig, save_dir: Path) -> dict:
    """Each rank predicts a disjoint, equally long shard (so ZeRO-3's collective forwards stay in step; transformers
    syncs generation across ranks under ZeRO-3 by itself); rank 0 gathers, scores and returns flat metrics."""
    import torch
    from accelerate.utils import gather_object

    from src.common.io import write_json, write_jsonl

    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(records)
    per = math.ceil(n / world)
    padded = records + [records[-1]] * (per * world - n)
    shard = padded[rank * per:(rank + 1) * per]
    kwargs = dict(batch_size=config.dev_batch_size, max_new_tokens=config.dev_max_new_tokens, mode=config.dev_mode,
                  progress=accelerator.is_main_process)
    was_training = model.training
    model.eval()
    model.config.use_cache = True
    try:
        with torch.no_grad():
            preds = predict(model, tokenizer, shard, **kwargs)
    finally:
        model.config.use_cache = False
        model.train(was_training)
    gathered = gather_object([list(preds)])
    if not accelerator.is_main_process:
        return {}
    predictions = [p for part in gathered for p in part][:n]
    result = score(predictions)
    write_jsonl(save_dir / "predictions.jsonl", predictions)
    write_json(save_dir / "score.json", result)
    return dev_metrics(result)


def dev_metrics(result: dict) -> dict:
    """Step 4's score as ``dev/...`` scalars: overall, major/minor averages and accuracy per language."""
    out = {}
    if isinstance(result.get("accuracy_items"), (int, float)):
        out["dev/accuracy"] = float(result["accuracy_items"])
    for avg in ("major_average", "minor_average"):
        if isinstance(result.get(avg), dict) and isinstance(result[avg].get("accuracy"), (int, float)):
            out[f"dev/{avg}/accuracy"] = float(result[avg]["accuracy"])
    for lang, entry in (result.get("languages") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("accuracy"), (int, float)):
            out[f"dev/language/{lang}/accuracy"] = float(entry["accuracy"])
    return out


def format_dev(res: dict) -> str:
    parts = [f"accuracy {res.get('dev/accuracy', float('nan')):.3f}"]
    for avg in ("major", "minor"):
        if f"dev/{avg}_average/accuracy" in res:
            parts.append(f"{avg} {res[f'dev/{avg}_average/accuracy']:.3f}")
    langs = " ".join(f"{k.split('/')[2]} {v:.2f}" for k, v in res.items() if k.startswith("dev/language/"))
    return ", ".join(parts) + (f" | {langs}" if langs else "")


def materialize_copy(accelerator, plugin, model, tokenizer, tmp_dir: Path, *, is_moe: bool, dtype, writer: bool):
    """A plain (unpartitioned) copy of a ZeRO-3 model on every rank, through a temporary HF folder."""
    import deepspeed

    from src.models.loading import load_model
    from src.train import lora

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        if writer:
            if lora.is_lora(model):  # the adapter only: loading it applies it to --model again, merged
                lora.save_adapter_files(model, None, tmp_dir)
            elif is_moe:
                moe_module().save_moe(model, None, tmp_dir)
            else:
                model.save_pretrained(tmp_dir, safe_serialization=True)
    accelerator.wait_for_everyone()
    with no_zero3_init(plugin):
        copy_ = load_model(tmp_dir, torch_dtype=dtype, device=accelerator.device)
    copy_.eval()
    return copy_
