"""The typed configs of the data steps: step 1 (``PromptConfig``), step 2 (``TrainDataConfig``), the QA rewriting
(``MakeQAConfig``) and decontamination (``DecontaminateConfig``).

Each is built from its entry module's parser (``Config.from_args(build_parser().parse_args(argv))``), checks its
flags once when it is built (one ``--flag: ...`` line for a bad value, before any file is read or written), resolves
the defaults that depend on other flags (the sample's dev file, the default ``--out``), and is what the code below
the command line reads. The fields marked ``rerun`` are the settings a step records and compares on a rerun
(src/common/rerun.py), in declaration order. The field defaults are the parsers' (tests/test_step_configs.py checks
that the two agree). See src/common/config.py for the base class.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from src.common.config import StepConfig, setting
from src.common.defaults import DEFAULT_MODEL, ROOT, SAMPLE_DIR
from src.common.errors import UsageError
from src.prepare import mmedbench
from src.prepare.leak_index import MIN_CHARS

# ------------------------------------------------------------------------------------------------------- step 1
XMEDBENCH_SHOTS = 3  # the paper's k
SAMPLE_BENCH, SAMPLE_DEV = SAMPLE_DIR / "bench_test.json", SAMPLE_DIR / "bench_dev.json"
SAMPLE_MMEDBENCH = SAMPLE_DIR / "mmedbench"  # step 0 copies assets/sample/mmedbench/ here


@dataclass
class PromptConfig(StepConfig):
    """Step 1 (``1.data_process_test_dev.sh``): XMedBench k-shot prompts, or MMedLM's zero-shot prompts when
    ``bench`` is an MMedBench release (``mmedbench``, derived from the path)."""
    bench: Path = setting(SAMPLE_BENCH, rerun=True)
    dev: Path | None = setting(None, rerun=True)  # XMedBench; the sample's dev file for the sample
    model: str = setting(str(DEFAULT_MODEL), rerun=True)
    format: str | None = setting(None, rerun=True)
    prompt_style: str = setting("fixed", rerun=True)
    rationale: str | None = setting(None, rerun=True, choices=("with", "without"))  # MMedBench; "with" by default
    shots: int | None = setting(None, rerun=True, at_least=0)  # XMedBench: XMEDBENCH_SHOTS by default
    shot_mode: str = setting("per-item", rerun=True, choices=("per-item", "fixed"))
    seed: int = setting(42, rerun=True)
    max_tokens: int = setting(4096, rerun=True, at_least=1)
    dev_fraction: float = setting(0.1, rerun=True)
    on_error: str = setting("raise", rerun=True, choices=("raise", "skip"))
    out: Path | None = None  # default: data/<bench>_<model> (see default_out)
    overwrite: bool = False
    mmedbench: bool = field(default=False, init=False)

    # Settings that one benchmark's prompts do not depend on: left out of its report's settings.
    XMEDBENCH_ONLY = ("dev", "shots", "shot_mode", "seed", "dev_fraction")
    MMEDBENCH_ONLY = ("rationale",)

    def __post_init__(self):
        super().__post_init__()
        self.bench, self.dev = Path(self.bench), self.dev and Path(self.dev)
        if not 0 <= self.dev_fraction <= 1:
            raise UsageError("--dev-fraction", f"must be between 0 and 1, got {self.dev_fraction}")
        self.mmedbench = mmedbench.is_release(self.bench)
        if self.mmedbench:
            self._mmedbench_flags()
        else:
            self._xmedbench_flags()
        self.out = Path(self.out) if self.out else self.default_out()

    def _xmedbench_flags(self) -> None:
        """The MMedBench-only flags are refused for XMedBench items; --shots defaults to the paper's 3."""
        if self.prompt_style == "mmedlm":
            raise UsageError("--prompt-style",
                             "'mmedlm' is for MMedBench (--bench a folder with Test/<Language>.jsonl)")
        if self.rationale is not None:
            raise UsageError("--rationale", "is for MMedBench prompts only")
        if self.format == "raw":
            raise UsageError("--format", "'raw' is for MMedBench's Alpaca prompts, which carry their own markers")
        if self.shots is None:
            self.shots = XMEDBENCH_SHOTS
        if self.dev is None and self.bench == SAMPLE_BENCH:
            self.dev = SAMPLE_DEV

    def _mmedbench_flags(self) -> None:
        """The flags MMedBench cannot take; --rationale defaults to "with"."""
        if self.prompt_style == "paper":
            raise UsageError("--prompt-style", "'paper' is XMedBench's reference style; MMedBench takes 'fixed' or "
                                               "'mmedlm'")
        if self.shots:
            raise UsageError("--shots", "MMedBench prompts are zero-shot, as MMedLM's")
        if self.dev is not None:
            raise UsageError("--dev", "MMedBench has no dev split (Train/ is step 2's input, Test/ step 1's)")
        self.rationale = self.rationale or "with"

    def default_out(self) -> Path:
        if self.mmedbench:
            stem = "mmedbench_sample" if self.bench == SAMPLE_MMEDBENCH else "mmedbench"
        else:
            stem = "sample" if self.bench == SAMPLE_BENCH else self.bench.stem
        return ROOT / "data" / f"{stem}_{Path(self.model).name}"

    def settings(self) -> dict:
        """The rerun fields that the benchmark's prompts depend on."""
        other = self.XMEDBENCH_ONLY if self.mmedbench else self.MMEDBENCH_ONLY
        return {k: v for k, v in super().settings().items() if k not in other}


