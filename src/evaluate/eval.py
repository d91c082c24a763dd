"""Step 4: score a model on step 1's k-shot prompts (XMedBench).

    4.eval.sh --model M --input test.jsonl --out DIR [--limit N] [--batch-size B] [--max-new-tokens 128]
              [--mode generate|loglik] [--format NAME] [--exclude-source NAME ...]

Writes DIR/predictions.jsonl (one line per item: id, source, language, raw generation, extracted letter, the rule that
fired, gold letter, correct, ...), DIR/score.json (per source, per language, major/minor averages with 95% intervals),
DIR/score.md (the same as tables) and DIR/run.json (settings, timing, engine counters), and prints the table.

Resume: predictions are appended as they are made; a rerun with the same settings skips the items whose prediction in
DIR has the same fingerprint (prompt, weights, settings: fingerprint.py) and recomputes stale ones. DIR/.lock keeps
a second run out.
MMedBench records (step 1 on an MMedBench release): generation runs to the end of the answer (1,000 new tokens by
default, MMedLM's), answers are read by src/evaluate/mmedlm.py (``--parsing``) and scored per language with the
mean of six and rationale similarity (``--rationale-metric``, src/evaluate/mmedlm_scoring.py; docs/mmedbench.md).
Multi-GPU: ``accelerate launch -m src.evaluate.eval ...``: every process scores its own share of the items (each item
exactly once), rank 0 merges and scores. With no arguments: SmolLM2-135M-Instruct on the embedded sample.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from src.common.defaults import repo_relative
from src.common.io import dumps, read_appended, repair_tail, write_json, write_jsonl, write_text
from src.evaluate import mmedlm, rationale
from src.evaluate.config import XMEDBENCH_MAX_NEW_TOKENS, EvalConfig
from src.evaluate.records import load_records

PRED = "predictions.jsonl"
PARTS = "parts"


def read_predictions(path: Path) -> list[dict]:
    """Predictions appended so far. A last line cut short by a crash is dropped (it is redone); any other broken
    line is an error naming the file and line."""
    return read_appended(path, "[step 4] ")


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

    from src.models.loading import default_dtype

    return default_dtype(device) if name == "auto" else getattr(torch, name)


def _check_resume(out: Path, settings: dict, overwrite: bool) -> None:
    run_file = out / "run.json"
    has_preds = (out / PRED).is_file() or (out / PARTS).is_dir()
    if overwrite:  # the earlier run's predictions, scores and record go: they would describe other settings
        for name in (PRED, "run.json", "score.json", "score.md"):
            (out / name).unlink(missing_ok=True)
        if (out / PARTS).is_dir():
            for f in (out / PARTS).iterdir():
                f.unlink()
        return
    if not has_preds or not run_file.is_file():
        return
    from src.common.rerun import normalised

    old = normalised(json.loads(run_file.read_text(encoding="utf-8")).get("settings", {}))
    diff = [k for k in EvalConfig.resume_keys() if k in old and old[k] != settings[k]]
    if diff:
        detail = ", ".join(f"{k}: {old[k]!r} -> {settings[k]!r}" for k in diff)
        raise SystemExit(f"[step 4] {out} holds predictions made with other settings ({detail}); "
                         f"use another --out or --overwrite")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="4.eval.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = EvalConfig()
    p.add_argument("--model", default=defaults.model, help="HF folder, hub id or our MoE checkpoint (default: "
                                                             f"{repo_relative(defaults.model)})")
    p.add_argument("--input", type=Path, default=defaults.input,
                   help=f"step 1 test.jsonl or dev.jsonl (default: {repo_relative(defaults.input)})")
    p.add_argument("--out", type=Path, default=defaults.out,
                   help=f"result folder (default: {repo_relative(defaults.out)})")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of the input")
    p.add_argument("--limit-per-source", type=int, default=None, help="only the first N items of every source")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows decoded together (default: 16 on CPU, 64 on GPU; halves itself on out-of-memory)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"default: {XMEDBENCH_MAX_NEW_TOKENS} (paper); MMedBench: {mmedlm.MAX_NEW_TOKENS} (MMedLM)")
    p.add_argument("--min-new-tokens", type=int, default=2, help="default: %(default)s (reference)")
    p.add_argument("--mode", choices=["generate", "loglik"], default="generate",
                   help="generate: greedy decoding + answer extraction (paper); loglik: most likely option letter")
    p.add_argument("--engine", choices=["auto", "custom", "hf", "cb"], default="auto",
                   help="custom: the batched early-stopping engine; hf: plain model.generate batches, same letters, "
                        "slower, no transformers internals (a fallback after a library upgrade); cb: transformers' "
                        "continuous batching (generate_batch), same rules, stock classes only; auto (default): per "
                        "device, from measurements (docs/eval.md)")
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
    p.add_argument("--exclude-source", action="append", default=[], metavar="NAME",
                   help="leave this source out of score.json/score.md (repeatable; predictions are still made and "
                        "kept). Default: every source counts, as in the reference's collector")
    p.add_argument("--backend", choices=["inprocess", "openai"], default="inprocess",
                   help="inprocess: our engine; openai: an OpenAI-compatible server at --api-base (scripts/serve.sh)")
    p.add_argument("--api-base", default=None, help="server URL for --backend openai, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", default=None, help="model name on the server (default: the one it lists)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (--backend openai; %(default)s)")
    p.add_argument("--api-timeout", type=float, default=300.0, help="seconds per request (%(default)s)")
    p.add_argument("--parsing", choices=mmedlm.PARSINGS, default=None,
                   help="MMedBench answers: robust (default: the letters after '###Answer:', 'OPTION B, D', "
                        "bracketed letters, then the XMedBench rules) or reference (MMedLM's string rule); both are "
                        "reported, this picks the headline")
    p.add_argument("--rationale-metric", choices=list(rationale.METRICS), default=None,
                   help="MMedBench rationale similarity: readme (default: BLEU-1 and ROUGE-1 F, as MMedLM's README "
                        "reports) or reference (cumulative BLEU-4 and ROUGE-L F, what its script computes)")
    p.add_argument("--overwrite", action="store_true", help="discard predictions already in --out")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    return EvalConfig.from_args(build_parser().parse_args(argv))


def select_records(cfg: EvalConfig) -> list[dict]:
    """The input's records, cut to --limit-per-source and --limit."""
    records = load_records(cfg.input)
    if cfg.limit_per_source:
        seen = Counter()
        kept = []
        for r in records:
            seen[r["source"]] += 1
            if seen[r["source"]] <= cfg.limit_per_source:
                kept.append(r)
        records = kept
    if cfg.limit is not None:
        records = records[:cfg.limit]
    return records


