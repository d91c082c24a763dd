"""Step 4's typed config (``4.eval.sh``; src/common/config.py): every flag of src/evaluate/eval.py as one checked
dataclass, and the settings its run.json records and a resumed run must share, derived from the fields.

* ``rerun=True``: recorded in run.json's "settings" (in this order);
* ``resume=True``: predictions already in --out were made with these; a rerun with other values is refused (without
  --overwrite). Of these, the ones not covered by a model's content fingerprint are part of every prediction's
  fingerprint (``answer_settings``, used by src/evaluate/fingerprint.py).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from src.common.config import StepConfig, setting
from src.common.defaults import DEFAULT_MODEL, DEFAULT_MODEL_NAME, ROOT
from src.evaluate import mmedlm, rationale

DEFAULT_INPUT = ROOT / "data" / f"sample_{DEFAULT_MODEL_NAME}" / "test.jsonl"
DEFAULT_OUT = ROOT / "results" / f"sample_{DEFAULT_MODEL_NAME}"
XMEDBENCH_MAX_NEW_TOKENS = 128  # the paper's
MODES = ("generate", "loglik")
ENGINE_CHOICES = ("auto", "custom", "hf", "cb")
BACKENDS = ("inprocess", "openai")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_FIELDS = ("model", "proxy_tuned", "proxy_raw")  # fingerprinted by their content, not their path


@dataclass
class EvalConfig(StepConfig):
    model: str = setting(str(DEFAULT_MODEL), rerun=True, resume=True)
    input: Path = setting(DEFAULT_INPUT, rerun=True)
    mode: str = setting("generate", rerun=True, resume=True, choices=MODES)
    max_new_tokens: int | None = setting(None, rerun=True, resume=True, at_least=1)  # None: 128, MMedBench 1000
    min_new_tokens: int = setting(2, rerun=True, resume=True, at_least=0)
    format: str | None = setting(None, rerun=True, resume=True)
    dtype: str = setting("auto", rerun=True, resume=True, choices=DTYPES)
    parsing: str | None = setting(None, rerun=True, choices=mmedlm.PARSINGS)
    rationale_metric: str | None = setting(None, rerun=True, choices=tuple(rationale.METRICS))
    max_padding: float = setting(0.1, rerun=True)
    prefix_cache: str = setting("auto", rerun=True, choices=("auto", "off"))
    engine: str = setting("auto", rerun=True, choices=ENGINE_CHOICES)
    proxy_tuned: str | None = setting(None, rerun=True, resume=True)
    proxy_raw: str | None = setting(None, rerun=True, resume=True)
    exclude_source: list = setting(default_factory=list, rerun=True)
    backend: str = setting("inprocess", rerun=True, resume=True, choices=BACKENDS)
    out: Path = DEFAULT_OUT
    limit: int | None = setting(None, at_least=1)
    limit_per_source: int | None = setting(None, at_least=1)
    batch_size: int | None = setting(None, at_least=1)
    prefill_batch: int | None = setting(None, at_least=1)
    threads: int | None = setting(None, at_least=1)
    api_base: str | None = None
    api_model: str | None = None
    concurrency: int = setting(8, at_least=1)
    api_timeout: float = 300.0
    overwrite: bool = False
    no_progress: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.require(bool(self.proxy_tuned) == bool(self.proxy_raw), "proxy_tuned", "--proxy-tuned and --proxy-raw "
                     "go together")
        if self.engine in ("hf", "cb"):
            self.require(self.mode == "generate" and not self.proxy_tuned, "engine",
                         f"{self.engine} generates with a plain transformers model: no --mode loglik, no proxy-tuning")
        if self.engine == "cb":
            from src.generation.cb import EXPORT_HINT
            from src.models.moe import is_moe_checkpoint

            self.require(not is_moe_checkpoint(self.model), "engine",
                         f"cb runs stock transformers classes; {self.model} is a Post-MoE checkpoint of ours: export "
                         f"it ({EXPORT_HINT}) and score the export, or use --engine custom")
        if self.backend == "openai":
            self.require(bool(self.api_base) and not self.proxy_tuned, "backend",
                         "openai needs --api-base URL and takes no proxy models")

    @classmethod
    def resume_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.metadata.get("resume"))

    @classmethod
    def answer_settings(cls) -> tuple[str, ...]:
        """The resume settings that change a prediction and are not a model (whose content is fingerprinted) nor the
        backend: what every prediction's fingerprint covers besides its prompt and the models."""
        return tuple(k for k in cls.resume_keys() if k not in MODEL_FIELDS + ("backend",))