# ------------------------------------------------------------------------------------------------------- step 2
SAMPLE_TRAIN = SAMPLE_DIR / "train.json"
PAPER_MAX_SEQ_LEN = 4096
SAMPLE_MAX_SEQ_LEN = 1024  # the embedded sample's documents are < 400 tokens; short rows keep CPU training quick
MIN_SEQ_LEN = 16


def default_num_proc() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


@dataclass
class TrainDataConfig(StepConfig):
    """Step 2 (``2.data_process_train.sh``). ``inputs`` (derived): the input files in reading order, --data ones
    (the embedded sample when neither --data nor --text is given), then --text ones."""
    data: list[Path] | None = None
    text: list[str] | None = None
    model: str = setting(str(DEFAULT_MODEL), rerun=True)
    format: str | None = setting(None, rerun=True)
    max_seq_len: int | None = setting(None, rerun=True)  # resolved: SAMPLE_MAX_SEQ_LEN or PAPER_MAX_SEQ_LEN
    seed: int = setting(42, rerun=True)
    priorities: Path | None = setting(None, rerun=True)
    language_ids: str = setting("family", rerun=True, choices=("family", "language"))
    on_error: str = setting("raise", rerun=True, choices=("raise", "skip"))
    decontaminate_against: list[Path] | None = setting(None, rerun=True)  # resolved: [] for none
    leak_min_chars: int = setting(64, rerun=True)
    prompt_style: str = setting("fixed", rerun=True)  # of MMedBench inputs
    out: Path | None = None  # default: data/<sample or first input's stem>_<model>
    num_proc: int = default_num_proc()
    overwrite: bool = False
    sample: bool = field(default=False, init=False)  # the embedded sample (no --data, no --text)
    inputs: list = field(default_factory=list, init=False)  # src.prepare.records.Input per file

    def __post_init__(self):
        from src.prepare.records import data_input, text_input  # here: it imports pyarrow, which step 1 needs not

        super().__post_init__()
        self.sample = self.data is None and self.text is None
        self.inputs = [data_input(SAMPLE_TRAIN)] if self.sample else \
            [data_input(p, self.prompt_style) for p in self.data or []] + [text_input(t) for t in self.text or []]
        self.max_seq_len = self.max_seq_len or (SAMPLE_MAX_SEQ_LEN if self.sample else PAPER_MAX_SEQ_LEN)
        if self.max_seq_len < MIN_SEQ_LEN:
            raise ValueError(f"--max-seq-len must be at least {MIN_SEQ_LEN}, got {self.max_seq_len}")
        if self.num_proc < 1:
            raise ValueError("--num-proc must be at least 1")
        self.decontaminate_against = list(self.decontaminate_against or [])
        stem = "sample" if self.sample else self.inputs[0].path.stem
        self.out = Path(self.out) if self.out else ROOT / "data" / f"{stem}_{Path(self.model).name}"

    def settings(self) -> dict:
        """The inputs as [file, kind, source], then the rerun fields; prompt_style only with an MMedBench input, so
        that the settings of earlier runs without one still match."""
        settings = {"inputs": [[str(i.path), i.kind, i.source] for i in self.inputs], **super().settings()}
        if not any(i.kind == "mmedbench" for i in self.inputs):
            del settings["prompt_style"]
        return settings


# ------------------------------------------------------------------------------------------ decontamination
DECONTAMINATED_SAMPLE = ROOT / "data" / "decontaminated" / "sample"


