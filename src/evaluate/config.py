"""Typed configs of src/evaluate's entry points (src/common/config.py): step 4 (``EvalConfig``: every flag of
``4.eval.sh`` as one checked dataclass, and the settings its run.json records and a resumed run must share, derived
from the fields) and the chats (``ChatConfig``: the terminal chat and the web chat).

* ``rerun=True``: recorded in run.json's "settings" (in this order);
* ``resume=True``: predictions already in --out were made with these; a rerun with other values is refused (without
  --overwrite). Of these, the ones not covered by a model's content fingerprint are part of every prediction's
  fingerprint (``answer_settings``, used by src/evaluate/fingerprint.py).
"""
from __future__ import annotations

from dataclasses import dataclass
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
        check_proxy_pair(self)
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
            self.require(bool(self.api_base), "backend", "openai needs --api-base URL")
            self.require(not self.proxy_tuned, "proxy_tuned", "decodes in this process: not with --backend openai")

    @classmethod
    def answer_settings(cls) -> tuple[str, ...]:
        """The resume settings that change a prediction and are not a model (whose content is fingerprinted) nor the
        backend: what every prediction's fingerprint covers besides its prompt and the models."""
        return tuple(k for k in cls.resume_keys() if k not in MODEL_FIELDS + ("backend",))


def check_proxy_pair(cfg) -> None:
    """Proxy-tuning takes both small models (the tuned one and the one before tuning)."""
    cfg.require(bool(cfg.proxy_tuned) == bool(cfg.proxy_raw), "proxy_tuned" if cfg.proxy_raw else "proxy_raw",
                "--proxy-tuned and --proxy-raw go together (the small tuned model and the same model before tuning)")


@dataclass
class ChatConfig(StepConfig):
    """The chats (``python -m src.evaluate.cli_demo``, ``python -m src.evaluate.web_demo``): the checkpoint or the
    server, the context budget, the reply settings (the terminal's flags; the web page has controls) and the page's
    address."""
    model: str = str(DEFAULT_MODEL)
    api_base: str | None = None
    api_model: str | None = None
    proxy_tuned: str | None = None
    proxy_raw: str | None = None
    format: str | None = None
    max_context: int | None = setting(None, at_least=2)
    max_new_tokens: int = setting(512, at_least=1)
    greedy: bool = False
    temperature: float = setting(0.3, at_least=0.0)
    top_p: float = setting(0.7, at_least=0.0)
    repetition_penalty: float = setting(1.1, at_least=0.0)
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = setting(7860, at_least=0)

    def __post_init__(self):
        super().__post_init__()
        check_proxy_pair(self)
        self.require(not (self.api_base and self.proxy_tuned), "proxy_tuned", "decodes in this process: not with "
                     "--api-base")

    def reply_settings(self):
        from src.evaluate.chat_core import ChatSettings

        return ChatSettings(self.greedy, self.temperature, self.top_p, self.repetition_penalty, self.max_new_tokens)

    def open(self):
        """The chat (src/evaluate/chat_core.py) this config names."""
        from src.evaluate.chat_core import open_chat

        return open_chat(self.model, self.api_base, self.api_model, self.proxy_tuned, self.proxy_raw, self.format,
                         self.max_context, self.max_new_tokens)


def add_chat_args(p) -> None:
    """The flags both chats take (the checkpoint or server, its chat format, the context budget)."""
    from src.common.defaults import repo_relative

    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help=f"checkpoint folder or hub id, any kind the project makes (default: "
                        f"{repo_relative(DEFAULT_MODEL)}; with --api-base: the tokenizer that counts the budget)")
    p.add_argument("--api-base", default=None, help="chat with an OpenAI-compatible server instead (serve.sh)")
    p.add_argument("--api-model", default=None, help="model name on the server (default: the one it serves)")
    p.add_argument("--proxy-tuned", help="small tuned model: decode --model with logits base + (tuned - raw)")
    p.add_argument("--proxy-raw", help="the small model before tuning (needed with --proxy-tuned)")
    p.add_argument("--format", default=None, help="chat format name (default: from the model)")
    p.add_argument("--max-context", type=int, default=None,
                   help="token budget for history + reply (default: the model's max_position_embeddings, at most 8192)")
    p.add_argument("--max-new-tokens", type=int, default=512)
