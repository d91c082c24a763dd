"""Step 1 prompts -> an lm-evaluation-harness task folder, so the harness scores any model on our exact prompts.

    python -m util.export_lm_eval --input data/<exp>/test.jsonl --out DIR [--overwrite]
    lm_eval --include_path DIR --tasks xmedbench --model hf --model_args pretrained=MODEL --num_fewshot 0

Writes one task per language, ``xmedbench_<lang>`` (``DIR/xmedbench_<lang>.yaml`` and its local data file
``DIR/data/<lang>.jsonl``), and the group ``xmedbench`` over them (``DIR/xmedbench.yaml``, accuracy averaged over
items). Each task is multiple choice over the item's own letters: the context is step 1's prompt (shots included,
so the harness adds none: ``--num_fewshot 0``) + the answer phrase + ``(``, and each choice is one letter with no
delimiter, which is how step 4's ``--mode loglik`` scores (the harness's ``acc`` is then our letter's accuracy).
The YAML files name their data files by absolute path, so the folder is meant to stay where it was written.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from src.common.errors import DataError
from src.common.io import iter_jsonl, write_jsonl

GROUP = "xmedbench"
REQUIRED = ("id", "source", "language", "prompt", "answer", "letters")


def doc_of(rec: dict, path: Path, line: int) -> dict:
    """One harness document from one step 1 record."""
    for f in REQUIRED:
        if rec.get(f) in (None, "", []):
            raise DataError(path, line, f, "missing (is this a step 1 test.jsonl/dev.jsonl?)")
    if rec["answer"] not in rec["letters"]:
        raise DataError(path, line, "answer", f"{rec['answer']!r} is not one of the letters {rec['letters']}")
    return {"id": rec["id"], "source": rec["source"], "language": rec["language"],
            "query": rec["prompt"] + rec.get("answer_phrase", "") + "(", "choices": list(rec["letters"]),
            "gold": rec["letters"].index(rec["answer"])}


def task_yaml(name: str, data_file: Path) -> str:
    # JSON is valid YAML: the strings are quoted exactly, whatever characters a path holds.
    config = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test", "output_type": "multiple_choice",
        "doc_to_text": "query", "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return json.dumps(config, ensure_ascii=False, indent=1) + "\n"


def group_yaml(tasks: list[str]) -> str:
    config = {"group": GROUP, "task": tasks,
              "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
              "metadata": {"version": 1.0}}
    return json.dumps(config, indent=1) + "\n"


def export(input_path: Path, out: Path, overwrite: bool = False) -> dict:
    """Write the task folder; returns the report (items per language, tasks)."""
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path}: input not found (make it with 1.data_process_test_dev.sh)")
    if (out / f"{GROUP}.yaml").exists() and not overwrite:
        raise SystemExit(f"{out} already holds an exported task folder; use --overwrite or another --out")
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for n, rec in enumerate(iter_jsonl(input_path), 1):
        by_lang[rec.get("language") or ""].append(doc_of(rec, input_path, n))
    if not by_lang:
        raise SystemExit(f"{input_path}: no records")
    data_dir = (out / "data").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for lang in sorted(by_lang):
        name = f"{GROUP}_{lang}"
        write_jsonl(data_dir / f"{lang}.jsonl", by_lang[lang])
        (out / f"{name}.yaml").write_text(task_yaml(name, data_dir / f"{lang}.jsonl"), encoding="utf-8")
        tasks.append(name)
    (out / f"{GROUP}.yaml").write_text(group_yaml(tasks), encoding="utf-8")
    return {"input": str(input_path), "out": str(out), "items": sum(len(v) for v in by_lang.values()),
            "by_language": {lang: len(v) for lang, v in sorted(by_lang.items())}, "tasks": tasks}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, required=True, help="step 1 test.jsonl or dev.jsonl")
    p.add_argument("--out", type=Path, required=True, help="task folder to write (for lm_eval --include_path)")
    p.add_argument("--overwrite", action="store_true", help="replace a task folder already in --out")
    args = p.parse_args(argv)
    report = export(args.input, args.out, args.overwrite)
    print(f"[export_lm_eval] read {report['items']} records from {args.input}, wrote {len(report['tasks'])} tasks "
          f"({', '.join(f'{k} {v}' for k, v in report['by_language'].items())}) and the group '{GROUP}' -> {args.out}")
    print(f"  run: lm_eval --include_path {args.out} --tasks {GROUP} --model hf --model_args pretrained=MODEL "
          f"--num_fewshot 0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
