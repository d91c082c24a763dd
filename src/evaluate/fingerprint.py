"""Fingerprints that tie each step 4 prediction to what produced it, so a rerun never reuses a stale one.

A prediction is reusable only when its item's prompt and letters, the model's weights and the settings that change
answers are the same. The model part is content-based, not the path: a checkpoint retrained into the same folder
gets a new fingerprint, a copied folder keeps its own. Reading every weight byte of a 7B model would take minutes,
so each safetensors file contributes its header (tensor names, dtypes, shapes, offsets), its size and 16 blocks of
64 KiB spread over its data: retraining changes every tensor, so the sampled blocks change too. A LoRA adapter's
fingerprint includes its base model's, so does a proxy-tuned run's (each of its models counts).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

CONFIG_FILES = ("config.json", "model.safetensors.index.json", "adapter_config.json")
SAMPLES, BLOCK = 16, 1 << 16


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def safetensors_digest(path: Path) -> str:
    """Header, size and sampled data blocks of one safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(min(n, size))
        start = 8 + n
        blocks = []
        span = max(size - start - BLOCK, 0)
        for i in range(SAMPLES):
            f.seek(start + span * i // max(SAMPLES - 1, 1))
            blocks.append(f.read(BLOCK))
    return _sha(header, str(size).encode(), *blocks)


def model_fingerprint(name_or_path, _seen: tuple = ()) -> str:
    """A local folder: its config and index files and every safetensors file's digest; a LoRA adapter folder also
    its base model's fingerprint (the adapter alone does not make the model: its base can be replaced at the same
    path). A hub id: the id (its revision is pinned by the local cache; nothing more can be known offline)."""
    from src.models import adapter

    path = Path(str(name_or_path))
    if not path.is_dir():
        return _sha(b"hub", str(name_or_path).encode())
    parts = []
    for name in CONFIG_FILES:
        if (path / name).is_file():
            parts += [name.encode(), (path / name).read_bytes()]
    for f in sorted(path.glob("*.safetensors")):
        parts += [f.name.encode(), safetensors_digest(f).encode()]
    if adapter.is_adapter_dir(path) and path.resolve() not in _seen:  # _seen: an adapter naming itself as base
        parts += [b"base", model_fingerprint(adapter.adapter_base(path), (*_seen, path.resolve())).encode()]
    return _sha(*parts)


def run_fingerprint(settings: dict, models: dict) -> str:
    """The settings that change answers plus the fingerprint of every model involved (``{"model": path, ...}``:
    the proxy-tuning models too)."""
    from src.evaluate.config import EvalConfig

    # the settings of step 4 that change a prediction (the others, e.g. batch size, only change speed)
    doc = {"settings": {k: settings.get(k) for k in EvalConfig.answer_settings()},
           "models": {role: model_fingerprint(p) for role, p in sorted(models.items()) if p}}
    return _sha(json.dumps(doc, sort_keys=True).encode())


def item_fingerprint(record: dict, run_fp: str) -> str:
    """One item's prompt and option letters under one run: the value stored in each prediction's ``fingerprint``."""
    return _sha(run_fp.encode(), record["prompt"].encode(), json.dumps(list(record["letters"])).encode())[:32]
