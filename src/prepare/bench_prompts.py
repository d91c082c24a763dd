"""Step 1: build k-shot XMedBench prompts (test.jsonl, dev.jsonl) for one model's chat format.

Each output line is one item: a stable ``id``, ``source``, ``language``, ``family``, the full ``prompt``, the gold
``answer`` letter, the item's option ``letters``, the ``shots`` used (ids), ``prompt_tokens``, the ``answer_phrase``
(for log-likelihood scoring), and the original ``question``/``options``/``context``.

An MMedBench release as ``--bench`` (a folder with Test/, a split folder or one language file) gets MMedLM's
zero-shot prompts instead (src/prepare/mmedbench_step1.py, docs/mmedbench.md).

Shots are drawn (seeded) from the dev pool of the same source when a dev file is given, else from the other test
items of the same source. ``--prompt-style fixed`` (default): prompts must fit ``--max-tokens`` tokens of the model's
tokenizer: shots are dropped first; an item that does not fit even with zero shots is left out and listed in the report
and the rejects file. ``--prompt-style paper``: the reference's prompts and its 4,096-character rule (a shot is kept
when it fits; an item over the limit is rejected and reported). docs/prompts.md lists the differences.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

from src.common.chat_formats import FORMAT_NAMES
from src.common.defaults import DEFAULT_MODEL, repo_relative
from src.common.errors import UsageError
from src.common.io import file_sha256, write_json, write_jsonl
from src.common.rerun import check_rerun, normalised
from src.common.languages import family_id
from src.models.loading import load_tokenizer_and_format
from src.prepare import mmedbench_step1, mmedlm_prompts
from src.evaluate.records import STEP1_FILES, STEP1_FORMAT_VERSION, STEP1_REPORT
from src.prepare.bench_items import BenchItem, load_bench
from src.prepare.config import SAMPLE_BENCH, XMEDBENCH_SHOTS, PromptConfig
from src.prepare.prompts import PAPER_MAX_CHARS, STYLES, PromptBuilder, candidate_shots

def _token_counts(tokenizer, texts: list[str], desc: str, batch: int = 2048) -> list[int]:
    out: list[int] = []
    for i in tqdm(range(0, len(texts), batch), desc=desc, unit="batch", leave=False, disable=len(texts) < batch):
        out += [len(ids) for ids in tokenizer(texts[i:i + batch], add_special_tokens=False)["input_ids"]]
    return out


def build_split(items: list[BenchItem], pools: dict[str, list[BenchItem]], builder: PromptBuilder, tokenizer,
                k: int, seed: int, fixed: bool, max_tokens: int, split: str) -> tuple[list[dict], dict, list[dict]]:
    """Prompts for one split. Returns (records, report, over-budget rejects)."""
    n_read = len(items)
    shots = [candidate_shots(it, pools.get(it.source, []), k, seed, fixed) for it in items]
    if builder.style == "paper":
        items, shots, prompts, too_long = _paper_lengths(items, shots, builder)
        lengths = _token_counts(tokenizer, prompts, f"{split}: tokenizing")
    else:
        prompts, lengths, too_long = _token_budget(items, shots, builder, tokenizer, max_tokens, split)
    records = []
    for it, sh, prompt, n in zip(items, shots, prompts, lengths):
        if n is None:
            continue
        records.append({
            "id": it.id, "source": it.source, "language": it.language, "family": family_id(it.language),
            "prompt": prompt, "answer": it.answer, "letters": it.letters, "shots": [s.id for s in sh],
            "prompt_tokens": n, "answer_phrase": builder.answer_phrase(it),
            "question": it.question, "options": it.options_block(), "context": it.context,
        })
    n_shots = Counter(len(r["shots"]) for r in records)
    report = {
        "read": n_read, "written": len(records),
        "over_budget": len(too_long),
        "shots_histogram": {str(n): c for n, c in sorted(n_shots.items())},
        "fewer_than_k_shots": sum(c for n, c in n_shots.items() if n < k),
        "by_source": dict(sorted(Counter(r["source"] for r in records).items())),
        "by_language": dict(sorted(Counter(r["language"] for r in records).items())),
        "max_prompt_tokens": max((r["prompt_tokens"] for r in records), default=0),
    }
    if builder.style == "paper":  # the reference has no token budget: longer prompts are kept, and counted here
        report["over_max_tokens_kept"] = sum(r["prompt_tokens"] > max_tokens for r in records)
    return records, report, too_long


def _token_budget(items, shots, builder, tokenizer, max_tokens: int, split: str):
    """The fixed style's budget: drop the last shot until the prompt fits ``max_tokens``; an item that does not fit
    with zero shots gets length None and a reject. Returns (prompts, lengths, rejects); ``shots`` is cut in place."""
    prompts = [builder.prompt(s, it) for s, it in zip(shots, items)]
    lengths = _token_counts(tokenizer, prompts, f"{split}: tokenizing")
    # Over budget: drop the last shot and measure again until it fits (rare, so re-tokenizing is cheap).
    for i in [i for i, n in enumerate(lengths) if n > max_tokens]:
        while lengths[i] > max_tokens and shots[i]:
            shots[i] = shots[i][:-1]
            prompts[i] = builder.prompt(shots[i], items[i])
            lengths[i] = _token_counts(tokenizer, [prompts[i]], "")[0]
    too_long = []
    for i, (it, n) in enumerate(zip(items, lengths)):
        if n > max_tokens:
            too_long.append({"index": it.index, "id": it.id, "field": "prompt",
                             "reason": f"prompt has {n} tokens with zero shots, over the budget of {max_tokens}"})
            lengths[i] = None
    return prompts, lengths, too_long


def _paper_lengths(items, shots, builder):
    """The paper style's rule (``PromptBuilder.fit_characters``). Returns the items that fit, their shots and
    prompts, and a reject for each item the reference would have dropped."""
    kept_items, kept_shots, prompts, too_long = [], [], [], []
    for it, sh in zip(items, shots):
        fit = builder.fit_characters(sh, it)
        if fit is None:
            n = len(builder.prompt([], it))
            too_long.append({"index": it.index, "id": it.id, "field": "prompt",
                             "reason": f"prompt has {n} characters with zero shots, over the reference's limit of "
                                       f"{PAPER_MAX_CHARS} (the reference drops such an item silently)"})
            continue
        kept_items.append(it)
        kept_shots.append(fit[0])
        prompts.append(fit[1])
    return kept_items, kept_shots, prompts, too_long


def _by_source(items: list[BenchItem]) -> dict[str, list[BenchItem]]:
    pools: dict[str, list[BenchItem]] = defaultdict(list)
    for it in items:
        pools[it.source].append(it)
    return dict(pools)


def _dev_sample(test: list[BenchItem], fraction: float, seed: int) -> list[BenchItem]:
    """The reference's dev set (utils/gen_dev.py) but seeded: a fraction of each source's test items."""
    out = []
    for source, items in sorted(_by_source(test).items()):
        rng = random.Random(f"{seed}|dev|{source}")
        out += sorted(rng.sample(items, max(1, int(len(items) * fraction))), key=lambda it: it.index)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="1.data_process_test_dev.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", type=Path, default=SAMPLE_BENCH,
                   help="test items (default: the sample), or an MMedBench release: a folder with Test/ (or a "
                        "split folder, or one <Language>.jsonl) for MMedLM's zero-shot prompts (docs/mmedbench.md)")
    p.add_argument("--dev", type=Path, default=None,
                   help="dev items: the shot pool and dev.jsonl (default: the sample's dev file when --bench is the "
                        "sample; without one, dev.jsonl is a seeded 10%% sample of test, as in the reference)")
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help=f"tokenizer/config to format and count tokens for (default: {repo_relative(DEFAULT_MODEL)})")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: data/sample_<model> for the sample, else data/<bench>_<model>)")
    p.add_argument("--shots", type=int, default=None,
                   help=f"shots per prompt (default: {XMEDBENCH_SHOTS}; MMedBench prompts are zero-shot)")
    p.add_argument("--shot-mode", choices=["per-item", "fixed"], default="per-item",
                   help="per-item: shots drawn for each item (reference); fixed: the same shots for every item of a "
                        "source (shared prefix, cacheable in step 4)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-tokens", type=int, default=4096, help="prompt budget in tokens (default: %(default)s)")
    p.add_argument("--prompt-style", choices=sorted({*STYLES, *mmedlm_prompts.STYLES}), default="fixed",
                   help="fixed: the reference's strings with the documented fixes and a token budget; paper: the "
                        "reference's prompts byte for byte, with its 4,096-character rule (docs/prompts.md); "
                        "mmedlm (MMedBench): MMedLM's prompt byte for byte (docs/mmedbench.md)")
    p.add_argument("--rationale", choices=["with", "without"], default=None,
                   help="MMedBench: with (default) asks for a rationale, then the answer; without asks for the "
                        "answer only (the prompt of MMedLM's accuracy table)")
    p.add_argument("--format", choices=FORMAT_NAMES, default=None, help="chat format (default: from the model)")
    p.add_argument("--dev-fraction", type=float, default=0.1, help="dev share of test when no --dev is given")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="malformed items: stop with an error (default) or write them to rejects.jsonl and go on")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out made with other settings (a rerun with the "
                        "same settings needs no flag: it writes the same files)")
    return p


def main(argv: list[str] | None = None) -> int:
    config = PromptConfig.from_args(build_parser().parse_args(argv))
    if config.mmedbench:  # MMedBench: MMedLM's zero-shot prompts
        return mmedbench_step1.run(config)
    return run(config)


def run(config: PromptConfig) -> int:
    """Step 1 on XMedBench items: test.jsonl, dev.jsonl, rejects.jsonl and report.json (written last) in --out."""
    out, settings = config.out, config.settings()
    check_rerun(out, STEP1_REPORT, settings, config.overwrite, "step 1")
    t0 = time.time()

    tokenizer, fmt = load_tokenizer_and_format(config.model, config.format)
    builder = PromptBuilder(fmt, config.prompt_style)
    test, dev, pool, missing, rejects = load_items(config)
    fixed = config.shot_mode == "fixed"
    test_rec, test_rep, test_long = build_split(test, pool, builder, tokenizer, config.shots, config.seed, fixed,
                                                config.max_tokens, "test")
    dev_pool = _by_source(dev) if config.dev else pool
    dev_rec, dev_rep, dev_long = build_split(dev, dev_pool, builder, tokenizer, config.shots, config.seed, fixed,
                                             config.max_tokens, "dev")
    malformed = len(rejects)
    rejects += [{"file": str(config.bench), **r} for r in test_long] + \
               [{"file": str(config.dev or config.bench), **r} for r in dev_long]
    if test and not test_rec:
        if config.prompt_style == "paper":
            raise UsageError("--prompt-style", f"no test item fits the reference's limit of {PAPER_MAX_CHARS} "
                                               "characters, even with zero shots (--max-tokens does not apply here)")
        raise UsageError("--max-tokens", f"no test item fits in {config.max_tokens} tokens, even with zero shots")

    out.mkdir(parents=True, exist_ok=True)
    (out / STEP1_REPORT).unlink(missing_ok=True)  # the mark of a complete folder goes until the new files are in
    write_jsonl(out / "test.jsonl", test_rec)
    write_jsonl(out / "dev.jsonl", dev_rec)
    write_jsonl(out / "rejects.jsonl", rejects)
    report = {
        "format_version": STEP1_FORMAT_VERSION,
        "settings": normalised(settings),
        "bench": str(config.bench), "dev_file": str(config.dev) if config.dev else None, "model": str(config.model),
        "format": fmt.to_dict(), "prompt_style": config.prompt_style, "shots": config.shots,
        "shot_mode": config.shot_mode, "seed": config.seed, "max_tokens": config.max_tokens,
        "shot_pool": "dev items of the same source" if config.dev else "other test items of the same source",
        "sources_without_dev_items": missing,
        "dev_is_subset_of_test": not config.dev,
        "rejected_malformed": malformed,
        "test": test_rep, "dev": dev_rep,
        # what step 4 and step 3's dev evaluation check that they read (src/evaluate/records.py)
        "files": {name: {"sha256": file_sha256(out / name)} for name in STEP1_FILES},
    }
    write_json(out / STEP1_REPORT, report)  # last: it marks a complete folder
    print_summary(config, fmt, report, bool(rejects), time.time() - t0)
    return 0


def load_items(config: PromptConfig) -> tuple[list, list, dict, list[str], list[dict]]:
    """Test items, dev items, the shot pool per source, the sources whose shots come from their own test items
    (no dev items), and the malformed items rejected (``--on-error skip``)."""
    skip = config.on_error == "skip"
    test, rejects = load_bench(config.bench, skip)
    if not config.dev:
        return test, _dev_sample(test, config.dev_fraction, config.seed), _by_source(test), [], rejects
    dev, dev_rejects = load_bench(config.dev, skip)
    pool = _by_source(dev)
    missing = sorted(set(_by_source(test)) - set(pool))
    for source in missing:  # a source with no dev items draws its shots from its own test items
        pool[source] = _by_source(test)[source]
    return test, dev, pool, missing, rejects + dev_rejects


def print_summary(config: PromptConfig, fmt, report: dict, any_rejects: bool, seconds: float) -> None:
    out = config.out
    print(f"[step 1] format={fmt.name} prompts={config.prompt_style} shots={config.shots} ({config.shot_mode}) "
          f"seed={config.seed} -> {out}")
    for split in ("test", "dev"):
        rep = report[split]
        print(f"  {split}: read {rep['read']}, wrote {rep['written']}, over budget {rep['over_budget']}, "
              f"fewer than {config.shots} shots {rep['fewer_than_k_shots']}, languages {len(rep['by_language'])}, "
              f"longest prompt {rep['max_prompt_tokens']} tokens")
    print(f"  malformed items rejected: {report['rejected_malformed']}"
          + (f" (see {out / 'rejects.jsonl'})" if any_rejects else ""))
    if not config.dev:
        print("  note: no --dev given, so dev.jsonl is a sample of test (checkpoint selection on it leaks test)")
    print(f"  done in {seconds:.1f}s")


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