@dataclass
class DecontaminateConfig(StepConfig):
    """``scripts/decontaminate.sh``: bench files, training inputs (derived ``inputs``) and the matching rule. The
    report records the rule and the bench (``Screen.settings``); an earlier run's outputs need --overwrite."""
    bench: list[Path] | None = None  # resolved: the sample's test and dev bench files
    data: list[Path] | None = None  # resolved: the sample's train.json when neither --data nor --text is given
    text: list[str] | None = None
    out: Path | None = None  # resolved: DECONTAMINATED_SAMPLE
    min_chars: int = MIN_CHARS
    min_question_chars: int = 1
    fold_case: bool = False
    num_proc: int = 1
    overwrite: bool = False
    sample: bool = field(default=False, init=False)  # reads the embedded sample (train records or bench)
    inputs: list = field(default_factory=list, init=False)  # src.prepare.records.Input per file

    def __post_init__(self):
        from src.prepare.records import data_input, text_input  # here: it imports pyarrow, which step 1 needs not

        super().__post_init__()
        uses_sample_data = self.data is None and not self.text
        self.sample = uses_sample_data or self.bench is None
        self.bench = self.bench if self.bench is not None else [SAMPLE_BENCH, SAMPLE_DEV]
        self.data = [SAMPLE_TRAIN] if uses_sample_data else self.data
        self.out = Path(self.out or DECONTAMINATED_SAMPLE)
        self.inputs = [data_input(p) for p in self.data or []] + [text_input(t) for t in self.text or []]
        if self.num_proc < 1:
            raise ValueError("--num-proc must be at least 1")


# ------------------------------------------------------------------------------------------------ QA rewriting
SAMPLE_TEXT = SAMPLE_DIR / "text"  # step 0 copies assets/sample/text/ here
QA_SAMPLE_OUT = ROOT / "data" / "sample_qa"
# generation defaults: a real run, and the embedded sample on a CPU (small, so it ends in minutes)
MAX_QUESTION_TOKENS, MAX_NEW_TOKENS = 256, 1024
SAMPLE_MAX_QUESTION_TOKENS, SAMPLE_MAX_NEW_TOKENS = 48, 96


@dataclass
class MakeQAConfig(StepConfig):
    """``scripts/make_qa.sh``: the inputs, how they are cut into blocks, the backend (``model`` in-process, the
    default model unless ``api_base`` names a server), sampling and the checks of what comes back."""
    input: list[Path] | None = None  # resolved: the embedded sample's text folder (``sample``)
    out: Path | None = None  # resolved: QA_SAMPLE_OUT
    mode: str = "qa"
    language: str | None = None
    category: str | None = None
    text_field: str = "text"
    block_unit: str = "chars"
    block_size: int | None = setting(None, at_least=1)
    no_merge: bool = False
    tokenizer: str | None = None
    model: str | None = None  # resolved: DEFAULT_MODEL without --api-base
    device: str | None = None
    api_base: str | None = None
    api_model: str | None = None
    concurrency: int = setting(8, at_least=1)
    timeout: float = 300.0
    retries: int = setting(4, at_least=0)
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 42
    max_question_tokens: int | None = setting(None, at_least=1)  # resolved: smaller on the embedded sample
    max_new_tokens: int | None = setting(None, at_least=1)
    min_answer_chars: int = 32
    min_question_chars: int = 8
    min_script_share: float = 0.5
    copy_share: float = 0.6
    limit: int | None = setting(None, at_least=1)
    resume: bool = False
    overwrite: bool = False
    no_progress: bool = False
    sample: bool = field(default=False, init=False)  # the embedded sample's text (no --input)

    def __post_init__(self):
        super().__post_init__()
        if self.timeout <= 0:
            raise UsageError("--timeout", f"must be positive, got {self.timeout}")
        if self.temperature < 0:
            raise UsageError("--temperature", f"must be 0 or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError("--top-p", f"must be in (0, 1], got {self.top_p}")
        if self.model and self.api_base:
            raise UsageError("--api-base", "give either --model (in-process) or --api-base (a server), not both")
        if self.resume and self.overwrite:
            raise UsageError("--resume", "--resume continues a run, --overwrite discards it: choose one")
        if self.block_unit == "tokens" and self.api_base and not self.tokenizer:
            raise UsageError("--tokenizer", "--block-unit tokens with --api-base needs --tokenizer (a model folder)")
        self.sample = self.input is None
        self.input = [SAMPLE_TEXT] if self.sample else self.input
        self.out = Path(self.out or QA_SAMPLE_OUT)
        self.model = self.model if self.api_base or self.model else str(DEFAULT_MODEL)
        if self.max_question_tokens is None:
            self.max_question_tokens = SAMPLE_MAX_QUESTION_TOKENS if self.sample else MAX_QUESTION_TOKENS
        if self.max_new_tokens is None:
            self.max_new_tokens = SAMPLE_MAX_NEW_TOKENS if self.sample else MAX_NEW_TOKENS
