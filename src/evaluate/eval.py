"""Step 4: score a model on step 1's k-shot prompts (XMedBench).

    4.eval.sh --model M --input test.jsonl --out DIR [--limit N] [--batch-size B] [--max-new-tokens 128]
              [--mode generate|loglik] [--format NAME]

Writes DIR/predictions.jsonl (one line per item: id, source, language, raw generation, extracted letter, the rule that
fired, gold letter, correct, ...), DIR/score.json (per source, per language, major/minor averages with 95% intervals),
DIR/score.md (the same as tables) and DIR/run.json (settings, timing, engine counters), and prints the table.

Resume: predictions are appended as they are made; a rerun with the same settings skips the ids already in DIR.
Multi-GPU: ``accelerate launch -m src.evaluate.eval ...``: every process scores its own share of the items (each item
exactly once), rank 0 merges and scores. With no arguments: SmolLM2-135M-Instruct on the embedded sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ..common.errors import DataError
from ..common.io import dumps, iter_jsonl, write_json, write_jsonl, write_text

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct"
DEFAULT_INPUT = "data/sample_SmolLM2-135M-Instruct/test.jsonl"
DEFAULT_OUT = "results/sample_SmolLM2-135M-Instruct"
PRED = "predictions.jsonl"
PARTS = "parts"
REQUIRED = ("id", "source", "prompt", "answer", "letters")
# Settings that change what a prediction is: a resumed run must use the same ones.
RESUME_KEYS = ("model", "mode", "max_new_tokens", "min_new_tokens", "format", "dtype", "proxy_tuned", "proxy_raw",
               "backend")


def load_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input not found (make it with 1.data_process_test_dev.sh)")
    records, seen = [], set()
    for n, rec in enumerate(iter_jsonl(path), 1):
        for f in REQUIRED:
            if f not in rec or rec[f] in (None, "", []):
                raise DataError(path, n, f, "missing (is this a step 1 test.jsonl/dev.jsonl?)")
        if rec["id"] in seen:
            raise DataError(path, n, "id", f"duplicate id {rec['id']!r}")
        if rec["answer"] not in rec["letters"]:
            raise DataError(path, n, "answer", f"{rec['answer']!r} is not one of the letters {rec['letters']}")
        seen.add(rec["id"])
        records.append(rec)
    return records


def read_predictions(path: Path) -> list[dict]:
    """Predictions appended so far. A last line cut short by a crash is dropped (it is redone); any other broken
    line is an error naming the file and line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if all(not rest.strip() for rest in lines[n:]):
                print(f"[step 4] {path}: dropping an incomplete last line (an interrupted write); it is redone",
                      file=sys.stderr)
                break
            raise DataError(path, f"line {n}", None, f"invalid JSON: {e.msg}") from None
    return out


