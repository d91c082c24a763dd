"""KV-cache helpers for step 4's engine: a preallocated cache, and row operations on any transformers cache.

``SlotCache`` is a cache like transformers' ``DynamicCache`` whose layers write new keys/values into a preallocated buffer instead of
concatenating (``DynamicLayer`` copies the whole cache at every decoding step, which on a CPU costs as much as the
step's matrix products). Attention reads a view of the used columns.

The row operations work on ``SlotCache``, plain ``DynamicCache`` and (nested) tuples/lists of them (a wrapper such as
proxy-tuning returns one cache per model):

* ``cache_select(cache, index)``: keep batch rows (finished rows leave the batch);
* ``cache_repeat(cache, n)``: n copies of a one-row cache in a new object (a shared prefix for a batch);
* ``cache_merge([a, b, ...])``: the rows of several caches in one, each left-padded with zeros to the widest (new
  items join a running batch; the attention mask marks the padding);
* ``cache_trim(cache, n)``: drop the first n columns (padding no row needs any more);
* ``cache_truncate(cache, n)``: keep the first n columns (undo a forward that failed half way, e.g. out of memory).

Caches with sliding-window or other special layers support select/repeat (transformers' own methods) but not
merge/trim; ``mergeable`` tells which.
"""
from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicLayer

from src.generation.padding import left_pad


class SlotLayer(DynamicLayer):
    """A full-attention layer cache with a preallocated buffer [B, H, capacity, D]; used columns are [start, end)."""

    def __init__(self, reserve: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.reserve = reserve
        self._k = self._v = None
        self.start = self.end = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _sync(self):
        self.keys = self._k[:, :, self.start:self.end]
        self.values = self._v[:, :, self.start:self.end]

    def _realloc(self, capacity: int, rows: torch.Tensor | None = None):
        used = self.end - self.start
        k, v = self._k, self._v
        if rows is not None:
            k, v = k[rows], v[rows]
        shape = (k.shape[0], k.shape[1], capacity, k.shape[3])
        self._k = k.new_zeros(shape)
        self._v = v.new_zeros(shape)
        self._k[:, :, :used] = k[:, :, self.start:self.end]
        self._v[:, :, :used] = v[:, :, self.start:self.end]
        self.start, self.end = 0, used

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._k is None:
            shape = (*key_states.shape[:2], n + self.reserve, key_states.shape[3])
            self._k = key_states.new_zeros(shape)
            self._v = value_states.new_zeros(shape)
            self.start = self.end = 0
        elif self.end + n > self._k.shape[2]:
            self._realloc(self.end - self.start + n + self.reserve)
        self._k[:, :, self.end:self.end + n] = key_states
        self._v[:, :, self.end:self.end + n] = value_states
        self.end += n
        self._sync()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start if self._k is not None else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._sync()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._sync()

    def reset(self) -> None:
        self._k = self._v = None
        self.start = self.end = 0
        self.keys = self.values = None
        self.is_initialized = False


class SlotCache(Cache):
    """A cache made of ``SlotLayer``s (full-attention models only), created lazily one per layer through the
    ``Cache`` base class's public ``layer_class_to_replicate`` hook (transformers 5.23)."""

    def __init__(self, reserve: int = 64):
        super().__init__(layer_class_to_replicate=lambda: SlotLayer(reserve=reserve))


def supports_slot_cache(model) -> bool:
    """True for transformers models whose layers all use full attention (no sliding window, no linear attention)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return False
    try:
        cfg = model.config.get_text_config(decoder=True)
    except Exception:  # noqa: BLE001 - odd configs: stay with the model's own cache
        return False
    types = getattr(cfg, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    return not getattr(cfg, "is_encoder_decoder", False)


# ------------------------------------------------------------------------------------------ row operations
def _layers(cache):
    return getattr(cache, "layers", None)


def mergeable(cache) -> bool:
    if cache is None:
        return False
    if isinstance(cache, (tuple, list)):
        return all(mergeable(c) for c in cache)
    layers = _layers(cache)
    return layers is not None and all(type(layer) in (SlotLayer, DynamicLayer) for layer in layers)


def cache_select(cache, index: torch.Tensor):
    if cache is None:
        return None
    if isinstance(cache, (tuple, list)):
        return type(cache)(cache_select(c, index) for c in cache)
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
        return cache
    raise TypeError(f"cannot select batch rows of a {type(cache).__name__} cache")


def cache_repeat(cache, n: int):
    if isinstance(cache, (tuple, list)):
        return type(cache)(cache_repeat(c, n) for c in cache)
    new = copy.deepcopy(cache)
    if n != 1:
        if not hasattr(new, "batch_repeat_interleave"):
            raise TypeError(f"cannot repeat a {type(cache).__name__} cache")
        new.batch_repeat_interleave(n)
    return new


def _set_kv(layer, k, v, reserve: int):
    if isinstance(layer, SlotLayer):
        used = k.shape[2]
        shape = (k.shape[0], k.shape[1], used + max(reserve, layer.reserve), k.shape[3])
        layer._k, layer._v = k.new_zeros(shape), v.new_zeros(shape)
        layer._k[:, :, :used], layer._v[:, :, :used] = k, v
        layer.start, layer.end = 0, used
        layer._sync()
    else:
        layer.keys, layer.values = k, v


def cache_merge(caches: list, reserve: int = 64):
    """The rows of all ``caches`` in one (the first object is reused), right-aligned, with zero left padding."""
    first = caches[0]
    if isinstance(first, (tuple, list)):
        return type(first)(cache_merge(list(parts), reserve) for parts in zip(*caches))
    for layers in zip(*(_layers(c) for c in caches)):
        if not all(layer.is_initialized for layer in layers):
            raise ValueError("cannot merge caches with uninitialised layers")
        width = max(layer.keys.shape[2] for layer in layers)
        k = torch.cat([left_pad(layer.keys, width, 2) for layer in layers], dim=0)
        v = torch.cat([left_pad(layer.values, width, 2) for layer in layers], dim=0)
        _set_kv(layers[0], k, v, reserve)
    return first


def cache_trim(cache, n: int):
    """Drop the first ``n`` columns of every layer."""
    if n <= 0:
        return cache
    if isinstance(cache, (tuple, list)):
        return type(cache)(cache_trim(c, n) for c in cache)
    for layer in _layers(cache):
        if isinstance(layer, SlotLayer):
            layer.start = min(layer.end, layer.start + n)
            layer._sync()
        else:
            layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]
    return cache


def cache_truncate(cache, n: int):
    """Keep only the first ``n`` columns of every layer that has more (roll back a forward that failed)."""
    if isinstance(cache, (tuple, list)):
        return type(cache)(cache_truncate(c, n) for c in cache)
    for layer in _layers(cache) or []:
        if layer.get_seq_length() > n:
            if isinstance(layer, SlotLayer):
                layer.end = layer.start + n
                layer._sync()
            else:
                layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
    return cache


def cache_length(cache) -> int:
    if isinstance(cache, (tuple, list)):
        return cache_length(cache[0])
    return cache.get_seq_length()
