"""Step 1 for MMedBench: MMedLM's zero-shot prompts for the Test split (``1.data_process_test_dev.sh --bench DIR``).

Called by ``src.prepare.bench_prompts`` (with its ``PromptConfig``) when ``--bench`` is an MMedBench release (or a
split folder, or one language file). Writes ``test.jsonl`` (one record per item, ``task: "mmedbench"``),
``rejects.jsonl`` and ``report.json``; MMedBench has no dev split, so no ``dev.jsonl``. A record carries what step 4
needs: the gold letters (``answers``, several for some items; ``answer`` = them joined by ","; ``answer_idx`` = the
gold string as MMedLM reads it), the gold ``rationale``, the ``human_checked``/``human_check_passed`` flags and
``with_rationale``.

``--prompt-style fixed`` (default) or ``mmedlm`` (src/prepare/mmedlm_prompts.py); ``--rationale with`` (default:
the model writes a rationale, then its answer) or ``without`` (answer only: the prompt of MMedLM's accuracy table);
``--format raw`` for MMedLM's layout without a chat template. ``--max-tokens``: with ``fixed`` an item whose prompt
is longer is left out (listed in the report and rejects.jsonl); ``mmedlm`` keeps it, as MMedLM does, and counts it.
"""
from __future__ import annotations

import time
from collections import Counter

from src.common.errors import UsageError
from src.common.io import file_sha256, write_json, write_jsonl
from src.common.languages import family_id
from src.models.loading import load_tokenizer_and_format
from src.common.rerun import check_rerun, normalised
from src.prepare import mmedlm_prompts as prompts
from src.evaluate.records import STEP1_FORMAT_VERSION, STEP1_REPORT
from src.prepare.config import PromptConfig
from src.prepare.mmedbench import LANGUAGES, TASK, MMedItem, load_split, split_files


def record(item: MMedItem, prompt: str, n_tokens: int, style: str, with_rationale: bool) -> dict:
    return {
        "id": item.id, "task": TASK, "source": f"mmedbench-{item.language}", "language": item.language,
        "family": family_id(item.language), "prompt": prompt, "answer": item.answer, "answers": list(item.answers),
        "answer_idx": item.answer_idx, "letters": item.letters, "shots": [], "prompt_tokens": n_tokens,
        "with_rationale": with_rationale, "prompt_style": style, "rationale": item.rationale,
        "human_checked": item.human_checked, "human_check_passed": item.human_check_passed,
        "question": item.question, "options": dict(item.options), "file": item.language_name,
    }


def build_records(items: list[MMedItem], fmt, tokenizer, style: str, with_rationale: bool,
                  max_tokens: int) -> tuple[list[dict], list[dict]]:
    """Records in item order and the items left out for length (fixed style only)."""
    texts = [fmt.prefix + fmt.exchange(prompts.alpaca_prompt(it, with_rationale, style)) for it in items]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    records, too_long = [], []
    for it, text, n in zip(items, texts, lengths):
        if style == "fixed" and n > max_tokens:
            too_long.append({"file": str(it.file), "index": it.index, "id": it.id, "field": "prompt",
                             "reason": f"prompt has {n} tokens, over the budget of {max_tokens}"})
            continue
        records.append(record(it, text, n, style, with_rationale))
    return records, too_long


def _report(records: list[dict], items: list[MMedItem], settings: dict, fmt, style, too_long, rejects) -> dict:
    by_language = Counter(r["language"] for r in records)
    return {
        "format_version": STEP1_FORMAT_VERSION, "settings": normalised(settings), "benchmark": "mmedbench",
        "bench_files": [str(f) for f in split_files(settings["bench"], "Test")], "model": str(settings["model"]),
        "format": fmt.to_dict(), "prompt_style": style, "with_rationale": settings["rationale"] == "with",
        "shots": 0, "dev": None,
        "test": {
            "read": len(items) + len(rejects), "written": len(records), "over_budget": len(too_long),
            "over_max_tokens_kept": sum(r["prompt_tokens"] > settings["max_tokens"] for r in records),
            "rejected_malformed": len(rejects),
            "by_language": {code: by_language[code] for code in LANGUAGES.values() if by_language[code]},
            "several_answers": sum(len(r["answers"]) > 1 for r in records),
            "human_check_passed": sum(r["human_check_passed"] for r in records),
            "without_check_flags": sum(not it.has_check_flags for it in items),
            "empty_rationale": sum(not r["rationale"].strip() for r in records),
            "max_prompt_tokens": max((r["prompt_tokens"] for r in records), default=0),
        },
    }


def run(config: PromptConfig) -> int:
    style, rationale, out, settings = config.prompt_style, config.rationale, config.out, config.settings()
    check_rerun(out, STEP1_REPORT, settings, config.overwrite, "step 1")
    t0 = time.time()
    tokenizer, fmt = load_tokenizer_and_format(config.model, config.format)
    items, rejects = load_split(config.bench, "Test", config.on_error == "skip")
    records, too_long = build_records(items, fmt, tokenizer, style, rationale == "with", config.max_tokens)
    if items and not records:
        raise UsageError("--max-tokens", f"no test item fits in {config.max_tokens} tokens")
    out.mkdir(parents=True, exist_ok=True)
    (out / STEP1_REPORT).unlink(missing_ok=True)  # the mark of a complete folder goes until the new files are in
    write_jsonl(out / "test.jsonl", records)
    write_jsonl(out / "rejects.jsonl", rejects + too_long)
    report = _report(records, items, settings, fmt, style, too_long, rejects)
    # what step 4 checks that it reads (src/evaluate/records.py); MMedBench writes no dev.jsonl
    report["files"] = {"test.jsonl": {"sha256": file_sha256(out / "test.jsonl")}}
    write_json(out / STEP1_REPORT, report)  # last: it marks a complete folder
    t = report["test"]
    print(f"[step 1] MMedBench: format={fmt.name} prompts={style} rationale={rationale} zero-shot -> {out}")
    print(f"  test: read {t['read']}, wrote {t['written']}, over budget {t['over_budget']}, malformed "
          f"{t['rejected_malformed']}" + (f" (see {out / 'rejects.jsonl'})" if rejects or too_long else ""))
    print(f"  languages: {', '.join(f'{k} {v}' for k, v in t['by_language'].items())}; several answers "
          f"{t['several_answers']}; rationales passed by a doctor {t['human_check_passed']}; longest prompt "
          f"{t['max_prompt_tokens']} tokens")
    print(f"  done in {time.time() - t0:.1f}s")
    return 0
