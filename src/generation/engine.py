"""The custom engine (backend ``custom``): batched greedy generation that stops each row as soon as what its caller
reads is complete, on a KV cache shared, merged and trimmed across rows; and the next-token log-probabilities step 4's
log-likelihood mode reads. ``Engine.generate`` is its side of the generation interface (src/generation/__init__.py).

Generation (``Engine.generate``)
    Prompts come as token ids (``Prompt.ids``) and are queued longest first (an out-of-memory shows up at once).
    Decoding runs on one batch of at most ``batch_size`` rows that is kept full: whenever a quarter of its rows have
    finished, the next prompts of the queue are prefilled and their KV cache is merged into the running batch
    (continuous batching, ``kvcache.cache_merge``; rows of different lengths are left-padded in the cache and masked).
    Prefill computes the logits of the last position only. On a CPU each prompt is prefilled on its own
    (``prefill_batch=1``: no padding, and the causal attention kernel runs without a mask; a padded batch costs ~25%
    more there), so prefill costs exactly one forward pass per prompt; on a GPU the admitted prompts are prefilled
    together (left padding kept under ``max_padding`` of their tokens). Decoding is greedy with a preallocated KV
    cache (``kvcache.SlotCache``: no copy of the cache per step). A row stops as soon as

    * it emitted a stop token (``GenerationConfig.stop_ids``; they are suppressed during the first
      ``min_new_tokens`` tokens, as ``min_new_tokens`` does in HF generate), or
    * with ``stop_at_line``, its text has a complete first non-empty line (``stops.line_complete``): step 4's
      extractor reads only that line, so the letter cannot change any more, or
    * it reached ``max_new_tokens``.

    Finished rows leave the batch (and its KV cache) at once, and cache columns no row needs any more are dropped, so
    no compute is spent on them. The extracted letters are therefore those of the full decode with the same settings
    (a test checks it against HF generate). Caches that cannot be merged (sliding-window layers) fall back to
    batch-by-batch decoding.

    One host synchronisation per decoding step (on a GPU the host otherwise waits for the device's queue): the next
    tokens are read back once; everything else is known on the host or stays on the device. Young rows' stop tokens
    are masked on the device (rows join at the end, so the young ones are a slice); a row's text is decoded for the
    line check only when its token brings a newline (``stops.newline_tokens``); each row's real and padding columns
    are counted on the host (``_Prefilled.extent``/``zeros``), so no mask is read back, and a step without padding
    passes no mask; index tensors are copied from pinned memory without waiting (``host_to_device``).
    ``bench/decode_overhead.py`` counts ops and syncs per step (``src/common/host_sync.py``).

Next-token log-probabilities (``Engine.next_token_logprobs``, ``Engine.continuation_logprobs``)
    One forward pass per prompt (batched, shared prefixes once) gives the log-probabilities of the token after it;
    ``continuation_logprobs`` scores several multi-token continuations of one context. Step 4's log-likelihood mode
    (src/evaluate/loglik.py) reads the option letters' scores from them.

Shared prefixes (``prefix_cache="auto"``)
    Prompts of one ``Prompt.group`` share a token prefix: in step 4 the items of one source share the system block
    and the instruction, plus every shot they have in common (the first shot is often drawn for many items of a
    source from a small dev pool; with step 1's ``--shot-mode fixed`` all of them). ``plan_groups`` groups them; a
    group's prefix is computed once, its KV cache is copied for every admitted row, and only the suffixes are
    prefilled (on the causal kernel without a mask, ``attention.prefix_causal_sdpa``). On the real test set this
    skips 26% of the prompt tokens.

Out of memory
    The batch size halves on an out-of-memory error and the work is retried: a failed prefill puts its prompts back
    in the queue, a failed decoding step rolls the cache back and returns the most recently admitted rows to the
    queue. The smaller batch size is kept for the rest of the run; finished rows are never redone.

The model behind the engine: the ``StepModel`` protocol
    Every model call goes through one method::

        forward_step(input_ids, attention_mask, position_ids, past_key_values, logits_to_keep=1) -> (logits, cache)

    ``input_ids``/``position_ids`` are [B, T] (long), ``attention_mask`` is [B, past + T] (1 = real token) or None
    when no row has padding (a wrapper passes it on as it is), ``past_key_values`` is None on the first call and
    afterwards whatever the previous call returned; ``logits`` are [B, logits_to_keep, V] for the last positions. A
    plain transformers model is wrapped in ``HFStepModel``. Anything else with a ``forward_step`` method and a
    ``device`` attribute (optionally ``eval()``/``train()``/``training``) can be given instead of a model, e.g. a
    proxy-tuning wrapper computing ``logits = base + (tuned - raw)`` over three ``HFStepModel``s. Its cache may be a
    transformers ``Cache`` or a (nested) tuple/list of them: the engine only selects, repeats, merges and trims batch
    rows/columns of a cache (``kvcache``), applied to each element.

Training-time use: the engine switches the model to eval mode, runs under ``torch.no_grad()`` and restores the
previous mode. Ranks stop decoding at different times, so with DeepSpeed ZeRO-3 (where every forward is a collective)
use it on a gathered/unsharded model or on rank-local copies only.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from src.generation.attention import decode_step_mask, prefix_attention
from src.generation.kvcache import (
    SlotCache,
    cache_length,
    cache_merge,
    cache_repeat,
    cache_select,
    cache_trim,
    cache_truncate,
    mergeable,
    supports_slot_cache,
)
from src.generation.padding import left_pad, left_padded
from src.generation.stops import newline_tokens, stop_reason
from src.generation.types import Generation, GenerationConfig, Prompt

MIN_PREFIX_TOKENS = 16  # a shared prefix shorter than this is not worth a separate forward


class StepModel(Protocol):
    device: torch.device

    def forward_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                     past_key_values: Any, logits_to_keep: int = 1) -> tuple[torch.Tensor, Any]: ...


class HFStepModel:
    """``StepModel`` over a transformers causal LM (dense or our MoE)."""

    def __init__(self, model, reserve: int = 64):
        self.model = model
        self.reserve = reserve  # spare cache columns per prefill (the engine sets max_new_tokens)
        self._keep_ok: bool | None = None
        self._slots = supports_slot_cache(model)

    @property
    def device(self) -> torch.device:
        dev = getattr(self.model, "device", None)
        return torch.device(dev) if dev is not None else next(self.model.parameters()).device

    @property
    def config(self):
        return getattr(self.model, "config", None)

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def forward_step(self, input_ids, attention_mask, position_ids, past_key_values, logits_to_keep=1):
        if past_key_values is None and self._slots:
            past_key_values = SlotCache(self.reserve)
        if self._slots:  # full attention only (sliding windows need transformers' own mask)
            attention_mask = decode_step_mask(self.model, attention_mask, input_ids.shape[1])
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, use_cache=True)
        if input_ids.shape[1] > 1 and past_key_values is not None and cache_length(past_key_values) > 0:
            with prefix_attention(self.model):  # a suffix after a shared prefix: keep the causal kernel
                return self._call(kwargs, logits_to_keep)
        return self._call(kwargs, logits_to_keep)

    def _call(self, kwargs: dict, logits_to_keep: int):
        if self._keep_ok is not False:
            try:
                out = self.model(**kwargs, logits_to_keep=logits_to_keep)
                self._keep_ok = True
                return out.logits[:, -logits_to_keep:], out.past_key_values
            except TypeError as e:  # a model without logits_to_keep: compute all logits and slice
                if "logits_to_keep" not in str(e):
                    raise
                self._keep_ok = False
        out = self.model(**kwargs)
        return out.logits[:, -logits_to_keep:], out.past_key_values


def as_step_model(model) -> StepModel:
    return model if hasattr(model, "forward_step") else HFStepModel(model)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    msg = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _free_memory():
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- host <-> device
def host_to_device(values: list[int], device, dtype=torch.long) -> torch.Tensor:
    """A tensor of host values on ``device`` without waiting for the device: torch's ordinary host-to-device copy
    waits for the stream to drain (a host synchronisation on every call); a copy from pinned memory does not (torch's
    pinned-memory allocator keeps the buffer until the copy is done)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------- work plan
