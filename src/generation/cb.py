"""The ``cb`` backend (step 4's ``--engine cb``): transformers' own continuous batching (``generate_batch``'s engine:
paged attention, prefix sharing, CUDA graphs where the attention kernel allows them) under the custom engine's rules.

The same prompts (token ids), the same stop tokens (``GenerationConfig.stop_ids``), greedy decoding and the same
stopping rule (``stops.stop_reason``). transformers' continuous batching drops the
``min_new_tokens`` processor and has no stopping rule of its own, so one continuous-batching logits processor
(``StopRules``) does both, per request, from the tokens each request has generated so far:

* fewer than ``min_new_tokens`` tokens: the stop tokens are suppressed (as in the custom engine and HF generate);
* its first non-empty line complete: the next token is forced to a stop token, so the request ends one step later
  (continuous batching then admits the next prompt in its place).

Each request's tokens are then cut where the custom engine would have stopped (that token and reason), so the
predictions have the same fields and, for the same logits, the same text. The logits themselves come from other
kernels (paged attention, packed prefills), so in low precision a near-tie can go the other way; on a CPU in fp32 the
tests find the custom engine's letters.

Dense checkpoints and stock-exported Post-MoE models (``src/models/moe_export.py`` -> ``Qwen2MoeForCausalLM``) run
here; our own Post-MoE class is refused (its language-id hooks are not continuous-batching aware): export it first.
Decoding is synchronous (``use_async_batching=False``): the processor must see every request's latest token.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Callable

import torch
from transformers import GenerationConfig as GenerationConfig_  # transformers' (ours: types.GenerationConfig)
from transformers.generation import ContinuousBatchingConfig
from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

from src.common.errors import UsageError
from src.generation.stops import completes_line, newline_tokens, stop_reason
from src.generation.types import Generation, GenerationConfig, Prompt

EXPORT_HINT = "python -m util.moe_export --model DIR --out DIR"
PAGE_SIZE = 256  # tokens per cache page (transformers' default)
_GO, _YOUNG, _LINE_DONE = 0, 1, 2  # per-request codes StopRules passes to the device


class StopRules(ContinuousBatchingLogitsProcessor):
    """Minimum new tokens and the first-line early stop as one continuous-batching logits processor (see the module
    docstring). ``prepare_tensor_args`` runs on the host before each step with the requests that get a token;
    ``__call__`` runs on the device with one code per such request."""

    supported_kwargs: dict = {}
    ignored_kwargs: tuple = ()

    def __init__(self, stops: list[int], min_new_tokens: int, max_new_tokens: int, tokenizer, early_stop: bool):
        self.stops, self.stop_set = list(stops), set(stops)
        self.min_new_tokens, self.max_new_tokens = min_new_tokens, max_new_tokens
        self.tokenizer = tokenizer
        self.newline = newline_tokens(tokenizer) if early_stop else None
        self._stop_index: torch.Tensor | None = None

    def code(self, generated: list[int]) -> int:
        if len(generated) < self.min_new_tokens:
            return _YOUNG
        if generated and completes_line(generated, generated[-1], self.newline, self.tokenizer):
            return _LINE_DONE
        return _GO

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        """Called once when transformers sets up its tensors (before any CUDA graph is captured): the stop ids go to
        the device here, so no step copies them."""
        int32_tensor.fill_(_GO)
        self._stop_index = torch.tensor(self.stops, dtype=torch.long, device=int32_tensor.device)

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        return torch.tensor([self.code(r.state.generated_tokens) for r in requests_with_new_token], dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        if not self.stops:
            return scores
        code = tensor_arg[:scores.shape[0]][:, None]
        stop_cols = scores.index_select(1, self._stop_index)
        scores = scores.index_copy(1, self._stop_index, stop_cols.masked_fill(code == _YOUNG, -math.inf))
        forced = torch.full_like(scores[:1], -math.inf)
        forced[:, self.stops[0]] = 0.0
        return torch.where(code == _LINE_DONE, forced, scores)


def refuse_own_post_moe(model) -> None:
    from src.models.moe import is_moe

    if is_moe(model):
        raise UsageError("--engine", f"cb runs stock transformers classes; export this Post-MoE model first "
                                     f"({EXPORT_HINT}) and score the export")


def cb_config(device: torch.device, prompt_lengths: list[int], max_new_tokens: int,
              batch_size: int) -> ContinuousBatchingConfig:
    """Settings for one scoring run: at most ``batch_size`` requests per step, and a paged cache sized for the
    workload (``batch_size`` of the longest requests; twice that on a GPU, so requests can wait in it) rather than
    from free memory: on a CPU transformers would take 60% of the RAM, and without flash attention its packed
    batches carry a mask that grows with the cache."""
    longest = max(prompt_lengths) + max_new_tokens
    pages = (math.ceil(longest / PAGE_SIZE) + 1) * (2 if device.type == "cuda" else 1)
    batch_tokens = 8192 if device.type == "cuda" else max(1024, min(4096, max(prompt_lengths)))
    return ContinuousBatchingConfig(max_requests_per_batch=batch_size, use_async_batching=False, page_size=PAGE_SIZE,
                                    num_blocks=batch_size * pages + 2, max_batch_tokens=batch_tokens)


@contextmanager
def _manager(model, generation: GenerationConfig_, settings: ContinuousBatchingConfig, processor: StopRules):
    """A started continuous-batching manager whose logits processors include ``processor``; stopped and destroyed
    on exit (as transformers' ``continuous_batching_context_manager`` does, which has no hook to add a processor)."""
    manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=settings)
    _add_processor(manager, processor)
    manager.warmup()
    manager.start()
    finished = False
    try:
        yield manager
        finished = True
    finally:
        # after an error or Ctrl-C, stop at once instead of finishing every queued request first
        manager.stop(block=True, hard_stop=not finished)
        manager.destroy()


