"""Step 4 speed: every scorer on the same model and the same real items, each method's figures printed the moment
it finishes.

    python bench/eval_speed.py [--model models/SmolLM2-135M-Instruct] [--data DIR | --sample]
                               [--methods floor custom cb hf-b64 reference-b4 fixed-floor fixed-custom]
                               [--items 48 | --budget-seconds S] [--max-prompt-tokens 1000] [--batch-size 16]
                               [--device cpu|cuda] [--post-moe] [--profile DIR] [--threads 1]
                               [--jsonl FILE] [--json FILE]
    python bench/eval_speed.py --backend openai (--api-base URL | --serve transformers|vllm) [same flags]

Items: real XMedBench test items from ``--data`` (a folder with step 1's inputs ``bench_test.json`` and
``bench_dev.json``; default the real bench beside the checkout) or ``--sample`` (the embedded 140 sample items),
drawn seeded and round-robin over the sources (so several languages), 3-shot prompts built by step 1's code with
shots from the dev file, at most ``--max-prompt-tokens`` tokens. Every method scores the same items, in file order.

Methods (``--methods``; default floor custom reference-b4 fixed-floor fixed-custom):

* ``floor``: one forward pass over every prompt, one prompt at a time, logits of the last position only: the prefill
  no scorer avoids on a CPU;
* ``custom``: step 4's engine (``src/generation/engine.py``), ``--batch-size``;
* ``cb``: transformers' continuous batching under the same rules (``src/generation/cb.py``), ``--cb-batch-size``;
* ``hf-b64``: HF ``generate``, batches of 64 sorted by length, 128 new tokens (``--engine hf``);
* ``reference-b4``: the reference-style loop: HF ``generate`` in file order, batch 4, left padding with a mask,
  greedy, 256 max new tokens, min 2, the same stop tokens and extractor;
* ``fixed-floor`` / ``fixed-custom``: the same items with ``--shot-mode fixed`` prompts: each source's shared
  prefix once plus every suffix, and the custom engine reusing the prefix's KV cache;
* ``server`` (added by ``--backend openai``): step 4's OpenAI backend against a server (``--api-base``) or one this
  script starts and stops (``--serve ENGINE``, start-up timed apart).

Each method prints one JSON line when it finishes (also appended to ``--jsonl``), so a run cut by a time limit still
reports what it measured: items, wall and CPU seconds, items/s, seconds per item, forward calls and ms per forward
call, new tokens, stops, the share of letters identical to the reference-style loop's, and ratios against the
methods measured before it (in this run, or in earlier lines of the same ``--jsonl`` for the same model, device and
kind): ``x_floor`` (time per item over the floor's), ``speedup_vs_reference_b4``, ``speedup_vs_hf_b64``. Each
method's letters go to ``FILE.letters.METHOD.json`` beside ``--jsonl``, for the comparison across runs.

``--budget-seconds S`` sizes each method to about S seconds: it first scores a probe of ``--probe-items`` items,
then as many items as the rest of the budget allows at the probe's pace (every method takes a prefix of the same
round-robin order, so methods sized differently still share their first items). ``--post-moe`` also measures
``custom`` and ``cb`` on the model upcycled by ``util/upcycle_moe.py``'s code (7 experts, top-2, the last 2
layers; ``cb`` on its stock ``Qwen2MoeForCausalLM`` export) right after the dense one, on the same items, and prints
the time per item against the dense model's (``moe_vs_dense``). ``--profile DIR`` runs ``custom`` under
``torch.profiler`` and prints the ops that took the most time (a trace for chrome://tracing goes to DIR).
``--device cuda`` runs in bf16 on the GPU.

Timing on a shared CPU: by default one torch thread (``--threads 1``; two threads on two busy cores wait for each
other). Wall and process CPU seconds are both reported.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.common.defaults import DEFAULT_MODEL  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("floor", "custom", "cb", "hf-b64", "reference-b4", "fixed-floor", "fixed-custom", "server")
DEFAULT_METHODS = ("floor", "custom", "reference-b4", "fixed-floor", "fixed-custom")
MOE_METHODS = ("custom", "cb")  # measured again on the upcycled model with --post-moe
REFERENCE = "reference-b4"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "xmedbench",
                   help="a folder with bench_test.json and bench_dev.json")
    p.add_argument("--sample", action="store_true", help="the embedded sample (assets/sample): all 140 items")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="default: " + " ".join(DEFAULT_METHODS))
    p.add_argument("--items", type=int, default=None, help="items per method (default 48; 140 with --sample)")
    p.add_argument("--budget-seconds", type=float, default=None, help="size each method to about this many seconds")
    p.add_argument("--probe-items", type=int, default=8, help="items of the probe round with --budget-seconds")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default 1000 (4096 with --sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="custom engine (default %(default)s, the CLI's on CPU)")
    p.add_argument("--cb-batch-size", type=int, default=None, help="cb: requests decoded together (default: "
                                                                   "--batch-size)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16")
    p.add_argument("--post-moe", action="store_true", help="also custom and cb on the upcycled model")
    p.add_argument("--profile", type=Path, default=None, help="profile the custom engine; trace to this folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--skip-reference", action="store_true", help="(older flags) leave a default method out")
    p.add_argument("--skip-fixed", action="store_true")
    p.add_argument("--skip-floor", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--backend", choices=["inprocess", "openai"], default="inprocess",
                   help="openai: also time step 4 through an OpenAI-compatible server (method server)")
    p.add_argument("--api-base", default=None, help="a running server (scripts/serve.sh)")
    p.add_argument("--api-model", default=None)
    p.add_argument("--serve", choices=["transformers", "vllm"], default=None,
                   help="start this engine on --model for the run (instead of --api-base) and stop it afterwards")
    p.add_argument("--port", type=int, default=8011, help="port for --serve (%(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight to the server (%(default)s)")
    p.add_argument("--jsonl", type=Path, default=None, help="append each method's JSON line here")
    p.add_argument("--json", type=Path, default=None, help="also write all figures here at the end")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.backend == "openai" and not (args.api_base or args.serve):
        p.error("--backend openai needs --api-base URL or --serve ENGINE")
    if args.sample:
        args.data = ROOT / "assets" / "sample"
    args.items = args.items or (140 if args.sample else 48)
    args.max_prompt_tokens = args.max_prompt_tokens or (4096 if args.sample else 1000)
    args.cb_batch_size = args.cb_batch_size or args.batch_size
    methods = list(args.methods or DEFAULT_METHODS)
    skipped = {"reference-b4": args.skip_reference, "fixed-floor": args.skip_fixed, "fixed-custom": args.skip_fixed,
               "floor": args.skip_floor, "custom": args.skip_ours}
    args.methods = [m for m in methods if not skipped.get(m)] + (["server"] if args.backend == "openai"
                                                                 and "server" not in methods else [])
    if args.budget_seconds is not None and args.budget_seconds <= 0:
        p.error("--budget-seconds must be > 0")
    return args


# ----------------------------------------------------------------------------------------------- items
def build_items(data: Path, tokenizer, fmt, n: int, max_tokens: int, seed: int, k: int = 3):
    """(per-item-shot records, fixed-shot records) for the same n items, in file order, drawn round-robin over the
    sources; both lists carry ``rank`` (the item's place in the round-robin order) so that ``first(n)`` takes the
    same items whatever n a method is sized to."""
    from src.prepare.bench_items import load_bench
    from src.prepare.prompts import PromptBuilder
    from src.prepare.bench_prompts import _by_source, build_split

    test, _ = load_bench(data / "bench_test.json")
    dev, _ = load_bench(data / "bench_dev.json")
    pools = _by_source(dev)
    builder = PromptBuilder(fmt)
    rng = random.Random(seed)
    candidates = {}
    for source, items in sorted(_by_source(test).items()):
        pick = rng.sample(items, min(len(items), 3 * n))
        recs, _, _ = build_split(pick, {source: pools.get(source, items)}, builder, tokenizer, k, seed, False,
                                 max_tokens, "bench")
        candidates[source] = [r for r in recs if r["prompt_tokens"] <= max_tokens and len(r["shots"]) == k]
    chosen: list[str] = []
    while len(chosen) < n and any(candidates.values()):
        for source in sorted(candidates):
            if candidates[source] and len(chosen) < n:
                chosen.append(candidates[source].pop(0)["id"])
    rank = {item_id: r for r, item_id in enumerate(chosen)}
    items = [it for it in test if it.id in rank]  # file order
    per_item, _, _ = build_split(items, pools, builder, tokenizer, k, seed, False, 10 ** 6, "bench")
    fixed, _, _ = build_split(items, pools, builder, tokenizer, k, seed, True, 10 ** 6, "bench")
    for rec in per_item + fixed:
        rec["rank"] = rank[rec["id"]]
    return per_item, fixed


def first(records: list[dict], n: int) -> list[dict]:
    """The records of the first n items of the round-robin order, in file order."""
    return [r for r in records if r["rank"] < n]


# ----------------------------------------------------------------------------------------------- methods
def floor_per_item(model, ids_list) -> None:
    """One forward per prompt."""
    import torch

    with torch.no_grad():
        for ids in ids_list:
            model(input_ids=torch.tensor([ids], device=model.device), use_cache=False, logits_to_keep=1)


def floor_fixed(model, records, ids_list) -> None:
    """Each group's shared prefix once, then every item's suffix on a copy of the prefix cache."""
    import torch

    from src.evaluate.predict import prompt_group
    from src.generation.engine import plan_groups

    with torch.no_grad():
        for g in plan_groups(ids_list, [prompt_group(r) for r in records], "auto"):
            P = len(g.prefix)
            cache = None
            if P:
                out = model(input_ids=torch.tensor([g.prefix], device=model.device), use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
            for i in g.members:
                suffix = ids_list[i][P:]
                pos = torch.arange(P, P + len(suffix), device=model.device)[None]
                model(input_ids=torch.tensor([suffix], device=model.device), position_ids=pos, use_cache=True,
                      past_key_values=copy.deepcopy(cache) if cache is not None else None, logits_to_keep=1)


def run_method(bench: dict, method: str, records: list[dict], model=None) -> tuple[list | None, dict]:
    """Score ``records`` with one method; returns (predictions or None, the engine's counters)."""
    from src.evaluate.predict import predict

    args, tok, fmt = bench["args"], bench["tokenizer"], bench["fmt"]
    model = model if model is not None else bench["model"]
    stats: dict = {}
    if method in ("floor", "fixed-floor"):
        ids = tok([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
        if method == "floor":
            floor_per_item(model, ids)
        else:
            floor_fixed(model, records, ids)
        return None, {}
    if method == "server":
        stats = {}
        preds = _server_predictions(bench["server"], tok, records, args.concurrency, stats)
        return preds, stats
    engine, options = {"custom": ("custom", dict(batch_size=args.batch_size)),
                       "fixed-custom": ("custom", dict(batch_size=args.batch_size)),
                       "cb": ("cb", dict(batch_size=args.cb_batch_size)),
                       "hf-b64": ("hf", dict(batch_size=64)),
                       REFERENCE: ("hf", dict(batch_size=4, max_new_tokens=256, sort_by_length=False))}[method]
    options = {"max_new_tokens": 128, **options}
    preds = predict(model, tok, records, engine=engine, fmt=fmt, progress=False, stats=stats, **options)
    return preds, stats


# ----------------------------------------------------------------------------------------------- timing
def timed(bench: dict, method: str, records: list[dict], model=None) -> dict:
    """Run one method once and time it (wall and CPU seconds; the GPU is synchronised around the run). Forward
    calls are counted by a hook on the model, the same way for every method."""
    import torch

    model = model if model is not None else bench["model"]
    calls = [0]
    hook = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    cuda = bench["args"].device == "cuda"
    try:
        if cuda:
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        preds, stats = run_method(bench, method, records, model)
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    finally:
        hook.remove()
    return {"wall": wall, "cpu": cpu, "preds": preds, "stats": {**(stats or {}), "forward_calls": calls[0] or None},
            "records": records}


def sized_run(bench: dict, method: str, pool: list[dict]) -> tuple[dict, dict | None]:
    """The method's run: on every item of ``pool``, or sized to --budget-seconds from a probe round."""
    args = bench["args"]
    if args.budget_seconds is None:
        return timed(bench, method, pool), None
    n_pool = len({r["rank"] for r in pool})
    probe_n = min(args.probe_items, n_pool)
    probe = timed(bench, method, first(pool, probe_n))
    per_item = probe["wall"] / probe_n
    n = max(probe_n, min(n_pool, int((args.budget_seconds - probe["wall"]) / per_item)))
    info = {"items": probe_n, "wall_s": round(probe["wall"], 2), "budget_s": args.budget_seconds}
    return timed(bench, method, first(pool, n)), info


def figures(bench: dict, method: str, run: dict, kind: str) -> dict:
    """The JSON line of one measured method."""
    args, n = bench["args"], len(run["records"])
    stats = run["stats"] or {}
    calls = stats.get("forward_calls")
    line = {"bench": "eval_speed", "method": method, "kind": kind, "model": bench["model_name"],
            "device": args.device, "dtype": bench["dtype"], "items": n,
            "prompt_tokens": sum(r["prompt_tokens"] for r in run["records"]),
            "wall_s": round(run["wall"], 3), "cpu_s": round(run["cpu"], 3), "items_per_s": round(n / run["wall"], 4),
            "s_per_item": round(run["wall"] / n, 5), "forward_calls": calls,
            "ms_per_forward": round(1000 * run["wall"] / calls, 3) if calls else None}
    for key in ("new_tokens", "stops", "decode_steps", "merges", "padded_tokens", "prefix_saved_tokens"):
        if key in stats:
            line[key] = stats[key]
    if run["preds"] is not None:
        bench["letters"][(method, kind)] = {p["id"]: p["letter"] for p in run["preds"]}
    return line


def add_comparisons(bench: dict, line: dict, lines: list[dict]) -> None:
    """Ratios against the other methods' latest ``lines`` for the same model, device and kind, and the share of
    letters identical to the reference-style loop's and to the custom engine's (fixed-shot prompts are compared
    with their own floor and with the custom engine on per-item shots only: their prompts differ)."""
    last = {x["method"]: x for x in lines if (x["model"], x["device"], x["kind"]) ==
            (line["model"], line["device"], line["kind"]) and x["method"] != line["method"]}
    method = line["method"]
    if method == "floor":
        return
    fixed = method.startswith("fixed-")
    ratios = ((("fixed-floor", "x_fixed_floor"), ("floor", "x_floor"), ("custom", "x_custom_per_item_shots"))
              if fixed else (("floor", "x_floor"),))
    for other, key in ratios:
        if other in last:
            line[key] = round(line["s_per_item"] / last[other]["s_per_item"], 3)
    for other, key in () if fixed else ((REFERENCE, "speedup_vs_reference_b4"), ("hf-b64", "speedup_vs_hf_b64")):
        if other in last:
            line[key] = round(last[other]["s_per_item"] / line["s_per_item"], 3)
    if line["kind"] == "post-moe":
        dense = [x for x in lines if (x["method"], x["kind"], x["model"], x["device"]) ==
                 (method, "dense", line["model"], line["device"])]
        if dense:
            line["moe_vs_dense"] = round(line["s_per_item"] / dense[-1]["s_per_item"], 3)
    mine = bench["letters"].get((method, line["kind"]))
    for other, key in () if fixed else ((REFERENCE, "reference_b4"), ("custom", "custom")):
        theirs = bench["letters"].get((other, line["kind"])) or _letters_file(bench, other, line["kind"])
        common = [i for i in mine if i in theirs] if mine and theirs and method != other else []
        if common:
            same_n = sum(mine[i] == theirs[i] for i in common)
            line[f"identical_letters_vs_{key}"] = f"{same_n}/{len(common)}"
            line[f"identical_share_vs_{key}"] = round(same_n / len(common), 4)


def summary(bench: dict) -> dict:
    """Every method of this run compared with all the others (a method's own line only saw those before it)."""
    keep = ("s_per_item", "items", "x_floor", "x_fixed_floor", "x_custom_per_item_shots", "speedup_vs_reference_b4",
            "speedup_vs_hf_b64", "moe_vs_dense", "identical_share_vs_reference_b4", "identical_share_vs_custom")
    out = {}
    for line in bench["lines"][bench["n_previous"]:]:
        again = {k: line[k] for k in ("method", "kind", "model", "device", "s_per_item", "items")}
        add_comparisons(bench, again, bench["lines"])
        out[f"{line['method']}" + ("" if line["kind"] == "dense" else f"/{line['kind']}")] = \
            {k: again[k] for k in keep if k in again}
    return {"bench": "eval_speed", "summary": True, "model": bench["model_name"], "device": bench["args"].device,
            "methods": out}


def _letters_path(bench: dict, method: str, kind: str) -> Path | None:
    jsonl = bench["args"].jsonl
    if jsonl is None:
        return None
    suffix = "" if kind == "dense" else f".{kind}"
    return jsonl.with_name(f"{jsonl.stem}.letters.{method}{suffix}.json")


def _letters_file(bench: dict, method: str, kind: str) -> dict | None:
    path = _letters_path(bench, method, kind)
    if path is None or not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    return doc["letters"] if doc.get("model") == bench["model_name"] and doc.get("device") == \
        bench["args"].device else None


def emit(bench: dict, line: dict, record: bool = True) -> None:
    """Print one JSON line, append it to --jsonl, and keep it (and the method's letters) for later comparisons."""
    if record:
        add_comparisons(bench, line, bench["lines"])
        bench["lines"].append(line)
    text = json.dumps(line, ensure_ascii=False)
    print(text, flush=True)
    jsonl = bench["args"].jsonl
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        with jsonl.open("a", encoding="utf-8") as fh:
            fh.write(text + "\n")
        letters = bench["letters"].get((line.get("method"), line.get("kind")))
        if letters:
            _letters_path(bench, line["method"], line["kind"]).write_text(json.dumps(
                {"model": bench["model_name"], "device": line["device"], "letters": letters}), encoding="utf-8")


def previous_lines(jsonl: Path | None) -> list[dict]:
    if jsonl is None or not jsonl.is_file():
        return []
    lines = []
    for text in jsonl.read_text(encoding="utf-8").splitlines():
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            continue  # a line cut by a time limit
        if doc.get("bench") == "eval_speed" and "method" in doc:
            lines.append(doc)
    return lines


# ----------------------------------------------------------------------------------------------- run
def measure(bench: dict, method: str) -> None:
    """Measure one method (and its Post-MoE twin with --post-moe) and print its line(s)."""
    pool = bench["fixed"] if method.startswith("fixed-") else bench["per_item"]
    if method == "custom" and bench["args"].profile:
        profile(bench, first(pool, bench["args"].probe_items))
    run, probe = sized_run(bench, method, pool)
    line = figures(bench, method, run, "dense")
    if probe:
        line["probe"] = probe
    emit(bench, line)
    if bench["args"].post_moe and method in MOE_METHODS:
        model = bench["moe"]["export" if method == "cb" else "ours"]
        emit(bench, figures(bench, method, timed(bench, method, run["records"], model), "post-moe"))


def profile(bench: dict, records: list[dict]) -> None:
    """The custom engine under torch.profiler: the ops that took the most time (self time), as one JSON line."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = bench["args"].device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        run_method(bench, "custom", records)
    out = bench["args"].profile
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "custom_trace.json"))
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:20]
    top = [{"op": e.key, "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1000, 3),
            "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3)} for e in events]
    print(json.dumps({"bench": "eval_speed", "profile": "custom", "items": len(records), "by": key, "top": top,
                      "trace": str(out / "custom_trace.json")}), flush=True)


def post_moe_models(model) -> dict:
    """The model upcycled with the paper's settings (7 experts, top-2, last 2 layers; util/upcycle_moe.py's
    defaults) and its stock Qwen2MoeForCausalLM export, in memory."""
    import torch

    from src.models import moe, moe_export

    torch.manual_seed(0)
    ours = moe.upcycle(copy.deepcopy(model)).eval()
    return {"ours": ours, "export": moe_export.to_qwen2_moe(ours).to(model.device)}


def setup(args) -> dict:
    import torch

    from src.common.chat_formats import resolve_format
    from src.models.loading import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.data / "bench_test.json").is_file():
        raise FileNotFoundError(f"{args.data}: no bench_test.json (pass --data DIR or --sample)")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device).eval()
    fmt = resolve_format(tokenizer, model.config)
    t = time.perf_counter()
    per_item, fixed = build_items(args.data, tokenizer, fmt, args.items, args.max_prompt_tokens, args.seed)
    bench = {"args": args, "model": model, "tokenizer": tokenizer, "fmt": fmt, "per_item": per_item,
             "fixed": fixed, "model_name": Path(args.model).name,
             "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "letters": {},
             "lines": previous_lines(args.jsonl)}
    bench["n_previous"] = len(bench["lines"])
    head = {"bench": "eval_speed", "setup": True, "items": len(per_item), "model": bench["model_name"],
            "sources": len({r["source"] for r in per_item}), "languages": sorted({r["language"] for r in per_item}),
            "prompt_tokens": sum(r["prompt_tokens"] for r in per_item), "built_s": round(time.perf_counter() - t, 1),
            "device": args.device, "dtype": bench["dtype"], "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "load_average": round(os.getloadavg()[0], 2),
            "methods": args.methods, "post_moe": args.post_moe, "budget_seconds": args.budget_seconds}
    if args.device == "cuda":
        head["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(head), flush=True)
    with torch.no_grad():  # warm-up
        model(input_ids=torch.tensor([[tokenizer.bos_token_id or 0] * 8], device=model.device), logits_to_keep=1)
    if args.post_moe:
        bench["moe"] = post_moe_models(model)
    if "server" in args.methods:
        bench["server"] = _open_server(args, tokenizer, head)
    return bench


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = setup(args)
    try:
        for method in args.methods:
            measure(bench, method)
    finally:
        if "server" in bench:
            _close_server(bench["server"])
    end = summary(bench)
    emit(bench, end, record=False)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        lines = bench["lines"][bench["n_previous"]:] + [end]
        args.json.write_text(json.dumps(lines, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


# ----------------------------------------------------------------------------------------------- server
def _open_server(args, tokenizer, head: dict) -> dict:
    """A server to time: the one at --api-base, or --serve ENGINE started here on --model (start-up timed apart)."""
    from src.generation.backends import open_served
    from src.serving.launch import ServerProcess, engine_command

    proc = None
    base = args.api_base
    if args.serve:
        extra = ["--dtype", "bfloat16"] if args.serve == "vllm" else []
        proc = ServerProcess(engine_command(args.serve, args.model, "127.0.0.1", args.port, extra), "127.0.0.1",
                             args.port, log=Path(os.environ.get("SERVE_LOG", "/tmp/eval_speed_serve.log")),
                             env={"OMP_NUM_THREADS": str(args.threads)} if args.threads else None)  # as in-process
        import atexit

        atexit.register(proc.stop)  # also when the run fails half-way
        t = time.perf_counter()
        proc.start(timeout=600)
        base = proc.base_url
        print(json.dumps({"bench": "eval_speed", "server_start_s": round(time.perf_counter() - t, 1),
                          "engine": args.serve, "url": base}), flush=True)
    backend = open_served(base, args.api_model, tokenizer, concurrency=args.concurrency)
    head.update(server_engine=backend.engine, concurrency=args.concurrency)
    return {"backend": backend, "proc": proc}


def _server_predictions(server: dict, tokenizer, records: list[dict], concurrency: int, stats: dict) -> list[dict]:
    from src.common.chat_formats import resolve_format
    from src.evaluate.predict import generation_config, predict_records
    from src.generation.stops import folder_stop_token_ids
    from src.models.loading import load_config

    backend = server["backend"]
    backend.concurrency = concurrency
    fmt = resolve_format(tokenizer, load_config(backend.tokenizer.name_or_path))
    config = generation_config(tokenizer, fmt, stop_ids=folder_stop_token_ids(tokenizer.name_or_path, tokenizer, fmt))
    return predict_records(backend, tokenizer, records, config, progress=False, stats=stats)


def _close_server(server: dict) -> None:
    server["backend"].client.close()
    if server["proc"] is not None:
        server["proc"].stop()


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