@dataclass
class _Group:
    prefix: list[int]  # shared token prefix ([] for none)
    members: list[int]  # record indices


@dataclass
class EngineStats:
    items: int = 0
    batches: int = 0
    forward_calls: int = 0
    prompt_tokens: int = 0  # real prompt tokens processed (prefix counted once per group)
    padded_tokens: int = 0  # padding positions computed in prefill
    prefix_tokens: int = 0  # tokens of shared prefixes computed once
    prefix_saved_tokens: int = 0  # prompt tokens not recomputed thanks to shared prefixes
    new_tokens: int = 0
    decode_steps: int = 0  # forward calls of the decoding loop (one per generated position of the running batch)
    merges: int = 0  # times new rows joined a running batch
    oom_splits: int = 0
    seconds: float = 0.0
    stops: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def common_prefix(seqs: list[list[int]]) -> int:
    """The length of the longest prefix all ``seqs`` share."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        lim = min(n, len(s))
        while i < lim and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


def plan_groups(ids: list[list[int]], groups: list[tuple], prefix_cache: str = "auto") -> list[_Group]:
    """Group prompts whose token ids start the same; each group's shared prefix is computed once.

    Prompts with equal ``groups`` entries (``Prompt.group``; step 4: the source and the first shot) share at least
    what the group names (system block, instruction, that shot; with step 1's ``--shot-mode fixed``, every item of a
    source: all the shots); the others are grouped by the first element of their group alone (step 4: the source:
    system block and instruction). A group needs two members and a prefix of ``MIN_PREFIX_TOKENS``; everything else
    is one group without a prefix. On the real XMedBench test set (per-item shots drawn from each source's dev pool)
    this skips 26% of all prompt tokens.
    """
    if prefix_cache not in ("auto", "off"):
        raise ValueError("prefix_cache must be 'auto' or 'off'")
    if prefix_cache == "off":
        return [_Group([], list(range(len(ids))))]

    planned: list[_Group] = []

    def group_by(key, items: list[int]) -> list[int]:
        """A group for each key whose items share a long enough prefix; returns the other items."""
        buckets: dict = {}
        for i in items:
            buckets.setdefault(key(i), []).append(i)
        left = []
        for members in buckets.values():
            n = 0
            if len(members) > 1:
                n = min(common_prefix([ids[i] for i in members]), min(len(ids[i]) for i in members) - 1)
            if n >= MIN_PREFIX_TOKENS:
                planned.append(_Group(ids[members[0]][:n], members))
            else:
                left += members
        return left

    rest = group_by(lambda i: tuple(groups[i]), list(range(len(ids))))
    loose = group_by(lambda i: tuple(groups[i])[:1], sorted(rest))
    if loose:
        planned.append(_Group([], sorted(loose)))
    return planned


def too_much_padding(width: int, rows: int, real_tokens: int, max_padding: float) -> bool:
    """The one padding rule of batching and admission: ``rows`` left-padded to ``width`` tokens waste more than
    ``max_padding`` of the batch's positions."""
    return width * rows - real_tokens > max_padding * width * rows


def make_batches(lengths: dict[int, int], members: list[int], batch_size: int, max_padding: float) -> list[list[int]]:
    """Longest first; a batch takes the next item while it has room and its padding stays <= max_padding."""
    order = sorted(members, key=lambda i: (-lengths[i], i))
    batches, cur, total = [], [], 0
    for i in order:
        n = lengths[i]
        if cur:
            width = lengths[cur[0]]
            if len(cur) >= batch_size or too_much_padding(width, len(cur) + 1, total + n, max_padding):
                batches.append(cur)
                cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        batches.append(cur)
    return batches


# ----------------------------------------------------------------------------------------------- the engine
@dataclass
class _Prefilled:
    """Rows just prefilled (or the running batch): next-token logits [B, V] float, cache, attention mask
    [B, columns], last positions [B, 1], and per row, known on the host (so no step reads the mask back): ``extent``,
    the cache columns from its first real token to the right end, and ``zeros``, its padding columns."""
    logits: torch.Tensor | None
    cache: Any
    mask: torch.Tensor
    last_pos: torch.Tensor
    extent: list[int]
    zeros: list[int]


class _Running:
    """The decoding batch: one entry per row, and the tensors of the whole batch. Rows join at the end and all
    advance one token per step, so they are ordered oldest first."""

    def __init__(self):
        self.rows: list[int] = []  # record indices
        self.units: list[tuple] = []  # (group, record index) to requeue a row after an out-of-memory
        self.gens: list[list[int]] = []
        self.extent: list[int] = []  # see _Prefilled
        self.zeros: list[int] = []
        self.cache = None
        self.mask = None  # [B, cached columns]
        self.last_pos = None  # [B, 1]
        self.logits = None  # [B, V] float: the next token's logits of every row

    def __len__(self):
        return len(self.rows)

    def padded(self) -> bool:
        return any(self.zeros)

    def keep(self, keep: list[int], device, index: torch.Tensor | None = None):
        if index is None:
            index = host_to_device(keep, device)
        self.cache = cache_select(self.cache, index)
        self.mask, self.last_pos = self.mask[index], self.last_pos[index]
        if self.logits is not None:
            self.logits = self.logits[index]
        self.rows = [self.rows[b] for b in keep]
        self.units = [self.units[b] for b in keep]
        self.gens = [self.gens[b] for b in keep]
        self.extent = [self.extent[b] for b in keep]
        self.zeros = [self.zeros[b] for b in keep]
        # columns that are padding for every remaining row are not needed any more (counted on the host)
        lead = self.mask.shape[1] - max(self.extent) if keep else 0
        if lead and mergeable(self.cache):
            self.cache = cache_trim(self.cache, lead)
            self.mask = self.mask[:, lead:]
            self.zeros = [z - lead for z in self.zeros]


class Engine:
    """The custom engine over one model (see the module docstring); ``stats`` accumulates over its calls."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_padding: float = 0.1, prefix_cache: str = "auto",
                 refill: float = 0.25, prefill_batch: int | None = None):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.raw_model = model
        self.step = as_step_model(model)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_padding = max_padding
        self.prefix_cache = prefix_cache
        self.refill = refill  # admit new rows once this share of the batch is free
        # Prompts prefilled together: one by one on a CPU (no padding, and the causal attention kernel without a
        # mask: a padded batch costs ~25% more there), the whole admission on a GPU.
        self.prefill_batch = prefill_batch
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.stats = EngineStats()
        self.max_new_tokens = 128  # set by each generate call (the merged caches' spare columns)

    # -- public -------------------------------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], config: GenerationConfig,
                 on_result: Callable[[Generation], None] | None = None, progress: bool = False,
                 stats: dict | None = None, desc: str = "generate") -> list[Generation]:
        """Greedy generations of ``prompts`` (in their order); ``on_result`` gets each as soon as its row stops;
        ``stats`` (when given) is updated with the engine's counters, as the other backends do."""
        if not config.sampling.greedy:
            raise ValueError("the custom engine decodes greedily; sampling runs on the hf backend")
        self.max_new_tokens, self.min_new_tokens = config.max_new_tokens, config.min_new_tokens
        self.stop_ids, self.stop_at_line = list(config.stop_ids), config.stop_at_line
        if isinstance(self.step, HFStepModel):
            self.step.reserve = config.max_new_tokens + 8
        ids = [list(p.ids) for p in prompts]
        groups = plan_groups(ids, [p.group for p in prompts], self.prefix_cache)
        out: list = [None] * len(prompts)

        def work(device, tick):
            def emit(g: Generation):
                out[g.index] = g
                tick()
                if on_result is not None:
                    on_result(g)
            self._generate(ids, groups, device, emit)
        self._run(len(prompts), progress, desc, work)
        if stats is not None:
            stats.update(self.stats.as_dict(), batch_size_final=self.batch_size)
        return out

    def next_token_logprobs(self, prompts: list[Prompt], on_result: Callable[[int, torch.Tensor], None],
                            progress: bool = False, desc: str = "log-likelihood") -> None:
        """For every prompt, the log-probabilities [V] (float, on the CPU) of the token after it, handed to
        ``on_result(index, logprobs)`` batch by batch (one forward pass per prompt; shared prefixes once)."""
        ids = [list(p.ids) for p in prompts]
        groups = plan_groups(ids, [p.group for p in prompts], self.prefix_cache)

        def work(device, tick):
            def emit(i: int, logprobs: torch.Tensor):
                tick()
                on_result(i, logprobs)
            for g in groups:
                self._logprobs_group(ids, g, device, emit)
        self._run(len(prompts), progress, desc, work)

    def continuation_logprobs(self, context: list[int], sequences: list[list[int]]) -> list[float]:
        """Summed log-probabilities of each continuation after ``context`` (its token ids); ``sequences``: the token
        ids of context + each continuation tokenized whole (a tokenizer may merge the context's last token with a
        continuation's first, so the shared head is found on them). The shared head is computed once, the
        continuations' remaining tokens right-padded in one batch."""
        self.stats.items += 1
        with self._eval_mode(), torch.no_grad():
            return self._continuations(context, sequences, self.step.device)

    # -- running -------------------------------------------------------------------------------------------------
    def _run(self, n: int, progress: bool, desc: str, work) -> None:
        """Run ``work(device, tick)`` in eval mode without gradients, with a progress bar (``tick()`` per result)."""
        from tqdm import tqdm

        if not n:
            return
        t0 = time.time()
        bar = tqdm(total=n, desc=desc, unit="item", disable=not progress, dynamic_ncols=True)

        def tick():
            self.stats.items += 1
            bar.update(1)

        device = self.step.device
        if self.prefill_batch is None:
            self.prefill_batch = 1 if device.type == "cpu" else self.batch_size
        try:
            with self._eval_mode(), torch.no_grad():
                work(device, tick)
        finally:
            bar.close()
        self.stats.seconds += time.time() - t0

    def _eval_mode(self):
        from contextlib import contextmanager

        @contextmanager
        def mode():
            was_training = getattr(self.step, "training", False)
            if hasattr(self.step, "eval"):
                self.step.eval()
            try:
                yield
            finally:
                if was_training and hasattr(self.step, "train"):
                    self.step.train(True)
        return mode()

    # -- shared pieces -------------------------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, cache, logits_to_keep=1):
        self.stats.forward_calls += 1
        return self.step.forward_step(input_ids, attention_mask, position_ids, cache, logits_to_keep)

    def _prefix_cache(self, prefix: list[int], n_members: int, device):
        P = len(prefix)
        t = host_to_device([prefix], device)
        _, cache = self._forward(t, None, torch.arange(P, device=device)[None], None)
        self.stats.prefix_tokens += P
        self.stats.prompt_tokens += P
        self.stats.prefix_saved_tokens += P * (n_members - 1)
        return cache

    def _prefill(self, rows: list[list[int]], P: int, prefix_cache, device) -> _Prefilled:
        """Left-padded prefill of suffixes (after a shared prefix of P tokens when prefix_cache is given)."""
        B, T = len(rows), max(len(r) for r in rows)
        ids, mask = left_padded(rows, self.pad_id)
        pos = [[P] * (T - len(r)) + list(range(P, P + len(r))) for r in rows]
        ids, mask, pos = (host_to_device(x, device) for x in (ids, mask, pos))
        cache = None
        if P:
            cache = cache_repeat(prefix_cache, B)
            mask = torch.cat([torch.ones((B, P), dtype=mask.dtype, device=device), mask], dim=1)
        zeros = [T - len(r) for r in rows]
        # transformers reads a causal mask without padding as no mask; saying None spares it reading the mask back
        # (a host sync). After a prefix the mask is passed as before (prefix_causal_sdpa checks its pattern).
        logits, cache = self._forward(ids, mask if P or any(zeros) else None, pos, cache)
        self.stats.batches += 1
        self.stats.prompt_tokens += sum(len(r) for r in rows)
        self.stats.padded_tokens += B * T - sum(len(r) for r in rows)
        extent = [P + T if P else len(r) for r in rows]
        return _Prefilled(logits[:, -1].float(), cache, mask, pos[:, -1:], extent, zeros)

    def _oom(self, err: BaseException, n: int) -> None:
        """Handle an out-of-memory on n rows: halve the batch size, or re-raise when one row already fails."""
        if not is_oom(err) or n <= 1:
            raise err
        _free_memory()
        self.batch_size = max(1, n // 2)
        self.stats.oom_splits += 1

    # -- log-likelihood: prefill only ------------------------------------------------------------------------------
    def _logprobs_group(self, ids, g: _Group, device, emit):
        P = len(g.prefix)
        prefix_cache = self._prefix_cache(g.prefix, len(g.members), device) if P else None
        suffix = {i: ids[i][P:] for i in g.members}
        queue = deque(make_batches({i: len(s) for i, s in suffix.items()}, g.members, self.batch_size,
                                   self.max_padding))
        while queue:
            batch = queue.popleft()
            if len(batch) > self.batch_size:  # the batch size shrank after an out-of-memory
                queue.extendleft(reversed([batch[k:k + self.batch_size]
                                           for k in range(0, len(batch), self.batch_size)]))
                continue
            try:
                logits = self._prefill([suffix[i] for i in batch], P, prefix_cache, device).logits
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
                self._oom(e, len(batch))
                queue.appendleft(batch)
                continue
            logp = torch.log_softmax(logits, dim=-1).cpu()
            for b, i in enumerate(batch):
                emit(i, logp[b])

    # -- generation: continuous batching ----------------------------------------------------------------------------
    def _generate(self, ids, groups: list[_Group], device, emit):
        queue: deque = deque()
        for gi, g in enumerate(groups):
            for i in sorted(g.members, key=lambda i: (-len(ids[i]), i)):
                queue.append((gi, i))
        self._remaining = {gi: len(g.members) for gi, g in enumerate(groups)}
        self._prefixes: dict[int, Any] = {}
        single = self.prefill_batch == 1
        self._stop = host_to_device(self.stop_ids, device)
        self._stop_set = set(self.stop_ids)
        self._newline = newline_tokens(self.tokenizer) if self.stop_at_line else bytearray()
        run = _Running()
        merge_ok: bool | None = None  # known after the first prefill
        while queue or run.rows:
            free = self.batch_size - len(run)
            threshold = max(1, int(self.batch_size * self.refill))
            if queue and (not run.rows or (merge_ok and free >= threshold)):
                if merge_ok is None:
                    free = 1  # learn whether this model's cache can be merged before prefilling rows one by one
                single_now = single and bool(merge_ok)
                take = self._take(queue, free if single_now else min(free, self.prefill_batch), groups, ids,
                                  single_now)
                chunks = [[u] for u in take] if single_now else [take]
                try:
                    parts = [self._prefill_units(chunk, groups, ids, device) for chunk in chunks]
                except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
                    self._oom(e, len(take) + len(run))
                    queue.extendleft(reversed(take))
                    continue
                for g_, _ in take:
                    self._remaining[g_] -= 1
                    if self._remaining[g_] <= 0:
                        self._prefixes.pop(g_, None)
                if merge_ok is None:
                    merge_ok = mergeable(parts[0].cache)
                self._admit(run, parts)
                run.rows += [i for _, i in take]
                run.units += list(take)
                run.gens += [[] for _ in take]
                continue  # admit more if there is room, then step

            nxt, keep = self._next_tokens(run, ids, emit)
            if len(keep) < len(run):
                index = host_to_device(keep, device)
                nxt = nxt[index]
                run.logits = None
                run.keep(keep, device, index)
            if not run.rows:
                run = _Running()
                continue
            self._decode_step(run, nxt, queue, device)

    def _next_tokens(self, run: _Running, ids, emit) -> tuple[torch.Tensor, list[int]]:
        """Choose every row's next token (greedy), emit the rows that stop; returns the tokens [B] (on the device)
        and the rows that go on. Reading the tokens is the step's one host synchronisation."""
        logits = run.logits
        young = [b for b, g in enumerate(run.gens) if len(g) < self.min_new_tokens]
        if young and len(self.stop_ids):
            if young[0] == len(run) - len(young):  # the newest rows (the usual case): a slice, no index to copy
                logits[young[0]:, self._stop] = -math.inf
            else:
                rows = host_to_device(young, logits.device)
                logits[rows[:, None], self._stop[None, :]] = -math.inf
        nxt = logits.argmax(dim=-1)
        keep = []
        for b, tok in enumerate(nxt.tolist()):
            gen = run.gens[b]
            gen.append(tok)
            reason = self._stop_reason(gen, tok)
            if reason is None:
                keep.append(b)
            else:
                emit(self._finish(run.rows[b], gen, reason, len(ids[run.rows[b]])))
        return nxt, keep

    def _stop_reason(self, gen: list[int], tok: int) -> str | None:
        return stop_reason(gen, tok, self._stop_set, self.max_new_tokens, self._newline if self.stop_at_line else None,
                           self.tokenizer)

    def _prefill_units(self, chunk: list[tuple], groups: list[_Group], ids, device):
        """Prefill prompts of one group (the group's shared prefix computed on first use)."""
        gi = chunk[0][0]
        P = len(groups[gi].prefix)
        if P and gi not in self._prefixes:
            self._prefixes[gi] = self._prefix_cache(groups[gi].prefix, len(groups[gi].members), device)
        return self._prefill([ids[i][P:] for _, i in chunk], P, self._prefixes.get(gi), device)

    def _admit(self, run: _Running, parts: list[_Prefilled]) -> None:
        """Merge freshly prefilled rows into the running batch (all left-padded to the widest)."""
        if run.rows:
            parts = [_Prefilled(run.logits, run.cache, run.mask, run.last_pos, run.extent, run.zeros)] + parts
        width = max(p.mask.shape[1] for p in parts)
        run.extent = [e for p in parts for e in p.extent]
        run.zeros = [z + width - p.mask.shape[1] for p in parts for z in p.zeros]
        if len(parts) == 1:
            run.logits, run.cache, run.mask, run.last_pos = parts[0].logits, parts[0].cache, parts[0].mask, \
                parts[0].last_pos
            return
        run.cache = cache_merge([p.cache for p in parts], reserve=self.max_new_tokens + 8)
        run.mask = torch.cat([left_pad(p.mask, width, 1) for p in parts], dim=0)
        run.last_pos = torch.cat([p.last_pos for p in parts], dim=0)
        run.logits = torch.cat([p.logits for p in parts], dim=0)
        self.stats.merges += 1

    def _requeue(self, queue: deque, units: list[tuple]) -> None:
        queue.extendleft(reversed(units))
        for g_, _ in units:
            self._remaining[g_] += 1

    def _take(self, queue: deque, free: int, groups: list[_Group], ids, single: bool) -> list[tuple]:
        """The next prompts to admit, at most ``free``. Prefilled one by one (``single``), any prompts; prefilled
        together, prompts of one group whose left padding stays under ``max_padding`` (the queue is sorted longest
        first within a group)."""
        take = [queue.popleft()]
        gi, first = take[0]
        P = len(groups[gi].prefix)
        width = len(ids[first]) - P
        total = width
        while queue and len(take) < free:
            g2, i = queue[0]
            if not single:
                n = len(ids[i]) - P
                if g2 != gi or too_much_padding(width, len(take) + 1, total + n, self.max_padding):
                    break
                total += n
            take.append(queue.popleft())
        return take

    def _decode_step(self, run: _Running, nxt, queue, device):
        """One forward of the running batch on its newest tokens; on out-of-memory, roll back, requeue the most
        recently admitted rows and retry with the rest."""
        while True:
            width = run.mask.shape[1]
            mask = torch.cat([run.mask, torch.ones((len(run), 1), dtype=run.mask.dtype, device=device)], dim=1)
            try:
                # no padding in any row: no mask (transformers would find that out by reading the mask back)
                logits, cache = self._forward(nxt[:, None], mask if run.padded() else None, run.last_pos + 1,
                                              run.cache)
            except Exception as e:  # noqa: BLE001 - only out-of-memory is handled
                self._oom(e, len(run))
                run.cache = cache_truncate(run.cache, width)
                keep = list(range(self.batch_size))
                self._requeue(queue, run.units[self.batch_size:])
                nxt = nxt[:self.batch_size]
                run.logits = None
                run.keep(keep, device)
                continue
            run.cache, run.mask, run.last_pos = cache, mask, run.last_pos + 1
            run.extent = [e + 1 for e in run.extent]
            run.logits = logits[:, -1].float()
            self.stats.decode_steps += 1
            return

    # -- results -------------------------------------------------------------------------------------------------
    def _finish(self, index: int, gen: list[int], reason: str, prompt_tokens: int) -> Generation:
        self.stats.new_tokens += len(gen)
        self.stats.stops[reason] = self.stats.stops.get(reason, 0) + 1
        return Generation(index, list(gen), self.tokenizer.decode(gen, skip_special_tokens=True), reason,
                          prompt_tokens)

    # -- multi-token continuations -------------------------------------------------------------------------------
    def _continuations(self, context: list[int], conts_full: list[list[int]], device) -> list[float]:
        n = min(common_prefix(conts_full + [context]), min(len(s) for s in conts_full) - 1)
        shared = context[:n]
        t = torch.tensor([shared], device=device)
        logits, cache = self._forward(t, torch.ones_like(t), torch.arange(n, device=device)[None], None)
        first = torch.log_softmax(logits[:, -1].float(), dim=-1)[0]
        conts = [c[n:] for c in conts_full]
        scores = [float(first[c[0]]) for c in conts]
        longest = max(len(c) for c in conts)
        if longest > 1:  # the remaining tokens of each continuation, right-padded, in one batch
            B, T = len(conts), longest - 1
            ids = torch.full((B, T), self.pad_id, dtype=torch.long)
            mask = torch.zeros((B, n + T), dtype=torch.long)
            mask[:, :n] = 1
            for b, c in enumerate(conts):
                ids[b, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
                mask[b, n:n + len(c) - 1] = 1
            pos = torch.arange(n, n + T)[None].expand(B, -1)
            logits, _ = self._forward(ids.to(device), mask.to(device), pos.to(device), cache_repeat(cache, B),
                                      logits_to_keep=T)
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            for b, c in enumerate(conts):
                scores[b] += sum(float(logp[b, k, c[k + 1]]) for k in range(len(c) - 1))
        self.stats.prompt_tokens += n
        return scores