def check_models(cfg: EvalConfig) -> None:
    """Every model folder holds a model whose weight files are whole, before anything is written to --out (a failed
    start leaves no run.json). With --backend openai the server has the weights; --model gives the tokenizer."""
    from src.models.loading import check_model_source

    model_path = str(cfg.model)
    if not Path(model_path).exists() and model_path.startswith(("models/", "ckpts/", "./", "../", "/")):
        raise SystemExit(f"[step 4] no such model folder: {model_path} (run 0.download_data.sh, or step 3)")
    check_model_source(model_path, weights=cfg.backend != "openai")
    for flag, path in (("--proxy-tuned", cfg.proxy_tuned), ("--proxy-raw", cfg.proxy_raw)):
        if path:
            check_model_source(path, weights=True, flag=flag)


def run_settings(cfg: EvalConfig, dtype) -> dict:
    """What the predictions depend on, recorded in run.json: the config's ``rerun`` fields with the dtype resolved,
    paths inside the repository relative to it (rerun.normalised); a resumed run must share its ``resume`` fields."""
    from src.common.rerun import normalised

    settings = {**cfg.settings(), "dtype": str(dtype).replace("torch.", "")}
    if cfg.backend == "openai":
        settings.update(api_base=cfg.api_base, api_model=cfg.api_model, concurrency=cfg.concurrency)
    return normalised(settings)


def prepare_out(out: Path, settings: dict, overwrite: bool, state) -> None:
    """Take --out (one run at a time: OUT/.lock), refuse predictions made with other settings (or start afresh with
    --overwrite). Nothing is written yet: run.json is written once predicting starts (``write_status``)."""
    from src.common.locks import hold_for_launch

    hold_for_launch(out, "step 4", main_process=state.is_main_process, world_size=state.num_processes)
    if state.is_main_process:
        _check_resume(out, settings, overwrite)
    state.wait_for_everyone()


def read_all_predictions(out: Path) -> list[dict]:
    """predictions.jsonl, then the per-process parts of an interrupted multi-process run."""
    preds = read_predictions(out / PRED)
    if (out / PARTS).is_dir():
        for f in sorted((out / PARTS).glob("*.jsonl")):
            preds += read_predictions(f)
    return preds


