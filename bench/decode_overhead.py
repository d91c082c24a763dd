"""Step 4's host overhead per decoding step, measured without a GPU: aten ops, host synchronisations and milliseconds
per forward call of our engine against HF ``generate``, on a model so small that compute is negligible.

    python bench/decode_overhead.py [--items 16] [--batch-size 16] [--layers 2] [--hidden 64] [--steps 8 24]
                                    [--data assets/sample] [--device cpu|cuda] [--post-moe] [--jsonl FILE]

The model is a random Llama with ``--layers`` layers and SmolLM2's tokenizer (``--tokenizer``), so what is timed is
what a scorer adds around the model: Python per row and step, cache bookkeeping, tensor ops outside the model and
host synchronisations (each one stalls a GPU's queue; ``src/common/host_sync.py`` says what counts). The prompts are
``--items`` real 3-shot prompts built by step 1's code from ``--data`` (default: the embedded sample).

Both methods decode exactly N new tokens per row (``min_new_tokens = max_new_tokens = N``: stop tokens are
suppressed, no early stop), once with N = ``--steps[0]`` and once with ``--steps[1]``; the difference of the two runs
divided by the difference of their decoding steps is the cost of one decoding step of the whole batch (prefill and
start-up cancel out). Printed as one JSON line per method as soon as it is measured, then the ratios ours / HF:

* ``ops_per_step``, ``syncs_per_step`` (and ``syncs_by_kind``): counted under ``HostSyncCounter``;
* ``ms_per_step``: wall time per decoding step (best of ``--repeats`` runs, counters off);
* ``ms_per_forward``: wall time of the longer run divided by its forward calls (prefill calls included).

On CUDA (``--device cuda``) ``torch.cuda.set_sync_debug_mode`` also reports the device's own count.
``--post-moe`` measures the same on the random model upcycled with the paper's settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.common.defaults import DEFAULT_MODEL  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(DEFAULT_MODEL))
    p.add_argument("--data", type=Path, default=ROOT / "assets" / "sample", help="bench_test.json/bench_dev.json")
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--max-prompt-tokens", type=int, default=600)
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, nargs=2, default=(8, 24), metavar=("N1", "N2"))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (the best counts)")
    p.add_argument("--methods", nargs="+", default=["custom", "hf"], choices=["custom", "hf"])
    p.add_argument("--post-moe", action="store_true",
                   help="upcycle the random model first (7 experts, top-2, the last 2 layers: the paper's settings)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jsonl", type=Path, default=None, help="also append each JSON line here")
    return p


def tiny_random_llama(tokenizer, layers: int, hidden: int, device):
    """A random Llama with the tokenizer's vocabulary: compute per token is negligible next to the host work."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device).eval()


def decode_run(method: str, model, tokenizer, records, new_tokens: int, batch_size: int) -> dict:
    """One scoring run decoding exactly ``new_tokens`` per row; returns its forward calls and decoding steps."""
    from src.evaluate.predict import predict

    stats: dict = {}
    common = dict(batch_size=batch_size, max_new_tokens=new_tokens, min_new_tokens=new_tokens, progress=False,
                  stats=stats, early_stop=False)
    if method == "custom":
        predict(model, tokenizer, records, **common)
        return {"forward_calls": stats["forward_calls"], "decode_steps": stats["decode_steps"]}
    predict(model, tokenizer, records, engine="hf", **common)
    return {"forward_calls": stats["batches"] * new_tokens, "decode_steps": stats["batches"] * (new_tokens - 1)}


def _sync_device(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(method: str, model, tokenizer, records, steps=(8, 24), batch_size: int = 16, repeats: int = 3) -> dict:
    """Per-decoding-step ops, syncs and milliseconds of one method (see the module docstring)."""
    from src.common.host_sync import HostSyncCounter

    runs = {}
    for n in steps:
        decode_run(method, model, tokenizer, records, n, batch_size)  # warm-up (allocator, lazy init)
        best = float("inf")
        for _ in range(repeats):
            _sync_device(model.device)
            t0 = time.perf_counter()
            shape = decode_run(method, model, tokenizer, records, n, batch_size)
            _sync_device(model.device)
            best = min(best, time.perf_counter() - t0)
        with HostSyncCounter(cuda_debug=True) as counter:
            decode_run(method, model, tokenizer, records, n, batch_size)
        runs[n] = {**shape, "seconds": best, "count": counter}
    a, b = runs[steps[0]], runs[steps[1]]
    d_steps = b["decode_steps"] - a["decode_steps"]
    kinds = sorted(set(a["count"].by_kind) | set(b["count"].by_kind))
    out = {
        "method": method, "items": len(records), "batch_size": batch_size, "decode_steps": d_steps,
        "ops_per_step": round((b["count"].ops - a["count"].ops) / d_steps, 1),
        "syncs_per_step": round((b["count"].syncs - a["count"].syncs) / d_steps, 2),
        "syncs_by_kind": {k: round((b["count"].by_kind[k] - a["count"].by_kind[k]) / d_steps, 2) for k in kinds},
        "ms_per_step": round(1000 * (b["seconds"] - a["seconds"]) / d_steps, 3),
        "ms_per_forward": round(1000 * b["seconds"] / b["forward_calls"], 3),
        "forward_calls": b["forward_calls"],
    }
    if b["count"].cuda_debug:
        out["cuda_sync_warnings_per_step"] = round(
            (b["count"].cuda_sync_warnings - a["count"].cuda_sync_warnings) / d_steps, 2)
    return out


def emit(line: dict, jsonl: Path | None) -> None:
    text = json.dumps(line)
    print(text, flush=True)
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        with jsonl.open("a", encoding="utf-8") as fh:
            fh.write(text + "\n")


def sample_records(data: Path, tokenizer, n: int, max_prompt_tokens: int, shots: int = 3) -> list[dict]:
    from bench.eval_speed import build_items
    from src.common.chat_formats import resolve_format

    fmt = resolve_format(tokenizer, None)
    per_item, _ = build_items(data, tokenizer, fmt, n, max_prompt_tokens, seed=0, k=shots)
    if not per_item:
        raise ValueError(f"{data}: no {shots}-shot prompt of at most {max_prompt_tokens} tokens (raise "
                         "--max-prompt-tokens)")
    return per_item


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from src.models.loading import load_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer)
    model = tiny_random_llama(tokenizer, args.layers, args.hidden, args.device)
    if args.post_moe:
        from src.models import moe

        model = moe.upcycle(model, moe_layers=min(2, args.layers)).eval()
    records = sample_records(args.data, tokenizer, args.items, args.max_prompt_tokens, args.shots)
    results = {}
    for method in args.methods:
        results[method] = measure(method, model, tokenizer, records, tuple(args.steps), args.batch_size, args.repeats)
        emit({"bench": "decode_overhead", "device": args.device, "layers": args.layers,
              "kind": "post-moe" if args.post_moe else "dense", **results[method]}, args.jsonl)
    if "custom" in results and "hf" in results:
        ours, hf = results["custom"], results["hf"]
        emit({"bench": "decode_overhead", "ratio": "custom/hf", **{
            k: round(ours[k] / hf[k], 3) if hf[k] else None
            for k in ("ops_per_step", "syncs_per_step", "ms_per_step", "ms_per_forward")}}, args.jsonl)
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
