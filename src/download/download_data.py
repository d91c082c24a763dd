"""Step 0: fetch the training data, the benchmark and a base model.

Two modes:
* ``--sample`` (the default, and the only one that works offline): install the embedded default, our own small sample
  in the release formats from ``assets/sample/`` into ``data/raw/sample/`` and SmolLM2-135M-Instruct converted from
  GGUF into ``models/SmolLM2-135M-Instruct``. Idempotent.
* ``--hub``: download FreedomIntelligence/ApolloMoEDataset, FreedomIntelligence/ApolloMoEBench and ``--model`` with
  huggingface_hub into ``data/raw/hub/`` and ``models/``, then split data and bench into major and minor parts
  (the reference's extract step, which never ran there because of a misspelled main guard).
* ``--hub --mmedbench``: MMedBench (MMedLM's benchmark, Henrychur/MMedBench: one zip) and ``--model`` instead of the
  ApolloMoE data: the zip's ``Train/`` and ``Test/`` language files go to ``data/raw/hub/MMedBench/`` (src/download/
  mmedbench_hub.py). The embedded sample has an MMedBench-format part of its own (``data/raw/sample/mmedbench/``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from src.common.defaults import DEFAULT_MODEL_NAME, ROOT
from src.common.io import copy_file
from src.download.config import HUB_MODEL, DownloadConfig
from src.download.embedded import convert_gguf

ASSET_SAMPLE_DIR = ROOT / "assets" / "sample"  # shipped in the repo; step 0 copies it to data/raw/sample
# the sample's bench and training records, and the medical text of the QA rewriting stage (scripts/make_qa.sh)
SAMPLE_FILES = ("bench_test.json", "bench_dev.json", "train.json",
                *sorted(f"text/{p.name}" for p in (ASSET_SAMPLE_DIR / "text").glob("*_text.json")),
                *sorted(str(p.relative_to(ASSET_SAMPLE_DIR)) for p in (ASSET_SAMPLE_DIR / "mmedbench").glob("*/*.jsonl")))
HUB_DATASET = "FreedomIntelligence/ApolloMoEDataset"
HUB_BENCH = "FreedomIntelligence/ApolloMoEBench"


def split_by_class(path: Path, out_stem: Path) -> dict[str, int]:
    """Stream the release records of ``path`` into ``<out_stem>_major.json`` and ``<out_stem>_minor.json`` by their
    ``class`` field; a record without a valid class is an error naming it. Returns the counts."""
    from src.common.errors import DataError
    from src.common.io import JsonArrayWriter, iter_json_array

    writers = {cls: JsonArrayWriter(f"{out_stem}_{cls}.json") for cls in ("major", "minor")}
    try:
        for i, rec in enumerate(iter_json_array(path)):
            cls = rec.get("class") if isinstance(rec, dict) else None
            if cls not in writers:
                raise DataError(path, i, "class", f"expected 'major' or 'minor', got {cls!r}")
            writers[cls].write(rec)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    return {cls: w.count for cls, w in writers.items()}


def install_sample(data_dir: Path, models_dir: Path) -> dict:
    out = data_dir / "sample"
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SAMPLE_FILES:
        src, dst = ASSET_SAMPLE_DIR / name, out / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            copy_file(src, dst)  # whole or not at all: a half-copied sample is never read
            copied.append(name)
    model_dir = models_dir / DEFAULT_MODEL_NAME
    t = time.time()
    converted = convert_gguf(model_dir)
    return {"mode": "sample", "data": str(out), "files_copied": copied, "files_up_to_date": len(SAMPLE_FILES) - len(copied),
            "model": str(model_dir), "model_converted": converted,
            "model_seconds": round(time.time() - t, 1) if converted else 0.0}


def download_hub(data_dir: Path, models_dir: Path, model: str, dataset_file: str, bench_file: str,
                 mmedbench: bool = False) -> dict:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SystemExit("--hub needs network access to the Hugging Face hub, but HF_HUB_OFFLINE=1 is set")
    from huggingface_hub import hf_hub_download, snapshot_download

    hub_dir = data_dir / "hub"
    report: dict = {"mode": "hub", "model": model}
    if mmedbench:
        from src.download.mmedbench_hub import download_mmedbench

        report["mmedbench"] = download_mmedbench(hub_dir)
    apollo = [] if mmedbench else [(HUB_DATASET, dataset_file, "train"), (HUB_BENCH, bench_file, "bench")]
    for repo, fname, stem in apollo:
        local = Path(hf_hub_download(repo_id=repo, filename=fname, repo_type="dataset",
                                     local_dir=hub_dir / repo.split("/")[1]))
        report[stem] = {"file": str(local), **split_by_class(local, hub_dir / stem)}
    model_dir = models_dir / model.split("/")[-1]
    snapshot_download(repo_id=model, local_dir=model_dir)
    report["model_dir"] = str(model_dir)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="0.download_data.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sample", action="store_true", help="install the embedded default (default)")
    mode.add_argument("--hub", action="store_true", help="download the real data, bench and --model from the hub")
    p.add_argument("--model", default=HUB_MODEL, help="base model repo id for --hub (default: %(default)s)")
    p.add_argument("--dataset-file", default="ApolloMoEDataset.json",
                   help="file of the dataset repo to fetch with --hub (the 609 MB ApolloMoEDataset_sample.json "
                        "is a smaller alternative; default: %(default)s)")
    p.add_argument("--bench-file", default="ApolloMoEBench.json", help="file of the bench repo (default: %(default)s)")
    p.add_argument("--mmedbench", action="store_true",
                   help="with --hub: download MMedBench (MMedLM's benchmark) and --model instead of the ApolloMoE "
                        "data and bench (docs/mmedbench.md)")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "raw")
    p.add_argument("--models-dir", type=Path, default=ROOT / "models")
    return p


def main(argv: list[str] | None = None) -> int:
    config = DownloadConfig.from_args(build_parser().parse_args(argv))
    if config.hub:
        report = download_hub(config.data_dir, config.models_dir, config.model, config.dataset_file,
                              config.bench_file, config.mmedbench)
    else:
        report = install_sample(config.data_dir, config.models_dir)
    print("[step 0] " + ", ".join(f"{k}={v}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
