"""Reruns into an --out that holds an earlier run's outputs (steps 1 and 2, whose outputs are replaced whole).

A run records the settings that decide its outputs in its report (``"settings"``). A rerun with the same settings
rewrites the same files (byte for byte, for the same inputs), so it goes ahead; a rerun with other settings would
replace results made differently, so it is refused unless ``--overwrite`` says to (no run replaces earlier results
without being told to). Step 3 and step 4 have their own rules (resume, fingerprints).
"""
from __future__ import annotations

import json
from pathlib import Path

from src.common.defaults import repo_relative
from src.common.errors import UsageError

SHOWN = 3  # differing settings named in the message


def normalised(settings: dict) -> dict:
    """The settings as they read back from JSON (paths as strings, tuples as lists), so they compare equal; paths
    inside the repository relative to it, so a moved checkout still matches its own earlier runs."""
    return json.loads(json.dumps(_portable(settings), default=str))


def _portable(value):
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v) for v in value]
    if isinstance(value, (str, Path)) and Path(value).is_absolute():
        return repo_relative(value)
    return value


def check_rerun(out: Path, report_name: str, settings: dict, overwrite: bool, step: str) -> None:
    """Refuse (UsageError on --out) to write into ``out`` when its ``report_name`` records other settings, or none."""
    report = Path(out) / report_name
    if overwrite or not report.is_file():
        return
    try:
        old = json.loads(report.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        old = None
    hint = "pass --overwrite to replace them or choose another --out"
    if not isinstance(old, dict):
        raise UsageError("--out", f"{out} holds the outputs of an earlier {step} run that recorded no settings; {hint}")
    new = normalised(settings)
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if changed:
        more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        raise UsageError("--out", f"{out} holds {step} outputs made with other settings "
                                  f"({'; '.join(changed[:SHOWN])}{more}); {hint}")
