"""Step 4 speed: our engine against a loop written like the reference, on the same model and the same real items.

    python bench/eval_speed.py [--model models/SmolLM2-135M-Instruct] [--data ../shared/data/xmedbench]
                               [--items 48] [--max-prompt-tokens 1000] [--batch-size 16] [--threads 1]
                               [--json results/bench_eval_speed.json]
    python bench/eval_speed.py --backend openai (--api-base URL | --serve transformers|vllm) [same flags]

Items: real XMedBench test items from ``--data`` (never copied into the project), drawn seeded and round-robin over
the sources (so several languages), 3-shot prompts built by step 1's code with shots from the dev file, keeping
prompts of at most ``--max-prompt-tokens`` tokens (so the run fits in ~10 minutes on a 2-core CPU).

Measured, in this order, all with the same model, dtype and threads:

* floor: one forward pass over every prompt, one prompt at a time (no padding, logits of the last position only).
  Prefill is the cost no scorer can avoid on a CPU; decoding and padding are what a scorer adds on top.
* ours: ``src.evaluate.engine.predict`` (length-sorted batches, early stop at the end of the first non-empty line,
  finished rows dropped), default settings.
* reference-style: HF ``generate`` in file order, batch 4, left padding with an attention mask, greedy, 256 max new
  tokens, min 2, stopping on the same stop tokens, answers extracted by the same extractor.
* fixed shots (``--shot-mode fixed`` prompts for the same items): the floor becomes one forward over each source's
  shared prefix plus one over every item's suffix; ours reuses the prefix KV cache.

With ``--backend openai`` one more method runs on the same items: **server**, step 4's OpenAI backend
(``src/evaluate/openai_backend.py``, the prompts unchanged, greedy, ``--concurrency`` requests in flight) against a
running server (``--api-base``) or one this script starts and stops (``--serve ENGINE``, the same command as
``scripts/serve.sh``; its start-up time is reported apart). Its letters are compared with ours (in-process) and with
the reference-style loop's. ``--device cuda`` runs the in-process methods in bf16 on a GPU (the GPU check,
``bench/gpu_serving_check.sh``).

Prints items/s for each, the ratio ours/reference, the share of identical extracted letters, our time against the
floor, and the time each scorer spends above the floor (decoding, padding, overheads).

Timing on a shared CPU: by default one torch thread (``--threads 1``): with two threads on two cores that other jobs
also use, every parallel op waits for the second core (~13 ms per op here), which swamps decoding steps. Wall and
process CPU seconds are both reported (with one thread, CPU seconds are the work done, whatever the foreign load).
``--round-items N`` measures in rounds of N items, every method on each round in turn, so a burst of foreign load hits
all methods alike (but each round is then scored on its own, which costs our continuous batching its refills).
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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_items(data: Path, tokenizer, fmt, n: int, max_tokens: int, seed: int, k: int = 3):
    """(per-item-shot records, fixed-shot records) for the same n items, in file order."""
    from src.prepare.bench_items import load_bench
    from src.prepare.prompts import PromptBuilder
    from src.prepare.test_dev import _by_source, build_split

    test, _ = load_bench(data / "bench_test.json")
    dev, _ = load_bench(data / "bench_dev.json")
    pools = _by_source(dev)
    builder = PromptBuilder(fmt)
    by_source = _by_source(test)
    rng = random.Random(seed)
    candidates = {}
    for source, items in sorted(by_source.items()):
        pick = rng.sample(items, min(len(items), 3 * n))
        recs, _, _ = build_split(pick, {source: pools.get(source, items)}, builder, tokenizer, k, seed, False,
                                 max_tokens, "bench")
        candidates[source] = [r for r in recs if r["prompt_tokens"] <= max_tokens and len(r["shots"]) == k]
    chosen_ids: list[str] = []
    while len(chosen_ids) < n and any(candidates.values()):
        for source in sorted(candidates):
            if candidates[source] and len(chosen_ids) < n:
                chosen_ids.append(candidates[source].pop(0)["id"])
    chosen = set(chosen_ids)
    items = [it for it in test if it.id in chosen]  # file order
    per_item, _, _ = build_split(items, pools, builder, tokenizer, k, seed, False, 10 ** 6, "bench")
    fixed, _, _ = build_split(items, pools, builder, tokenizer, k, seed, True, 10 ** 6, "bench")
    return per_item, fixed


def floor_per_item(model, ids_list) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for ids in ids_list:
            t = torch.tensor([ids], device=model.device)
            model(input_ids=t, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


def floor_fixed(model, records, ids_list) -> tuple[float, int]:
    """Each group's shared prefix once, then every item's suffix on a copy of the prefix cache."""
    import torch

    from src.evaluate.engine import plan_groups

    t0 = time.perf_counter()
    computed = 0
    with torch.no_grad():
        for g in plan_groups(records, ids_list, "auto"):
            P = len(g.prefix)
            cache = None
            if P:
                out = model(input_ids=torch.tensor([g.prefix], device=model.device), use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                computed += P
            for i in g.members:
                suffix = ids_list[i][P:]
                c = copy.deepcopy(cache) if cache is not None else None
                pos = torch.arange(P, P + len(suffix))[None]
                model(input_ids=torch.tensor([suffix], device=model.device), position_ids=pos.to(model.device), past_key_values=c, use_cache=True,
                      logits_to_keep=1)
                computed += len(suffix)
    return time.perf_counter() - t0, computed


def reference_style(model, tokenizer, records, batch_size=4, max_new_tokens=256):
    """The original evaluation loop: HF generate on batches in file order (step 4's ``--engine hf`` with the
    original's batch size and token limit, docs/reference.md "Generation and answer extraction")."""
    from src.evaluate.hf_engine import predict_hf

    t0 = time.perf_counter()
    preds = predict_hf(model, tokenizer, records, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       progress=False, sort_by_length=False)
    return time.perf_counter() - t0, [p["letter"] for p in preds], [p["raw"] for p in preds]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "xmedbench")
    p.add_argument("--items", type=int, default=48)
    p.add_argument("--max-prompt-tokens", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="ours (default %(default)s, as the CLI on a CPU)")
    p.add_argument("--round-items", type=int, default=0,
                   help="measure in rounds of this many items, every method on each round in turn (0: every "
                        "method over all items, one after the other; default)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared machine two threads wait for each other's core)")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-fixed", action="store_true")
    p.add_argument("--skip-floor", action="store_true", help="no floor measurement (the server comparison only)")
    p.add_argument("--skip-ours", action="store_true", help="no in-process engine run (the server comparison only)")
    p.add_argument("--backend", choices=["inprocess", "openai"], default="inprocess",
                   help="openai: also time step 4 through an OpenAI-compatible server")
    p.add_argument("--api-base", default=None, help="a running server (scripts/serve.sh)")
    p.add_argument("--api-model", default=None)
    p.add_argument("--serve", choices=["transformers", "vllm"], default=None,
                   help="start this engine on --model for the run (instead of --api-base) and stop it afterwards")
    p.add_argument("--port", type=int, default=8011, help="port for --serve (%(default)s)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight to the server (%(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="in-process methods (cuda: bf16)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.backend == "openai" and not (args.api_base or args.serve):
        p.error("--backend openai needs --api-base URL or --serve ENGINE")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from src.common.chat_formats import resolve_format
    from src.evaluate.engine import predict
    from src.models.loading import load_model, load_tokenizer

    if not (args.data / "bench_test.json").is_file():
        print(f"no bench data at {args.data}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device).eval()
    fmt = resolve_format(tokenizer, model.config)
    t = time.perf_counter()
    per_item, fixed = build_items(args.data, tokenizer, fmt, args.items, args.max_prompt_tokens, args.seed)
    langs = sorted({r["language"] for r in per_item})
    ids = tokenizer([r["prompt"] for r in per_item], add_special_tokens=False)["input_ids"]
    tokens = sum(len(x) for x in ids)
    print(f"[bench] {len(per_item)} items, {len({r['source'] for r in per_item})} sources, languages {langs}, "
          f"{tokens} prompt tokens (mean {tokens / len(ids):.0f}), built in {time.perf_counter() - t:.1f}s; "
          f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    with torch.no_grad():  # warm-up
        model(input_ids=torch.tensor([ids[0][:64]], device=model.device), use_cache=False, logits_to_keep=1)

    fig: dict = {"model": args.model, "items": len(per_item), "languages": langs,
                 "sources": sorted({r["source"] for r in per_item}), "prompt_tokens": tokens,
                 "max_prompt_tokens": args.max_prompt_tokens, "round_items": args.round_items,
                 "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                 "device": args.device, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                 "load_average_start": round(os.getloadavg()[0], 2)}
    if args.device == "cuda":
        fig["gpu"] = torch.cuda.get_device_name(0)
    server = _open_server(args, tokenizer, fig) if args.backend == "openai" else None
    fids = tokenizer([r["prompt"] for r in fixed], add_special_tokens=False)["input_ids"]

    # The machine is shared: measure in rounds of a few items, every method on the same round back to back, in a
    # rotating order, so a burst of foreign load hits all methods alike. Wall and process CPU seconds are summed.
    methods = ([] if args.skip_floor else ["floor"]) + ([] if args.skip_ours else ["ours"]) + \
              ([] if server is None else ["server"]) + ([] if args.skip_reference else ["reference"]) + \
              ([] if args.skip_fixed else ["fixed_floor", "fixed_ours"])
    wall = {m: 0.0 for m in methods}
    cpu = {m: 0.0 for m in methods}
    ours: list = []
    served: list = []
    ref_letters: list = []
    ref_raws: list = []
    ours_f: list = []
    stats: dict = {}
    stats_f: dict = {}
    computed_fixed = 0

    def add_stats(total: dict, part: dict):
        for k, v in part.items():
            if isinstance(v, dict):
                sub = total.setdefault(k, {})
                for kk, vv in v.items():
                    sub[kk] = sub.get(kk, 0) + vv
            elif isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v

    size = args.round_items or len(per_item)
    n_rounds = (len(per_item) + size - 1) // size
    for r in range(n_rounds):
        sl = slice(r * size, (r + 1) * size)
        recs, recs_f, rids, rfids = per_item[sl], fixed[sl], ids[sl], fids[sl]
        for m in methods[r % len(methods):] + methods[:r % len(methods)]:
            if n_rounds == 1:
                print(f"[bench] {m} ...", flush=True)
            w0, c0 = time.perf_counter(), time.process_time()
            if m == "floor":
                floor_per_item(model, rids)
            elif m == "ours":
                st: dict = {}
                ours += predict(model, tokenizer, recs, fmt=fmt, batch_size=args.batch_size, progress=False,
                                stats=st)
                add_stats(stats, st)
            elif m == "server":
                served += _server_predictions(server, tokenizer, recs, args.concurrency)
            elif m == "reference":
                _, letters, raws = reference_style(model, tokenizer, recs)
                ref_letters += letters
                ref_raws += raws
            elif m == "fixed_floor":
                computed_fixed += floor_fixed(model, recs_f, rfids)[1]
            elif m == "fixed_ours":
                st = {}
                ours_f += predict(model, tokenizer, recs_f, fmt=fmt, batch_size=args.batch_size, progress=False,
                                  stats=st)
                add_stats(stats_f, st)
            wall[m] += time.perf_counter() - w0
            cpu[m] += time.process_time() - c0
        print(f"[bench] round {r + 1}/{n_rounds}: " + ", ".join(f"{m} {wall[m]:.1f}s" for m in methods)
              + f" (load average {os.getloadavg()[0]:.1f})", flush=True)

    n = len(per_item)
    fig["wall_s"] = {m: round(v, 2) for m, v in wall.items()}
    fig["cpu_s"] = {m: round(v, 2) for m, v in cpu.items()}
    fig["load_average_end"] = round(os.getloadavg()[0], 2)
    fig["items_per_s"] = {m: round(n / v, 4) for m, v in wall.items()}
    if server is not None:
        _report_server(fig, server, wall, served, ours, n)
    if "floor" not in wall or "ours" not in wall:
        return _finish(fig, args, served, ref_letters, server)
    fig["ours_vs_floor"] = round(wall["ours"] / wall["floor"], 3)
    fig["ours_vs_floor_cpu"] = round(cpu["ours"] / cpu["floor"], 3)
    fig["ours_engine"] = stats
    print(f"[bench] floor (one forward per prompt): {wall['floor']:.1f}s wall / {cpu['floor']:.1f}s cpu, "
          f"{n / wall['floor']:.3f} items/s")
    print(f"[bench] ours: {wall['ours']:.1f}s wall / {cpu['ours']:.1f}s cpu, {n / wall['ours']:.3f} items/s, "
          f"{wall['ours'] / wall['floor']:.3f}x the floor (cpu {cpu['ours'] / cpu['floor']:.3f}x); "
          f"padding {stats.get('padded_tokens')} tokens, {stats.get('new_tokens')} new tokens, "
          f"stops {stats.get('stops')}")
    if "reference" in wall:
        same = sum(a["letter"] == b for a, b in zip(ours, ref_letters))
        fig.update(ratio=round(wall["reference"] / wall["ours"], 3),
                   above_floor_s={"ours": round(wall["ours"] - wall["floor"], 2),
                                  "reference": round(wall["reference"] - wall["floor"], 2)},
                   ratio_cpu=round(cpu["reference"] / cpu["ours"], 3),
                   identical_letters=round(same / n, 4), identical_letters_count=f"{same}/{n}",
                   reference_vs_floor=round(wall["reference"] / wall["floor"], 3))
        print(f"[bench] reference-style: {wall['reference']:.1f}s wall / {cpu['reference']:.1f}s cpu, "
              f"{n / wall['reference']:.3f} items/s, {wall['reference'] / wall['floor']:.3f}x the floor")
        print(f"[bench] ratio (reference time / our time): {wall['reference'] / wall['ours']:.2f}x wall, "
              f"{cpu['reference'] / cpu['ours']:.2f}x cpu; identical letters {same}/{n}; time above the floor: "
              f"ours {wall['ours'] - wall['floor']:.1f}s, reference-style {wall['reference'] - wall['floor']:.1f}s")
        for a, letter, raw in zip(ours, ref_letters, ref_raws):
            if a["letter"] != letter:
                print(f"[bench]   differs: {a['id']}: ours {a['raw']!r} -> {a['letter']}, "
                      f"reference-style {raw!r} -> {letter}")
    if "fixed_ours" in wall:
        ftok = sum(len(x) for x in fids)
        fig["fixed"] = {"prompt_tokens": ftok, "tokens_computed_with_prefix_reuse": computed_fixed,
                        "floor_s": round(wall["fixed_floor"], 2), "ours_s": round(wall["fixed_ours"], 2),
                        "ours_items_per_s": round(n / wall["fixed_ours"], 4),
                        "ours_vs_floor": round(wall["fixed_ours"] / wall["fixed_floor"], 3),
                        "ours_vs_floor_cpu": round(cpu["fixed_ours"] / cpu["fixed_floor"], 3),
                        "speedup_vs_per_item_shots": round(wall["ours"] / wall["fixed_ours"], 3),
                        "fixed_floor_vs_per_item_floor": round(wall["fixed_floor"] / wall["floor"], 3),
                        "engine": stats_f}
        print(f"[bench] fixed shots: {ftok} prompt tokens, {computed_fixed} computed with the prefix once per "
              f"source and round; floor {wall['fixed_floor']:.1f}s; ours {wall['fixed_ours']:.1f}s "
              f"({n / wall['fixed_ours']:.3f} items/s, {wall['fixed_ours'] / wall['fixed_floor']:.3f}x its floor, "
              f"{wall['ours'] / wall['fixed_ours']:.2f}x faster than ours with per-item shots)")

    return _finish(fig, args, served, ref_letters, server)


def _open_server(args, tokenizer, fig: dict):
    """A server to time: the one at --api-base, or --serve ENGINE started here on --model (start-up timed apart)."""
    from src.evaluate.openai_backend import open_server
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
        fig["server_start_s"] = round(time.perf_counter() - t, 1)
        base = proc.base_url
        print(f"[bench] {args.serve} serve up in {fig['server_start_s']} s at {base}", flush=True)
    client, target, _ = open_server(base, args.api_model, args.model, tokenizer, None, 128, 2)
    fig.update(server_engine=target.engine, server_url=client.base, concurrency=args.concurrency)
    return {"client": client, "target": target, "proc": proc}


def _server_predictions(server: dict, tokenizer, records: list[dict], concurrency: int) -> list[dict]:
    from src.evaluate.openai_backend import iter_predictions

    out: list = [None] * len(records)
    for i, pred in iter_predictions(server["client"], server["target"], tokenizer, records, "generate", concurrency):
        out[i] = pred
    return out


def _report_server(fig: dict, server: dict, wall: dict, served: list, ours: list, n: int) -> None:
    fig["server_stats"] = server["target"].stats
    print(f"[bench] server ({fig['server_engine']}, concurrency {fig['concurrency']}): {wall['server']:.1f}s wall, "
          f"{n / wall['server']:.3f} items/s; stops {server['target'].stats['stops']}")
    if ours:
        same = sum(a["letter"] == b["letter"] for a, b in zip(ours, served))
        fig.update(server_vs_ours=round(wall["server"] / wall["ours"], 3),
                   server_identical_letters_vs_ours=f"{same}/{n}")
        print(f"[bench] server vs ours (in-process): {wall['ours'] / wall['server']:.2f}x the speed; identical "
              f"letters {same}/{n}")


def _finish(fig: dict, args, served: list, ref_letters: list, server) -> int:
    if served and ref_letters:
        same = sum(a["letter"] == b for a, b in zip(served, ref_letters))
        fig["server_identical_letters_vs_reference"] = f"{same}/{len(served)}"
        fig["server_identical_letters_vs_reference_share"] = round(same / len(served), 4)
        if "reference" in fig.get("wall_s", {}) and "server" in fig["wall_s"]:
            fig["server_speedup_vs_reference"] = round(fig["wall_s"]["reference"] / fig["wall_s"]["server"], 2)
            print(f"[bench] server vs reference-style: {fig['server_speedup_vs_reference']}x faster; identical "
                  f"letters {same}/{len(served)}")
    if server is not None:
        server["client"].close()
        if server["proc"] is not None:
            server["proc"].stop()
    print(json.dumps(fig, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
