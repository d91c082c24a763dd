"""Step 0's typed config (``0.download_data.sh``), built from src/download/download_data.py's parser and checked
once; see src/common/config.py."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from src.common.config import StepConfig
from src.common.defaults import ROOT
from src.common.errors import UsageError

HUB_MODEL = "Qwen/Qwen2-0.5B"  # the base model --hub downloads by default


@dataclass
class DownloadConfig(StepConfig):
    """``sample`` (the default: the embedded sample and model) or ``hub`` (the real data, bench and ``model``;
    with ``mmedbench``, MMedBench instead of the ApolloMoE data)."""
    sample: bool = False
    hub: bool = False
    model: str = HUB_MODEL
    dataset_file: str = "ApolloMoEDataset.json"
    bench_file: str = "ApolloMoEBench.json"
    mmedbench: bool = False
    data_dir: Path = ROOT / "data" / "raw"
    models_dir: Path = ROOT / "models"

    def __post_init__(self):
        super().__post_init__()
        if self.mmedbench and not self.hub:
            raise UsageError("--mmedbench", "goes with --hub (the embedded sample always has its MMedBench part)")