def item_fingerprints(records: list[dict], settings: dict, cfg: EvalConfig) -> dict:
    """id -> the fingerprint its prediction must carry to be reused (prompt, letters, weights, settings)."""
    from src.evaluate.fingerprint import item_fingerprint, run_fingerprint

    run_fp = run_fingerprint(settings, {"model": cfg.model, "proxy_tuned": cfg.proxy_tuned,
                                        "proxy_raw": cfg.proxy_raw})
    return {r["id"]: item_fingerprint(r, run_fp) for r in records}


def done_ids(out: Path, fps: dict, main_proc: bool) -> set:
    """Ids whose prediction in --out carries the fingerprint it must have; stale ones are recomputed (said once)."""
    previous = read_all_predictions(out)
    done = {p["id"] for p in previous if p.get("fingerprint") == fps.get(p["id"])}
    stale = {p["id"] for p in previous if p["id"] in fps} - done
    if stale and main_proc:
        print(f"[step 4] {len(stale)} predictions in {out} were made from other prompts or other weights "
              f"(their fingerprint differs): recomputing them", flush=True)
    return done


def format_name(cfg: EvalConfig, tokenizer) -> str:
    """The chat format the predictions use, resolved as predicting resolves it, from the model's config (an adapter
    folder's: its base's), without loading the weights."""
    from src.common.chat_formats import resolve_format
    from src.models.loading import load_config

    return resolve_format(tokenizer, load_config(cfg.model), cfg.format).name


def load_scoring_model(cfg: EvalConfig, dtype, device):
    """The model to decode in process: ``--model``, or its proxy-tuned wrapper (base + (tuned - raw) logits)."""
    from src.models.loading import load_model

    if cfg.proxy_tuned:
        from src.models.proxy_tuning import load_proxy_tuned

        model, _ = load_proxy_tuned(cfg.model, cfg.proxy_tuned, cfg.proxy_raw, torch_dtype=dtype, device=device)
        return model
    return load_model(cfg.model, torch_dtype=dtype, device=device)


def open_scoring_backend(cfg: EvalConfig, tokenizer, dtype, device, batch_size: int):
    """(backend, chat format, stop ids) of this run: a server (--backend openai) or --engine's in-process backend
    over the loaded model (src/generation/backends.py)."""
    from src.common.chat_formats import resolve_format
    from src.generation.backends import open_backend, open_served
    from src.generation.stops import folder_stop_token_ids, stop_token_ids
    from src.models.loading import load_config

    if cfg.backend == "openai":
        fmt = resolve_format(tokenizer, load_config(cfg.model) if Path(cfg.model).is_dir() else None, cfg.format)
        backend = open_served(cfg.api_base, cfg.api_model, tokenizer, timeout=cfg.api_timeout,
                              concurrency=cfg.concurrency)
        return backend, fmt, folder_stop_token_ids(cfg.model, tokenizer, fmt)
    model = load_scoring_model(cfg, dtype, device)
    fmt = resolve_format(tokenizer, getattr(model, "config", None), cfg.format)
    backend = open_backend(cfg.engine, model, tokenizer, batch_size=batch_size, max_padding=cfg.max_padding,
                           prefix_cache=cfg.prefix_cache, prefill_batch=cfg.prefill_batch)
    return backend, fmt, stop_token_ids(tokenizer, fmt, model)


def predict_mine(cfg: EvalConfig, mine: list[dict], tokenizer, out: Path, state, counts: dict, batch_size: int,
                 dtype, stats: dict, fps: dict, whole_answer: bool = False) -> str:
    """Predict this process's pending records with this run's backend, appending each prediction to --out as it is
    made (``whole_answer``: MMedBench, no stop at the first line). Returns the chat format's name."""
    from src.common.openai_client import ApiError
    from src.evaluate.predict import generation_config, predict_records

    backend, fmt, stops = open_scoring_backend(cfg, tokenizer, dtype, state.device, batch_size)
    where = (f"through {backend.client.base} ({backend.engine}, model {backend.client.model or 'the server default'}, "
             f"concurrency {cfg.concurrency})" if cfg.backend == "openai" else
             f"on {state.num_processes} process(es); dtype={str(dtype).replace('torch.', '')} device={state.device} "
             f"engine={cfg.engine}")
    if state.is_main_process:
        print(f"[step 4] {cfg.model}: {counts['items']} items, {counts['done']} already done, {counts['pending']} to "
              f"go {where}; mode={cfg.mode} format={fmt.name} stop ids={stops}", flush=True)
    world, rank = state.num_processes, state.process_index
    target = out / PRED if world == 1 else out / PARTS / f"predictions.rank{rank}.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(target)
    config = generation_config(tokenizer, fmt, max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                               whole_answer=whole_answer, stop_ids=stops)
    with target.open("a", encoding="utf-8") as fh:
        def append(pred: dict):
            pred["fingerprint"] = fps[pred["id"]]
            fh.write(dumps(pred) + "\n")
            fh.flush()
        try:
            predict_records(backend, tokenizer, mine, config, mode=cfg.mode, callback=append,
                            progress=not cfg.no_progress and state.is_main_process, stats=stats)
        except ApiError as e:  # a server that failed for good: what it answered is kept and resumed
            raise SystemExit(f"[step 4] {e} (predictions made so far are kept in {target}; rerun the same command to "
                             f"resume)") from None
    return fmt.name


