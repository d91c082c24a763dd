"""What a caller asks of a backend (``Prompt``, ``GenerationConfig``, ``Sampling``) and what it gets (``Generation``)."""
from __future__ import annotations

from dataclasses import dataclass, field

STOPS = ("eos", "line", "max_tokens")  # why a generation ended: a stop token, its first line complete, the limit


@dataclass(frozen=True)
class Sampling:
    """Greedy decoding, or sampling with these settings (``seed``: the same prompt and seed give the same text on the
    same machine). ``top_k`` None: no top-k filter."""
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None


GREEDY = Sampling()


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate. ``stop_ids``: tokens that end a generation (``stops.stop_token_ids``), suppressed during the
    first ``min_new_tokens``. ``stop_at_line``: the caller reads only the first non-empty line, so a backend may end
    a generation as soon as that line is complete (its text up to there is the same; the custom and cb engines do,
    HF generate decodes on to a stop token or the limit)."""
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_at_line: bool = False
    sampling: Sampling = GREEDY

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.min_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 1 and min_new_tokens >= 0, got {self.max_new_tokens} and "
                             f"{self.min_new_tokens}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


@dataclass
class Prompt:
    """One prompt. ``ids``: its token ids, exactly as the model is to see them (no special tokens added). ``text``:
    the same prompt as text (a server's completions endpoint). ``messages``: chat messages instead, for a server that
    renders its own chat template (a hosted model). ``group``: prompts with equal groups are likely to share a long
    prefix (step 4: the source and the first shot), which the custom engine computes once; its first element alone
    is the looser group."""
    ids: list[int] = field(default_factory=list)
    text: str | None = None
    messages: list[dict] | None = None
    group: tuple = ()


@dataclass
class Generation:
    """One finished generation: the index of its prompt in the call, the new token ids (a stop token that ended it
    included), their text (special tokens skipped), why it ended, and the prompt's length in tokens (as the backend
    counted it: a server's usage)."""
    index: int
    ids: list[int]
    text: str
    stop: str
    prompt_tokens: int = 0
    new_tokens: int | None = None  # when it differs from len(ids): a server's usage count

    def __post_init__(self):
        if self.new_tokens is None:
            self.new_tokens = len(self.ids)
