"""Step 1 prompts -> an lm-evaluation-harness task folder, so the harness scores any model on our exact prompts.

    python -m util.export_lm_eval --input data/<exp>/test.jsonl --out DIR [--overwrite]
    lm_eval --include_path DIR --tasks xmedbench --model hf --model_args pretrained=MODEL --num_fewshot 0

Each language's row, ``xmedbench_<lang>``, is computed the way the reference's collector computes that language
(``src.common.languages.score_method``), so it is the number step 4's score.json gives it:

* a language scored by pooled counts (de, fr, it, pt) or with a single source is one task over all its items
  (``DIR/xmedbench_<lang>.yaml``, data in ``DIR/data/<lang>.jsonl``);
* a language scored as the mean of its source accuracies (en, zh) with several sources is a group over one task per
  source (``xmedbench_<lang>_<source>``), averaged unweighted.

The group ``xmedbench`` runs them all; its ``acc`` is the share of all items answered correctly (score.json's
``accuracy_items``). The paper's "Major" (the unweighted mean of the 12 languages) is not a harness aggregate: the
harness averages a group over its leaf tasks, not its subgroups; take the mean of the language rows.

Each task is multiple choice over the item's own letters: the context is step 1's prompt (shots included, so the
harness adds none: ``--num_fewshot 0``) + the answer phrase + ``(``, and each choice is one letter with no delimiter,
which is how step 4's ``--mode loglik`` scores (the harness's ``acc`` is then our letter's accuracy). The YAML files
name their data files by absolute path, so the folder is meant to stay where it was written.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from src.common.errors import DataError, UsageError
from src.common.io import write_jsonl
from src.common.languages import score_method
from src.evaluate.records import load_records

GROUP = "xmedbench"
FIELDS = ("id", "source", "language", "prompt", "answer", "letters")


def doc_of(rec: dict, path: Path, line: int) -> dict:
    """One harness document from one step 1 record (already checked by ``load_records``)."""
    if rec.get("task") is not None:  # one gold letter per item is what the harness's multiple choice scores
        raise DataError(path, line, "task", f"{rec['task']!r} records are generated and read by step 4 (several "
                                            f"answers, rationales), not exported; export XMedBench records")
    try:
        score_method(rec["language"])
    except ValueError as e:
        raise DataError(path, line, "language", str(e)) from None
    return {"id": rec["id"], "source": rec["source"], "language": rec["language"],
            "query": rec["prompt"] + (rec.get("answer_phrase") or "") + "(", "choices": list(rec["letters"]),
            "gold": rec["letters"].index(rec["answer"])}


def file_stem(name: str) -> str:
    """A source name as part of a file and task name: anything but letters, digits, '-', '_' and '.' becomes '_'."""
    return re.sub(r"[^\w.-]", "_", name, flags=re.ASCII)


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


def group_yaml(name: str, tasks: list[str], weight_by_size: bool) -> str:
    """A group's accuracy: pooled over its items (``weight_by_size``) or the unweighted mean of its tasks."""
    config = {"group": name, "task": tasks,
              "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": weight_by_size}],
              "metadata": {"version": 1.0}}
    return json.dumps(config, indent=1) + "\n"


def export(input_path: Path, out: Path, overwrite: bool = False) -> dict:
    """Write the task folder; returns the report (items per language, tasks, groups)."""
    if (out / f"{GROUP}.yaml").exists() and not overwrite:
        raise SystemExit(f"{out} already holds an exported task folder; use --overwrite or another --out")
    by_lang: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))  # language -> source -> docs
    for n, rec in enumerate(load_records(input_path, FIELDS), 1):
        doc = doc_of(rec, input_path, n)
        by_lang[doc["language"]][doc["source"]].append(doc)
    if not by_lang:
        raise SystemExit(f"{input_path}: no records")
    data_dir = (out / "data").resolve()
    if input_path.resolve().parent == data_dir:
        raise UsageError("--out", f"{out} holds the input {input_path} in its data/ folder, which an export "
                                  f"rewrites; choose another --out")
    _remove_earlier_export(out, data_dir)  # --overwrite: no task of an earlier export may be run by mistake
    data_dir.mkdir(parents=True, exist_ok=True)

    def write_task(name: str, stem: str, docs: list[dict]) -> str:
        if (data_dir / f"{stem}.jsonl").exists():  # two source names that differ only in characters file_stem replaces
            raise ValueError(f"{input_path}: sources {sorted({d['source'] for d in docs})} and another one share the "
                             f"file name {stem}.jsonl; rename one of them")
        write_jsonl(data_dir / f"{stem}.jsonl", docs)
        (out / f"{name}.yaml").write_text(task_yaml(name, data_dir / f"{stem}.jsonl"), encoding="utf-8")
        return name

    tasks, groups, rows = [], {}, []
    for lang in sorted(by_lang):
        sources, row = by_lang[lang], f"{GROUP}_{lang}"
        if score_method(lang) == "macro" and len(sources) > 1:  # the mean of its source accuracies
            members = [write_task(f"{row}_{file_stem(src)}", f"{lang}_{file_stem(src)}", docs)
                       for src, docs in sorted(sources.items())]
            (out / f"{row}.yaml").write_text(group_yaml(row, members, weight_by_size=False), encoding="utf-8")
            tasks += members
            groups[row] = members
        else:  # pooled counts (or a single source)
            tasks.append(write_task(row, lang, [d for docs in sources.values() for d in docs]))
        rows.append(row)
    (out / f"{GROUP}.yaml").write_text(group_yaml(GROUP, rows, weight_by_size=True), encoding="utf-8")
    groups[GROUP] = rows
    return {"input": str(input_path), "out": str(out),
            "items": sum(len(docs) for sources in by_lang.values() for docs in sources.values()),
            "by_language": {lang: sum(len(d) for d in sources.values()) for lang, sources in sorted(by_lang.items())},
            "tasks": tasks, "groups": groups, "language_rows": rows}


def _remove_earlier_export(out: Path, data_dir: Path) -> None:
    """The files an earlier export wrote into ``out`` (its task and group files, its data files), nothing else."""
    for path in [*out.glob(f"{GROUP}*.yaml"), *data_dir.glob("*.jsonl")]:
        path.unlink()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m util.export_lm_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, required=True, help="step 1 test.jsonl or dev.jsonl")
    p.add_argument("--out", type=Path, required=True, help="task folder to write (for lm_eval --include_path)")
    p.add_argument("--overwrite", action="store_true", help="replace a task folder already in --out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    report = export(args.input, args.out, args.overwrite)
    print(f"[export_lm_eval] read {report['items']} records from {args.input}, wrote {len(report['tasks'])} tasks "
          f"and {len(report['groups'])} groups: one row per language "
          f"({', '.join(f'{k} {v}' for k, v in report['by_language'].items())}) and the group '{GROUP}' -> {args.out}")
    print(f"  run: lm_eval --include_path {args.out} --tasks {GROUP} --model hf --model_args pretrained=MODEL "
          f"--num_fewshot 0")
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