def gather_stats(stats: dict, world: int) -> list[dict]:
    if world == 1:
        return [stats]
    import torch.distributed as dist

    all_stats = [None] * world
    dist.all_gather_object(all_stats, stats)
    return all_stats


def merge_predictions(out: Path, records: list[dict], fps: dict) -> list[dict]:
    """predictions.jsonl in input order with the per-process parts folded in (predictions of other items kept at the
    end; a stale one never wins); returns the predictions of ``records``."""
    by_id: dict = {}
    for pr in read_all_predictions(out):
        if pr["id"] not in fps or pr.get("fingerprint") == fps[pr["id"]]:
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
    return selected


def shown(path) -> str:
    """A path as reports show it: from the repository root when it lies inside it (the defaults), else as given."""
    return repo_relative(path) if Path(str(path)).is_absolute() else str(path)


def write_scores(out: Path, cfg: EvalConfig, selected: list[dict], records: list[dict] | None = None) -> str:
    """score.json and score.md; returns the table. ``records``: the MMedBench records (None for XMedBench)."""
    if records is not None:
        return write_mmedbench_scores(out, cfg, selected, records)
    from src.evaluate.scoring import format_table, score

    result = score(selected, cfg.exclude_source)
    header = (f"# Step 4 scores: {shown(cfg.model)}\n\ninput: `{shown(cfg.input)}`, {len(selected)} items, "
              f"mode {cfg.mode}, max_new_tokens {cfg.max_new_tokens}. Accuracy in %, 95% intervals "
              f"({result['ci_method']}).\n\n")
    return _write_score_files(out, result, header, format_table(result))


def write_mmedbench_scores(out: Path, cfg: EvalConfig, selected: list[dict], records: list[dict]) -> str:
    from src.evaluate.mmedlm_scoring import format_table, score

    result = score(selected, records, cfg.parsing, cfg.rationale_metric, progress=not cfg.no_progress)
    header = (f"# Step 4 scores (MMedBench): {shown(cfg.model)}\n\ninput: `{shown(cfg.input)}`, "
              f"{len(selected)} items, max_new_tokens {cfg.max_new_tokens}, parsing {cfg.parsing}, rationale metric "
              f"{cfg.rationale_metric}. Accuracy and similarity in %, 95% intervals (docs/mmedbench.md).\n\n")
    return _write_score_files(out, result, header, format_table(result))


def _write_score_files(out: Path, result: dict, header: str, table: str) -> str:
    """score.json (the result) and score.md (header and table); returns the table for the terminal."""
    write_json(out / "score.json", result)
    write_text(out / "score.md", header + table)
    return table


