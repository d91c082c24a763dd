"""MMedBench from the hub (``0.download_data.sh --hub --mmedbench``): the dataset Henrychur/MMedBench is one zip.

The zip is unpacked member by member: only ``<...>/Train/<Language>.jsonl`` and ``<...>/Test/<Language>.jsonl``
files are taken (whatever folder the zip wraps them in), written to ``data/raw/hub/MMedBench/{Train,Test}/``; any
other member is counted and skipped, and no member's path is ever used to choose where a file is written, so a
crafted name (``../x``, an absolute path) cannot write outside that folder. Then both splits are read and validated
(src/prepare/mmedbench.py), and the report gives the items per split and language.
"""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path, PurePosixPath

from src.prepare.mmedbench import LANGUAGES, SPLITS, load_split

HUB_REPO = "Henrychur/MMedBench"
HUB_FILE = "MMedBench.zip"
FOLDER = "MMedBench"  # under data/raw/hub/


def unpack(zip_path: Path, out: Path) -> dict:
    """Write the language files of ``zip_path`` to ``out/{Train,Test}/``; returns what was taken and skipped."""
    taken, skipped = [], 0
    with zipfile.ZipFile(zip_path) as z:
        for info in z.infolist():
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            wanted = (not info.is_dir() and len(parts) >= 2 and parts[-2] in SPLITS
                      and parts[-1] in {f"{name}.jsonl" for name in LANGUAGES} and "__MACOSX" not in parts)
            if not wanted:
                skipped += 1
                continue
            name = f"{parts[-2]}/{parts[-1]}"
            if name in taken:
                raise ValueError(f"{zip_path}: two members unpack to {name}")
            dest = out / parts[-2] / parts[-1]  # built from the split and language names only
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            taken.append(name)
    if not taken:
        raise ValueError(f"{zip_path}: no Train/ or Test/ language files (<Language>.jsonl) in the zip")
    return {"files": sorted(taken), "other_members_skipped": skipped}


def summary(root: Path) -> dict:
    """Items per split and language, read and validated (a defect is an error naming file, record and field)."""
    out = {}
    for split in SPLITS:
        if (root / split).is_dir():
            items, _ = load_split(root, split)
            out[split] = {code: sum(it.language == code for it in items) for code in LANGUAGES.values()}
    return out


def download_mmedbench(hub_dir: Path) -> dict:
    from huggingface_hub import hf_hub_download

    zip_path = Path(hf_hub_download(repo_id=HUB_REPO, filename=HUB_FILE, repo_type="dataset",
                                    local_dir=hub_dir / "downloads"))
    root, partial = hub_dir / FOLDER, hub_dir / f".{FOLDER}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    report = unpack(zip_path, partial)
    shutil.rmtree(root, ignore_errors=True)  # the new unpack replaces the old one whole (no stale language file)
    partial.rename(root)
    return {"zip": str(zip_path), "folder": str(root), **report, "items": summary(root)}
