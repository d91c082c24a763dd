"""The backends behind the generation interface, and which one runs.

    backend = open_backend("custom", model, tokenizer, batch_size=16)
    backend.generate(prompts, config, on_result=...)       # a batch; each result handed over when it is ready
    for text in backend.stream(prompt, config): ...          # one reply, growing

* ``custom``: ``engine.Engine``, our batched engine (prefix sharing, continuous batching, first-line stop), greedy;
* ``hf``: ``hf.HFGenerate``, plain ``model.generate`` (greedy batches, seeded sampling one prompt at a time);
* ``cb``: ``cb.ContinuousBatching``, transformers' own continuous batching (paged attention, CUDA graphs), greedy;
* ``openai``: ``server.Served``, an OpenAI-compatible server (made with ``open_served``).
* ``auto`` (step 4's ``--engine``): per device type, from measurements (docs/eval.md "Engines").

The in-process backends stream with the token loop of stream.py (sampling, repetition penalty; any model called like
a causal LM). Which backend ran is recorded by step 4 in run.json; it is not part of a prediction's fingerprint (like
the batch size, it changes the speed, not the prompt or the rule).
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch

from src.generation.types import Generation, GenerationConfig, Prompt

ENGINES = ("custom", "hf", "cb")
# --engine auto per device type. CPU: the custom engine measured faster than transformers' continuous batching
# (docs/eval.md "Engines"). CUDA: the custom engine until a GPU check (bench/gpu_check.sh) has measured both.
AUTO = {"cpu": "custom", "cuda": "custom"}


class Backend(Protocol):
    name: str

    def generate(self, prompts: list[Prompt], config: GenerationConfig,
                 on_result: Callable[[Generation], None] | None = None, progress: bool = False,
                 stats: dict | None = None) -> list[Generation]: ...

    def stream(self, prompt: Prompt, config: GenerationConfig) -> Iterator[str]: ...


def choose_engine(requested: str, device) -> str:
    if requested != "auto":
        return requested
    return AUTO.get(torch.device(device).type, "custom")


class InProcess:
    """A model in this process behind one of the batch generators; ``stream`` runs the token loop."""

    def __init__(self, name: str, model, tokenizer, generator):
        self.name, self.model, self.tokenizer, self.generator = name, model, tokenizer, generator

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate(self, prompts: list[Prompt], config: GenerationConfig,
                 on_result: Callable[[Generation], None] | None = None, progress: bool = False,
                 stats: dict | None = None, desc: str | None = None) -> list[Generation]:
        extra = {"desc": desc} if desc else {}
        return self.generator.generate(prompts, config, on_result, progress, stats, **extra)

    def stream_ids(self, prompt: Prompt, config: GenerationConfig) -> Iterator[int]:
        """The new token ids one at a time (a stop token ends the reply and is not yielded)."""
        from src.generation.stream import stream_tokens

        ids = torch.tensor([list(prompt.ids)], device=self.model.device)
        yield from stream_tokens(self.model, ids, max_new_tokens=config.max_new_tokens, stop_ids=config.stop_ids,
                                 sampling=config.sampling, min_new_tokens=config.min_new_tokens)

    def stream(self, prompt: Prompt, config: GenerationConfig) -> Iterator[str]:
        """The reply so far, growing token by token (text held back while a multi-byte character is incomplete)."""
        tokens: list[int] = []
        for token in self.stream_ids(prompt, config):
            tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text
        yield self.tokenizer.decode(tokens, skip_special_tokens=True)


def open_backend(engine: str, model, tokenizer, *, batch_size: int = 8, max_padding: float = 0.1,
                 prefix_cache: str = "auto", prefill_batch: int | None = None, sort_by_length: bool = True,
                 logits_processor=None) -> InProcess:
    """An in-process backend (``engine``: one of ENGINES) over a loaded model (or a StepModel such as proxy-tuning's
    wrapper, for ``custom``). The keyword options are the engines' own; each takes what applies to it."""
    if engine == "custom":
        from src.generation.engine import Engine

        generator = Engine(model, tokenizer, batch_size=batch_size, max_padding=max_padding,
                           prefix_cache=prefix_cache, prefill_batch=prefill_batch)
    elif engine == "hf":
        from src.generation.hf import HFGenerate

        generator = HFGenerate(model, tokenizer, batch_size=batch_size, sort_by_length=sort_by_length,
                               logits_processor=logits_processor)
    elif engine == "cb":
        from src.generation.cb import ContinuousBatching

        generator = ContinuousBatching(model, tokenizer, batch_size=batch_size)
    else:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    return InProcess(engine, model, tokenizer, generator)


def open_served(api_base: str, api_model: str | None = None, tokenizer=None, *, timeout: float = 300.0,
                concurrency: int = 8, retries: int | None = None):
    """The ``openai`` backend for the server at ``api_base`` (its one model unless ``api_model`` names one;
    ``transformers serve`` offline lists none and answers with the one it serves)."""
    from src.common.openai_client import OpenAIClient
    from src.generation.server import Served

    client = OpenAIClient(api_base, api_model, timeout=timeout, **({"retries": retries} if retries is not None else {}))
    backend = Served(client, tokenizer, pad_id=getattr(tokenizer, "pad_token_id", None), concurrency=concurrency)
    name_served_model(client, backend.engine)
    return backend


def name_served_model(client, engine: str) -> None:
    """Set ``client.model`` when none is named: ``transformers serve FOLDER`` answers with its one model whatever
    the name (``SERVER_DEFAULT``: none sent), and offline its model list is an HTTP 500 retried for seconds, so it is
    not asked; any other server: the one model it lists (an error when it lists none or several)."""
    from src.common.openai_client import SERVER_DEFAULT

    if client.model is None:
        if engine == "transformers":
            client.model = SERVER_DEFAULT
        else:
            client.default_model()