def engine_totals(all_stats: list[dict]) -> dict:
    """The engine counters of every process, summed (stop reasons per reason)."""
    totals: Counter = Counter()
    stops: Counter = Counter()
    for s in all_stats:
        totals.update({k: v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        stops.update(s.get("stops") or {})
    return {**totals, "stops": dict(stops)}


def predict_pending(cfg: EvalConfig, state, tokenizer, out: Path, records: list[dict], pending: list[dict],
                    mine: list[dict], dtype, fps: dict,
                    whole_answer: bool = False) -> tuple[str | None, list[dict], int]:
    """Predict this process's share (``mine``) of the items without a reusable prediction, appending each to --out
    (``whole_answer``: MMedBench, no stop at the first line). Returns the chat format's name, every process's engine
    counters and the batch size."""
    world = state.num_processes
    batch_size = cfg.batch_size or (64 if state.device.type == "cuda" else 16)
    stats: dict = {}
    fmt_name = None
    if mine and cfg.backend == "openai" and world > 1:
        raise SystemExit("[step 4] --backend openai runs in one process (use --concurrency for parallel requests)")
    if mine:
        counts = {"items": len(records), "done": len(records) - len(pending), "pending": len(pending)}
        fmt_name = predict_mine(cfg, mine, tokenizer, out, state, counts, batch_size, dtype, stats, fps, whole_answer)
    elif state.is_main_process:
        print(f"[step 4] all {len(records)} items already predicted in {out}", flush=True)
        fmt_name = format_name(cfg, tokenizer)  # run.json names it on every run (scripts read it back)
    all_stats = gather_stats(stats, world)
    state.wait_for_everyone()
    return fmt_name, all_stats, batch_size


def write_status(out: Path, settings: dict, status: str, records: list[dict], fps: dict, state,
                 error: BaseException | None = None) -> None:
    """run.json while predicting ("running") and after a run that stopped before scoring ("interrupted" by Ctrl-C,
    or "failed"), with how many items have a prediction so far. The finished run's run.json replaces it."""
    if not state.is_main_process:
        return
    from src.common.cli import describe

    predicted = len(done_ids(out, fps, main_proc=False))
    entry = {"settings": settings, "status": status, "items": len(records), "predicted": predicted,
             "to_go": len(records) - predicted}
    if status == "failed":
        entry["error"] = str(error.code) if isinstance(error, SystemExit) else describe(error)[0]
    write_json(out / "run.json", entry)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    import torch
    from accelerate import PartialState

    from src.generation.backends import choose_engine
    from src.models.loading import load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    kwargs = {}
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["backend"] = "gloo"  # several CPU processes (tests, CI): accelerate needs gloo named explicitly
    state = PartialState(**kwargs)
    world = state.num_processes
    t_start = time.time()

    records = select_records(cfg)
    whole_answer = mmedlm.configure_run(cfg, records)  # MMedBench: its defaults and checks
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = XMEDBENCH_MAX_NEW_TOKENS
    check_models(cfg)
    dtype = _dtype(cfg.dtype, state.device)
    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    cfg.engine = choose_engine(cfg.engine, state.device)  # run.json records the engine that ran
    settings = run_settings(cfg, dtype)
    out = cfg.out
    prepare_out(out, settings, cfg.overwrite, state)
    fps = item_fingerprints(records, settings, cfg)
    done = done_ids(out, fps, state.is_main_process)
    pending = [r for r in records if r["id"] not in done]
    mine = shard(pending, world, state.process_index)
    state.wait_for_everyone()  # every process has read the same done ids before any of them appends new ones

    write_status(out, settings, "running", records, fps, state)  # after every check: a failed start writes none
    try:
        fmt_name, all_stats, batch_size = predict_pending(cfg, state, tokenizer, out, records, pending, mine, dtype,
                                                          fps, whole_answer)
    except BaseException as e:  # Ctrl-C or an error: run.json says so, with the counts; the same command resumes
        write_status(out, settings, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", records, fps,
                     state, error=e)
        raise
    if not state.is_main_process:
        return 0

    try:
        selected = merge_predictions(out, records, fps)
        table = write_scores(out, cfg, selected, records if whole_answer else None)
    except BaseException as e:  # items without a prediction (a process failed), or scoring failed: run.json says so
        write_status(out, settings, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed", records, fps,
                     state, error=e)
        raise
    seconds = time.time() - t_start
    new_items = sum(s.get("items", 0) for s in all_stats)
    engine_seconds = max([s.get("seconds", 0.0) for s in all_stats] or [0.0])
    write_json(out / "run.json", {
        "settings": {**settings, "format": cfg.format, "resolved_format": fmt_name, "batch_size": batch_size},
        "status": "done", "processes": world, "device": str(state.device), "torch": torch.__version__,
        "items": len(records), "predicted_now": new_items, "resumed": len(records) - len(pending),
        "wall_seconds": round(seconds, 2), "engine_seconds": round(engine_seconds, 2),
        "items_per_second": round(new_items / engine_seconds, 4) if engine_seconds else None,
        "engine": engine_totals(all_stats),
    })
    print(table, end="")
    print(f"[step 4] {len(selected)} items scored -> {out}/score.json, score.md, predictions.jsonl"
          + (f" ({new_items} predicted now, {new_items / engine_seconds:.2f} items/s)" if engine_seconds else ""))
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
