"""Step 4's inference engine: batched greedy generation that stops as soon as the extractor's input is complete, and a
log-likelihood mode. ``predict`` is the one entry point (the CLI, the trainer's dev evaluation and the benchmark call
it).

Generation (``mode="generate"``)
    Prompts are tokenized as they are (step 1 prompts already carry BOS/system prefix: ``add_special_tokens=False``)
    and queued longest first (an out-of-memory shows up at once). Decoding runs on one batch of at most
    ``batch_size`` rows that is kept full: whenever a quarter of its rows have finished, the next prompts of the queue
    are prefilled and their KV cache is merged into the running batch (continuous batching, ``kvcache.cache_merge``;
    rows of different lengths are left-padded in the cache and masked). Prefill computes the logits of the last
    position only. On a CPU each prompt is prefilled on its own (``prefill_batch=1``: no padding, and the causal
    attention kernel runs without a mask; a padded batch costs ~25% more there), so prefill costs exactly one forward
    pass per prompt; on a GPU the admitted prompts are prefilled together (left padding kept under ``max_padding`` of
    their tokens). Decoding is greedy with a preallocated KV cache (``kvcache.SlotCache``: no copy of the cache per
    step). A row stops as soon as

    * it emitted a stop token (the chat format's end token, the tokenizer's EOS or the generation config's EOS ids;
      they are suppressed during the first ``min_new_tokens`` tokens, as ``min_new_tokens`` does in HF generate), or
    * its text has a complete first non-empty line (a newline after any other character,
      ``extract.line_complete``): the extractor reads only that line, so the letter cannot change any more, or
    * it reached ``max_new_tokens``.

    Finished rows leave the batch (and its KV cache) at once, and cache columns no row needs any more are dropped, so
    no compute is spent on them. The extracted letters are therefore those of the full decode with the same settings
    (a test checks it against HF generate). Caches that cannot be merged (sliding-window layers) fall back to
    batch-by-batch decoding.

    One host synchronisation per decoding step (on a GPU the host otherwise waits for the device's queue): the next
    tokens are read back once; everything else is known on the host or stays on the device. Young rows' stop tokens
    are masked on the device (rows join at the end, so the young ones are a slice); a row's text is decoded for the
    line check only when its token brings a newline (``newline_tokens``); each row's real and padding columns are
    counted on the host (``_Prefilled.extent``/``zeros``), so no mask is read back, and a step without padding passes
    no mask; index tensors are copied from pinned memory without waiting (``host_to_device``).
    ``bench/decode_overhead.py`` counts ops and syncs per step (``src/common/host_sync.py``).

Log-likelihood (``mode="loglik"``)
    One forward pass per item over ``prompt + answer_phrase + "("``; the answer is the item's option letter with the
    highest next-token log-probability (lm-evaluation-harness style). When a letter is not a single token after that
    context for this tokenizer, the letter's full continuation is scored (sum of its token log-probabilities).

Shared prefixes (``prefix_cache="auto"``)
    Items of one source share a token prefix: the system block and the instruction, plus every shot they have in
    common (the first shot is often drawn for many items of a source from a small dev pool; with step 1's
    ``--shot-mode fixed`` all of them). ``plan_groups`` groups them; a group's prefix is computed once, its KV cache
    is copied for every admitted row, and only the suffixes are prefilled (on the causal kernel without a mask,
    ``attention.prefix_causal_sdpa``). On the real test set this skips 26% of the prompt tokens.

Out of memory
    The batch size halves on an out-of-memory error and the work is retried: a failed prefill puts its prompts back
    in the queue, a failed decoding step rolls the cache back and returns the most recently admitted rows to the
    queue. The smaller batch size is kept for the rest of the run; finished rows are never redone.

The model behind the engine: the ``StepModel`` protocol
    Every model call goes through one method::

        forward_step(input_ids, attention_mask, position_ids, past_key_values, logits_to_keep=1) -> (logits, cache)

    ``input_ids``/``position_ids`` are [B, T] (long), ``attention_mask`` is [B, past + T] (1 = real token) or None
    when no row has padding (a wrapper passes it on as it is), ``past_key_values`` is None on the first call and afterwards whatever the previous call returned; ``logits`` are
    [B, logits_to_keep, V] for the last positions. A plain transformers model is wrapped in ``HFStepModel``. Anything
    else with a ``forward_step`` method and a ``device`` attribute (optionally ``eval()``/``train()``/``training``)
    can be passed to ``predict`` instead of a model, e.g. a proxy-tuning wrapper computing
    ``logits = base + (tuned - raw)`` over three ``HFStepModel``s. Its cache may be a transformers ``Cache`` or a
    (nested) tuple/list of them: the engine only selects, repeats, merges and trims batch rows/columns of a cache
    (``kvcache``), applied to each element.

Training-time use: ``predict`` switches the model to eval mode, runs under ``torch.no_grad()`` and restores the
previous mode. Ranks stop decoding at different times, so with DeepSpeed ZeRO-3 (where every forward is a collective)
call it on a gathered/unsharded model or on rank-local copies only.
"""
from __future__ import annotations