def _add_processor(manager, processor: StopRules) -> None:
    """Add a continuous-batching logits processor to a manager not yet started. transformers 5.23 builds the list
    from the generation config only (``manager.logit_processor``) and gives a tensor row only to the processors it
    converted itself (``tensors_required``); the rows are allocated when the manager first runs. Private attributes:
    tests/test_library_internals.py pins them."""
    processors = manager.logit_processor
    if processor in processors.logits_processor:
        return
    processors.logits_processor.append(processor)
    processors.tensors_required += 1
    processors.do_processing = True


def cut(tokens: list[int], rules: StopRules) -> tuple[list[int], str]:
    """A request's tokens up to where the custom engine stops, and why (the forced token after a line is dropped)."""
    gen: list[int] = []
    for tok in tokens:
        gen.append(tok)
        reason = stop_reason(gen, tok, rules.stop_set, rules.max_new_tokens, rules.newline, rules.tokenizer)
        if reason:
            return gen, reason
    raise RuntimeError(f"continuous batching returned {len(tokens)} tokens without a stop (max {rules.max_new_tokens})")


class ContinuousBatching:
    """transformers' continuous batching over one model, at most ``batch_size`` requests per step."""

    name = "cb"

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        refuse_own_post_moe(model)
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def generate(self, prompts: list[Prompt], config: GenerationConfig,
                 on_result: Callable[[Generation], None] | None = None, progress: bool = False,
                 stats: dict | None = None, desc: str = "generate (continuous batching)") -> list[Generation]:
        """Greedy generations of ``prompts`` (in their order); ``on_result`` gets each as soon as its request
        finishes."""
        if not config.sampling.greedy:
            raise ValueError("the cb backend decodes greedily here; sampling runs on the hf backend")
        if not prompts:
            return []
        ids = [list(p.ids) for p in prompts]
        stops = list(config.stop_ids)
        rules = StopRules(stops, config.min_new_tokens, config.max_new_tokens, self.tokenizer, config.stop_at_line)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        generation = GenerationConfig_(do_sample=False, max_new_tokens=config.max_new_tokens, eos_token_id=stops,
                                       pad_token_id=pad, num_return_sequences=1)
        settings = cb_config(self.model.device, [len(x) for x in ids], config.max_new_tokens, self.batch_size)
        out: list = [None] * len(prompts)
        counts = {"items": 0, "new_tokens": 0, "stops": {}, "prompt_tokens": sum(len(x) for x in ids)}
        t0 = time.time()
        was_training = self.model.training
        try:
            _run(self.model, ids, rules, generation, settings, out, counts, on_result, progress, desc)
        finally:
            self.model.train(was_training)
        if stats is not None:
            stats.update(counts, seconds=round(time.time() - t0, 3))
        return out


def _run(model, ids, rules: StopRules, generation, settings, out: list, counts: dict, on_result, progress: bool,
         desc: str) -> None:
    """Submit every prompt to a continuous-batching manager and turn each finished request into a Generation."""
    from tqdm import tqdm

    tokenizer = rules.tokenizer
    with torch.no_grad(), _manager(model, generation, settings, rules) as manager, \
            tqdm(total=len(ids), desc=desc, unit="item", disable=not progress, dynamic_ncols=True) as bar:
        index = {rid: i for i, rid in enumerate(manager.add_requests(ids, max_new_tokens=rules.max_new_tokens))}
        while counts["items"] < len(ids):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching stopped before every request finished")
                continue
            if not result.is_finished():
                continue
            if result.error is not None:
                raise RuntimeError(f"continuous batching failed on prompt {index[result.request_id]}: {result.error}")
            i = index[result.request_id]
            gen, reason = cut(result.generated_tokens, rules)
            g = Generation(i, gen, tokenizer.decode(gen, skip_special_tokens=True), reason, len(ids[i]))
            out[i] = g
            counts["items"] += 1
            counts["new_tokens"] += len(gen)
            counts["stops"][reason] = counts["stops"].get(reason, 0) + 1
            if on_result is not None:
                on_result(g)
            bar.update(1)
        counts["forward_calls"] = getattr(manager, "current_batch", None)  # the manager's step counter, if kept