def shard(records: list[dict], world: int, rank: int) -> list[dict]:
    """This process's share: items ordered by source (so shared-shot groups stay together) and length, then cut into
    ``world`` contiguous pieces of about equal prompt tokens. Every item lands in exactly one piece."""
    if world <= 1:
        return records
    order = sorted(records, key=lambda r: (r["source"], tuple(r.get("shots") or ()), r.get("prompt_tokens") or 0))
    weights = [max(1, r.get("prompt_tokens") or len(r["prompt"]) // 4) for r in order]
    total, acc, cuts = sum(weights), 0, [0]
    for i, w in enumerate(weights):
        acc += w
        if len(cuts) < world and acc >= total * len(cuts) / world:
            cuts.append(i + 1)
    while len(cuts) < world:
        cuts.append(len(order))
    cuts.append(len(order))
    return order[cuts[rank]:cuts[rank + 1]]


def _dtype(name: str, device):
    import torch

    from ..models.loading import default_dtype

    if name == "auto":
        return default_dtype(device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _check_resume(out: Path, settings: dict, overwrite: bool) -> None:
    run_file = out / "run.json"
    has_preds = (out / PRED).is_file() or (out / PARTS).is_dir()
    if overwrite:
        (out / PRED).unlink(missing_ok=True)
        if (out / PARTS).is_dir():
            for f in (out / PARTS).iterdir():
                f.unlink()
        return
    if not has_preds or not run_file.is_file():
        return
    old = json.loads(run_file.read_text(encoding="utf-8")).get("settings", {})
    diff = [k for k in RESUME_KEYS if k in old and old[k] != settings[k]]
    if diff:
        detail = ", ".join(f"{k}: {old[k]!r} -> {settings[k]!r}" for k in diff)
        raise SystemExit(f"[step 4] {out} holds predictions made with other settings ({detail}); "
                         f"use another --out or --overwrite")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="4.eval.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder, hub id or our MoE checkpoint")
    p.add_argument("--input", type=Path, default=Path(DEFAULT_INPUT), help="step 1 test.jsonl or dev.jsonl")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help="result folder")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of the input")
    p.add_argument("--limit-per-source", type=int, default=None, help="only the first N items of every source")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows decoded together (default: 16 on CPU, 64 on GPU; halves itself on out-of-memory)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: %(default)s (paper)")
    p.add_argument("--min-new-tokens", type=int, default=2, help="default: %(default)s (reference)")
    p.add_argument("--mode", choices=["generate", "loglik"], default="generate",
                   help="generate: greedy decoding + answer extraction (paper); loglik: most likely option letter")
    p.add_argument("--format", default=None,
                   help="chat format whose end token stops generation (default: from the model, as step 1)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--max-padding", type=float, default=0.1,
                   help="largest share of padding in a batch; longer/shorter items go to other batches (%(default)s)")
    p.add_argument("--prefix-cache", choices=["auto", "off"], default="auto",
                   help="auto: compute a prompt prefix shared by items of a source (system block, instruction, "
                        "shots in common) once")
    p.add_argument("--prefill-batch", type=int, default=None,
                   help="prompts prefilled together (default: 1 on CPU, the batch size on GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a CPU shared with other jobs)")
    p.add_argument("--proxy-tuned", default=None,
                   help="proxy-tuning: a small tuned model; --model is decoded with base + (tuned - raw) logits")
    p.add_argument("--proxy-raw", default=None, help="proxy-tuning: the small model before tuning")
    p.add_argument("--backend", choices=["inprocess", "openai"], default="inprocess",
                   help="inprocess: our engine; openai: an OpenAI-compatible server at --api-base (scripts/serve.sh)")
    p.add_argument("--api-base", default=None, help="server URL for --backend openai, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", default=None, help="model name on the server (default: the one it lists)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (--backend openai; %(default)s)")
    p.add_argument("--api-timeout", type=float, default=300.0, help="seconds per request (%(default)s)")
    p.add_argument("--overwrite", action="store_true", help="discard predictions already in --out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if bool(args.proxy_tuned) != bool(args.proxy_raw):
        p.error("--proxy-tuned and --proxy-raw go together")
    if args.backend == "openai" and (not args.api_base or args.proxy_tuned or args.concurrency < 1):
        p.error("--backend openai needs --api-base URL and --concurrency >= 1, and takes no proxy models")

    import torch
    from accelerate import PartialState

    from ..common.chat_formats import resolve_format
    from ..models.loading import load_model, load_tokenizer
    from .engine import predict, stop_token_ids
    from .scoring import format_table, score

    if args.threads:
        torch.set_num_threads(args.threads)
    kwargs = {}
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["backend"] = "gloo"  # several CPU processes (tests, CI): accelerate needs gloo named explicitly
    state = PartialState(**kwargs)
    world, rank, main_proc = state.num_processes, state.process_index, state.is_main_process
    device = state.device
    t_start = time.time()

    records = load_records(args.input)
    if args.limit_per_source:
        seen_per_source: dict = {}
        kept = []
        for r in records:
            seen_per_source[r["source"]] = seen_per_source.get(r["source"], 0) + 1
            if seen_per_source[r["source"]] <= args.limit_per_source:
                kept.append(r)
        records = kept
    if args.limit is not None:
        records = records[:args.limit]
    model_path = args.model
    if not Path(model_path).exists() and model_path.startswith(("models/", "ckpts/", "./", "../", "/")):
        raise SystemExit(f"[step 4] model folder {model_path!r} not found (run 0.download_data.sh, or step 3)")

    dtype = _dtype(args.dtype, device)
    tokenizer = load_tokenizer(model_path, padding_side="left")
    settings = {"model": str(args.model), "input": str(args.input), "mode": args.mode,
                "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
                "format": args.format, "dtype": str(dtype).replace("torch.", ""),
                "max_padding": args.max_padding, "prefix_cache": args.prefix_cache,
                "proxy_tuned": args.proxy_tuned, "proxy_raw": args.proxy_raw, "backend": args.backend}
    if args.backend == "openai":
        settings.update(api_base=args.api_base, api_model=args.api_model, concurrency=args.concurrency)
    out = args.out
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        _check_resume(out, settings, args.overwrite)
        if args.overwrite or not (out / "run.json").is_file():  # so an interrupted run is resumed with its settings
            write_json(out / "run.json", {"settings": settings, "status": "running"})
    state.wait_for_everyone()

    done = {p["id"] for p in read_predictions(out / PRED)}
    if (out / PARTS).is_dir():
        for f in sorted((out / PARTS).glob("*.jsonl")):
            done |= {p["id"] for p in read_predictions(f)}
    pending = [r for r in records if r["id"] not in done]
    mine = shard(pending, world, rank)
    state.wait_for_everyone()  # every process has read the same done ids before any of them appends new ones

    batch_size = args.batch_size or (64 if device.type == "cuda" else 16)
    stats: dict = {}
    fmt_name = None
    if mine and args.backend == "openai":  # generation on a server; same records, predictions and files
        from .openai_backend import predict_through_server

        if world > 1:
            raise SystemExit("[step 4] --backend openai runs in one process (use --concurrency for parallel requests)")
        fmt_name = predict_through_server(args, tokenizer, mine, out / PRED, stats, progress=not args.no_progress)
    elif mine:
        if args.proxy_tuned:
            from ..models.proxy_tuning import load_proxy_tuned

            model, _ = load_proxy_tuned(model_path, args.proxy_tuned, args.proxy_raw, torch_dtype=dtype,
                                        device=device)
        else:
            model = load_model(model_path, torch_dtype=dtype, device=device)
        fmt = resolve_format(tokenizer, getattr(model, "config", None), args.format)
        fmt_name = fmt.name
        stops = stop_token_ids(tokenizer, fmt, model)
        if main_proc:
            print(f"[step 4] {args.model}: {len(records)} items, {len(records) - len(pending)} already done, "
                  f"{len(pending)} to go on {world} process(es); mode={args.mode} format={fmt.name} "
                  f"stop ids={stops} dtype={settings['dtype']} device={device}", flush=True)
        target = out / PRED if world == 1 else out / PARTS / f"predictions.rank{rank}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(target)
        with target.open("a", encoding="utf-8") as fh:
            def append(pred: dict):
                fh.write(dumps(pred) + "\n")
                fh.flush()

            predict(model, tokenizer, mine, fmt=fmt, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                    min_new_tokens=args.min_new_tokens, mode=args.mode, progress=not args.no_progress and main_proc,
                    max_padding=args.max_padding, prefix_cache=args.prefix_cache, callback=append, stats=stats,
                    prefill_batch=args.prefill_batch)
        del model
    elif main_proc:
        print(f"[step 4] all {len(records)} items already predicted in {out}", flush=True)

    all_stats = [stats]
    if world > 1:
        import torch.distributed as dist

        all_stats = [None] * world
        dist.all_gather_object(all_stats, stats)
    state.wait_for_everyone()
    if not main_proc:
        return 0

    # Merge: predictions.jsonl in input order, parts folded in, predictions of other items kept at the end.
    preds = read_predictions(out / PRED)
    if (out / PARTS).is_dir():
        for f in sorted((out / PARTS).glob("*.jsonl")):
            preds += read_predictions(f)
    by_id: dict = {}
    for pr in preds:
        by_id.setdefault(pr["id"], pr)
    order = {r["id"]: k for k, r in enumerate(records)}
    merged = sorted(by_id.values(), key=lambda pr: (order.get(pr["id"], len(order)), pr["id"] in order))
    write_jsonl(out / PRED, merged)
    if (out / PARTS).is_dir():
        for f in (out / PARTS).glob("*.jsonl"):
            f.unlink()
        (out / PARTS).rmdir()
    selected = [by_id[r["id"]] for r in records if r["id"] in by_id]
    missing = len(records) - len(selected)
    if missing:
        raise SystemExit(f"[step 4] {missing} items have no prediction (a process failed?); rerun to resume")

    result = score(selected)
    write_json(out / "score.json", result)
    header = (f"# Step 4 scores: {args.model}\n\ninput: `{args.input}`, {len(selected)} items, mode {args.mode}, "
              f"max_new_tokens {args.max_new_tokens}. Accuracy in %, 95% intervals ({result['ci_method']}).\n\n")
    table = format_table(result)
    write_text(out / "score.md", header + table)

    seconds = time.time() - t_start
    new_items = sum(s.get("items", 0) for s in all_stats)
    totals: dict = {}
    for s in all_stats:
        for k, v in s.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
    stops = {}
    for s in all_stats:
        for k, v in (s.get("stops") or {}).items():
            stops[k] = stops.get(k, 0) + v
    totals["stops"] = stops
    engine_seconds = max([s.get("seconds", 0.0) for s in all_stats] or [0.0])
    write_json(out / "run.json", {
        "settings": {**settings, "format": args.format, "resolved_format": fmt_name, "batch_size": batch_size},
        "status": "done", "processes": world, "device": str(device), "torch": torch.__version__,
        "items": len(records), "predicted_now": new_items, "resumed": len(records) - len(pending),
        "wall_seconds": round(seconds, 2), "engine_seconds": round(engine_seconds, 2),
        "items_per_second": round(new_items / engine_seconds, 4) if engine_seconds else None,
        "engine": totals,
    })
    print(table, end="")
    print(f"[step 4] {len(selected)} items scored -> {out}/score.json, score.md, predictions.jsonl"
          + (f" ({new_items} predicted now, {new_items / engine_seconds:.2f} items/s)" if engine_seconds else ""))
    return 0


def _repair_tail(path: Path) -> None:
    """Cut an incomplete last line (a crash mid-write) so appended predictions start on a fresh line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    path.write_bytes(data[:cut])


if __name__ == "__main__":
    sys.exit(main())