import math
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from src.evaluate import mmedlm
from src.evaluate.attention import decode_step_mask, prefix_attention
from src.evaluate.extract import extract, line_complete
from src.evaluate.kvcache import (
    SlotCache,
    cache_length,
    cache_merge,
    cache_repeat,
    cache_select,
    cache_trim,
    cache_truncate,
    left_pad,
    mergeable,
    supports_slot_cache,
)

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


# ----------------------------------------------------------------------------------------------- stop tokens
def stop_token_ids(tokenizer, fmt=None, model=None) -> list[int]:
    """Token ids that end a generation: the chat format's end token, the tokenizer's EOS and the generation config's
    EOS ids (what HF generate would stop on)."""
    ids: list[int] = []
    if fmt is not None:
        ids.append(fmt.stop_token(tokenizer))
    ids.append(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids += eos if isinstance(eos, (list, tuple)) else [eos]
    out = []
    for i in ids:
        if i is not None and int(i) >= 0 and int(i) not in out:
            out.append(int(i))
    return out


def resolve_fmt(tokenizer, model, fmt):
    if fmt is not None and not isinstance(fmt, str):
        return fmt
    from src.common.chat_formats import resolve_format

    return resolve_format(tokenizer, getattr(model, "config", None), fmt)


# ----------------------------------------------------------------------------------------------- host <-> device
def host_to_device(values: list[int], device, dtype=torch.long) -> torch.Tensor:
    """A tensor of host values on ``device`` without waiting for the device: torch's ordinary host-to-device copy
    waits for the stream to drain (a host synchronisation on every call); a copy from pinned memory does not (torch's
    pinned-memory allocator keeps the buffer until the copy is done)."""
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


_NEWLINE_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def newline_tokens(tokenizer) -> bytearray:
    """table[t] = 1 when token t's text contains a newline. A row's first non-empty line can only become complete
    at a step whose token brings a newline (decoding appends text; a newline byte is never part of a multi-byte
    character), so only those rows are decoded to check ``line_complete``. Cached per tokenizer."""
    try:
        return _NEWLINE_TABLES[tokenizer]
    except (KeyError, TypeError):
        pass
    texts = [tokenizer.decode([t], skip_special_tokens=True) for t in range(len(tokenizer))]
    table = bytearray("\n" in text for text in texts)
    try:
        _NEWLINE_TABLES[tokenizer] = table
    except TypeError:  # a tokenizer that cannot be weakly referenced: not cached
        pass
    return table


def completes_line(gen: list[int], tok: int, newline: bytearray | None, tokenizer) -> bool:
    """True when ``tok``, just appended to ``gen``, completes the first non-empty line (``newline``: the table of
    ``newline_tokens``; None = no early stop). The text is decoded only when the token brings a newline: nothing
    else completes a line."""
    return newline is not None and (tok >= len(newline) or bool(newline[tok])) \
        and line_complete(tokenizer.decode(gen, skip_special_tokens=True))


def stop_reason(gen: list[int], tok: int, stops: set[int], max_new_tokens: int, newline: bytearray | None,
                tokenizer) -> str | None:
    """Why a row stops once ``tok`` is appended to its tokens ``gen`` (None: it goes on): "eos" (a stop token),
    "max_tokens", or "line" (``completes_line``). The one stopping rule of every engine that decodes token by
    token."""
    if tok in stops:
        return "eos"
    if len(gen) >= max_new_tokens:
        return "max_tokens"
    if completes_line(gen, tok, newline, tokenizer):
        return "line"
    return None


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


def _lcp(seqs: list[list[int]]) -> int:
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


def plan_groups(records: list[dict], ids: list[list[int]], prefix_cache: str = "auto") -> list[_Group]:
    """Group items whose prompts start with the same tokens; each group's shared prefix is computed once.

    Items of a source whose first shot is the same share the system block, the instruction and at least that shot
    (with step 1's ``--shot-mode fixed``, every item of a source: all the shots); the other items of a source still
    share the system block and the instruction. A group needs two members and a prefix of ``MIN_PREFIX_TOKENS``;
    everything else is one group without a prefix. On the real XMedBench test set (per-item shots drawn from each
    source's dev pool) this skips 26% of all prompt tokens.
    """
    if prefix_cache not in ("auto", "off"):
        raise ValueError("prefix_cache must be 'auto' or 'off'")
    if prefix_cache == "off":
        return [_Group([], list(range(len(records))))]

    groups: list[_Group] = []

    def group_by(key, items: list[int]) -> list[int]:
        """A group for each key whose items share a long enough prefix; returns the other items."""
        buckets: dict = {}
        for i in items:
            buckets.setdefault(key(records[i]), []).append(i)
        left = []
        for members in buckets.values():
            n = 0
            if len(members) > 1:
                n = min(_lcp([ids[i] for i in members]), min(len(ids[i]) for i in members) - 1)
            if n >= MIN_PREFIX_TOKENS:
                groups.append(_Group(ids[members[0]][:n], members))
            else:
                left += members
        return left

    rest = group_by(lambda r: (r.get("source"), (r.get("shots") or [None])[0]), list(range(len(records))))
    loose = group_by(lambda r: r.get("source"), sorted(rest))
    if loose:
        groups.append(_Group([], sorted(loose)))
    return groups


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
    def __init__(self, model, tokenizer, *, fmt=None, batch_size: int = 8, max_new_tokens: int = 128,
                 min_new_tokens: int = 2, mode: str = "generate", max_padding: float = 0.1,
                 prefix_cache: str = "auto", early_stop: bool = True, stop_ids: list[int] | None = None,
                 refill: float = 0.25, prefill_batch: int | None = None):
        if mode not in ("generate", "loglik"):
            raise ValueError("mode must be 'generate' or 'loglik'")
        if batch_size < 1 or max_new_tokens < 1 or min_new_tokens < 0:
            raise ValueError("batch_size and max_new_tokens must be >= 1, min_new_tokens >= 0")
        self.raw_model = model
        self.step = as_step_model(model)
        if isinstance(self.step, HFStepModel):
            self.step.reserve = max_new_tokens + 8
        self.tokenizer = tokenizer
        self.fmt = resolve_fmt(tokenizer, model, fmt) if (fmt is not None or stop_ids is None) else None
        self.stop_ids = stop_ids if stop_ids is not None else stop_token_ids(tokenizer, self.fmt, model)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.mode = mode
        self.max_padding = max_padding
        self.prefix_cache = prefix_cache
        self.early_stop = early_stop
        self.refill = refill  # admit new rows once this share of the batch is free
        # Prompts prefilled together: one by one on a CPU (no padding, and the causal attention kernel without a
        # mask: a padded batch costs ~25% more there), the whole admission on a GPU.
        self.prefill_batch = prefill_batch
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.stats = EngineStats()

    # -- public -------------------------------------------------------------------------------------------------
    def run(self, records: list[dict], callback: Callable[[dict], None] | None = None,
            progress: bool = True) -> list[dict]:
        from tqdm import tqdm

        t0 = time.time()
        records = list(records)
        out: list[dict | None] = [None] * len(records)
        if not records:
            return []
        texts = [r["prompt"] + (r.get("answer_phrase", "") + "(" if self.mode == "loglik" else "") for r in records]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        letter_ids = self._letter_token_ids(records) if self.mode == "loglik" else None
        bar = tqdm(total=len(records), desc=f"step 4 ({self.mode})", unit="item", disable=not progress,
                   dynamic_ncols=True)

        def emit(i: int, pred: dict):
            out[i] = pred
            self.stats.items += 1
            if callback is not None:
                callback(pred)
            bar.update(1)

        general = [i for i in range(len(records)) if letter_ids is not None and letter_ids[i] is None]
        general_set = set(general)
        fast = [i for i in range(len(records)) if i not in general_set]
        groups = [_Group(g.prefix, [fast[j] for j in g.members])
                  for g in plan_groups([records[i] for i in fast], [ids[i] for i in fast], self.prefix_cache)]
        device = self.step.device
        if self.prefill_batch is None:
            self.prefill_batch = 1 if device.type == "cpu" else self.batch_size
        was_training = getattr(self.step, "training", False)
        if hasattr(self.step, "eval"):
            self.step.eval()
        try:
            with torch.no_grad():
                if self.mode == "generate":
                    self._generate(records, ids, groups, device, emit)
                else:
                    for g in groups:
                        self._loglik_group(records, ids, letter_ids, g, device, emit)
                for i in general:
                    emit(i, self._loglik_general(records[i], texts[i], device))
        finally:
            if was_training and hasattr(self.step, "train"):
                self.step.train(True)
            bar.close()
        self.stats.seconds += time.time() - t0
        return out  # type: ignore[return-value]

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
        ids, mask, pos = [], [], []
        for r in rows:
            pad = T - len(r)
            ids.append([self.pad_id] * pad + r)
            mask.append([0] * pad + [1] * len(r))
            pos.append([P] * pad + list(range(P, P + len(r))))
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
    def _loglik_group(self, records, ids, letter_ids, g: _Group, device, emit):
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
                scores = {L: float(logp[b, t]) for L, t in letter_ids[i].items()}
                emit(i, self._loglik_prediction(records[i], scores))

    # -- generation: continuous batching ----------------------------------------------------------------------------
    def _generate(self, records, ids, groups: list[_Group], device, emit):
        queue: deque = deque()
        for gi, g in enumerate(groups):
            for i in sorted(g.members, key=lambda i: (-len(ids[i]), i)):
                queue.append((gi, i))
        self._remaining = {gi: len(g.members) for gi, g in enumerate(groups)}
        self._prefixes: dict[int, Any] = {}
        single = self.prefill_batch == 1
        self._stop = host_to_device(self.stop_ids, device)
        self._stop_set = set(self.stop_ids)
        self._newline = newline_tokens(self.tokenizer) if self.early_stop else bytearray()
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

            nxt, keep = self._next_tokens(run, records, emit)
            if len(keep) < len(run):
                index = host_to_device(keep, device)
                nxt = nxt[index]
                run.logits = None
                run.keep(keep, device, index)
            if not run.rows:
                run = _Running()
                continue
            self._decode_step(run, nxt, queue, device)

    def _next_tokens(self, run: _Running, records, emit) -> tuple[torch.Tensor, list[int]]:
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
                emit(run.rows[b], self._generate_prediction(records[run.rows[b]], gen, reason))
        return nxt, keep

    def _stop_reason(self, gen: list[int], tok: int) -> str | None:
        return stop_reason(gen, tok, self._stop_set, self.max_new_tokens, self._newline if self.early_stop else None,
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

    # -- predictions ---------------------------------------------------------------------------------------------
    def _base(self, rec: dict) -> dict:
        return {"id": rec.get("id"), "source": rec.get("source"), "language": rec.get("language")}

    def _generate_prediction(self, rec: dict, gen: list[int], reason: str) -> dict:
        self.stats.new_tokens += len(gen)
        self.stats.stops[reason] = self.stats.stops.get(reason, 0) + 1
        return generation_prediction(rec, self.tokenizer.decode(gen, skip_special_tokens=True), len(gen), reason)

    def _loglik_prediction(self, rec: dict, scores: dict[str, float]) -> dict:
        letter = max(scores, key=lambda L: scores[L])  # first letter wins a tie
        gold = rec.get("answer")
        return {**self._base(rec), "raw": "", "letter": letter, "rule": "loglik", "gold": gold,
                "correct": letter == gold, "tie": sum(v == scores[letter] for v in scores.values()) > 1,
                "scores": {L: round(v, 4) for L, v in scores.items()}}

    # -- log-likelihood helpers ----------------------------------------------------------------------------------
    def _letter_token_ids(self, records: list[dict]) -> list[dict | None]:
        """Per record: letter -> the single token that follows ``prompt + phrase + "("``, or None when some letter is
        not one token there (then the record is scored by ``_loglik_general``). Checked on the end of the context
        (from the answer phrase on), cached per phrase and letter set."""
        cache: dict = {}
        out: list[dict | None] = []
        for r in records:
            key = (r.get("answer_phrase", ""), tuple(r["letters"]))
            if key not in cache:
                cache[key] = self._single_tokens(r)
            out.append(cache[key])
        return out

    def _single_tokens(self, rec: dict) -> dict | None:
        tok = self.tokenizer
        ctx = rec["prompt"] + rec.get("answer_phrase", "") + "("
        base = tok(ctx, add_special_tokens=False)["input_ids"]
        result = {}
        for L in rec["letters"]:
            full = tok(ctx + L, add_special_tokens=False)["input_ids"]
            if len(full) != len(base) + 1 or full[:-1] != base:
                return None
            result[L] = full[-1]
        return result

    def _loglik_general(self, rec: dict, ctx: str, device) -> dict:
        """Score each letter's whole continuation after the context (for tokenizers that merge "(" with a letter)."""
        tok = self.tokenizer
        seqs = {L: tok(ctx + L, add_special_tokens=False)["input_ids"] for L in rec["letters"]}
        base = tok(ctx, add_special_tokens=False)["input_ids"]
        n = min(_lcp(list(seqs.values()) + [base]), min(len(s) for s in seqs.values()) - 1)
        shared = base[:n]
        t = torch.tensor([shared], device=device)
        logits, cache = self._forward(t, torch.ones_like(t), torch.arange(n, device=device)[None], None)
        first = torch.log_softmax(logits[:, -1].float(), dim=-1)[0]
        letters = list(seqs)
        conts = [seqs[L][n:] for L in letters]
        scores = {L: float(first[c[0]]) for L, c in zip(letters, conts)}
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
            for b, (L, c) in enumerate(zip(letters, conts)):
                scores[L] += sum(float(logp[b, k, c[k + 1]]) for k in range(len(c) - 1))
        self.stats.prompt_tokens += n
        return self._loglik_prediction(rec, scores)


def generation_prediction(rec: dict, raw: str, new_tokens: int, stop: str) -> dict:
    """The prediction of a generated answer, as every generation backend writes it (this engine, ``--engine hf``,
    a serving backend): the letter and rule come from the extractor, ``stop`` says why generation ended."""
    if mmedlm.is_mmedbench(rec):  # several letters and a rationale (src/evaluate/mmedlm.py)
        return mmedlm.prediction(rec, raw, new_tokens, stop)
    ex = extract(raw, rec.get("letters"))
    gold = rec.get("answer")
    return {"id": rec.get("id"), "source": rec.get("source"), "language": rec.get("language"), "raw": raw,
            "letter": ex.letter, "rule": ex.rule, "gold": gold, "correct": ex.letter is not None and ex.letter == gold,
            "tie": ex.tie, "new_tokens": new_tokens, "stop": stop}


def predict(model, tokenizer, records, *, fmt=None, batch_size: int = 8, max_new_tokens: int = 128,
            min_new_tokens: int = 2, mode: str = "generate", progress: bool = True, max_padding: float = 0.1,
            prefix_cache: str = "auto", early_stop: bool = True, callback: Callable[[dict], None] | None = None,
            stats: dict | None = None, prefill_batch: int | None = None) -> list[dict]:
    """Predict an answer letter for every step-1 record (in the order given).

    Each prediction: {"id", "source", "language", "raw", "letter", "rule", "gold", "correct", "tie", ...} plus
    "new_tokens"/"stop" (generate) or "scores" (loglik). ``model``: a transformers causal LM or any ``StepModel``;
    ``fmt``: a ChatFormat or format name (default: resolved from the tokenizer/config; used for the stop token).
    ``callback`` receives each prediction as soon as it is made (for appending to a file); ``stats``, if given, is
    filled with the engine's counters (batches, tokens, padding, prefix reuse, stops, seconds). ``prefill_batch``:
    prompts prefilled together (default: 1 on a CPU, ``batch_size`` on a GPU).
    """
    engine = Engine(model, tokenizer, fmt=fmt, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    min_new_tokens=min_new_tokens, mode=mode, max_padding=max_padding, prefix_cache=prefix_cache,
                    early_stop=early_stop, prefill_batch=prefill_batch)
    preds = engine.run(list(records), callback=callback, progress=progress)
    if stats is not None:
        stats.update(engine.stats.as_dict())
        stats["batch_size_final"] = engine.batch_size
    return preds
