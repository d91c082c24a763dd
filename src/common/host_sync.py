"""Count aten ops and host synchronisations of a piece of code, on any device (a CPU included).

On a GPU, Python only queues kernels; the host waits for the device (a *host synchronisation*) whenever it needs a
value computed there, and every such wait stalls the queue. ``HostSyncCounter`` counts, inside its ``with`` block,
the operations that force one on CUDA, whatever device the code runs on:

* ``item``: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``if t.any():``);
* ``shape``: ops whose output size depends on the data (``nonzero``, ``masked_select``, ``unique``, ``bincount``,
  ``repeat_interleave`` without ``output_size``, indexing with a boolean mask);
* ``to_host``: ``.tolist()``, ``.numpy()``, ``.cpu()`` of a tensor that was not built on the host;
* ``to_device``: a tensor built from host data (``torch.tensor``/``as_tensor``/``from_numpy``) moved to a device
  (``device=`` given, or ``.to(device)``/``.cuda()`` later) with a blocking copy: torch's pageable host-to-device
  copy waits for the stream (``non_blocking=True`` from pinned memory does not, and is not counted).

``ops`` counts every aten op dispatched (the number of kernels a GPU would launch, roughly: views included). On CUDA,
``torch.cuda.set_sync_debug_mode("warn")`` is the device's own check; ``cuda_sync_warnings`` counts what it reports.
"""
from __future__ import annotations

import warnings
import weakref
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SHAPE_OPS = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "bincount", "histc",
              "nonzero_numpy", "argwhere"}
_HOST_BORN = ("tensor", "as_tensor", "from_numpy")
_TO_HOST = ("tolist", "numpy", "cpu")


def _op_name(func) -> str:
    return func._overloadpacket.__name__ if hasattr(func, "_overloadpacket") else str(func)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        c = self.counter
        c.ops += 1
        c.op_names[name] += 1
        if name == "_local_scalar_dense" and not c.host_born(args[0]):
            c.add("item", name)
        elif name in _SHAPE_OPS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                    and isinstance(args[0], torch.Tensor) and args[0].dim() > 0
                                    and len(args) == 1) or (name in ("index", "index_put") and _has_bool_index(args)):
            c.add("shape", name)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: HostSyncCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        c = self.counter
        out = func(*args, **kwargs)
        if name in _HOST_BORN:
            if kwargs.get("device") is not None:
                c.add("to_device", name)
            elif isinstance(out, torch.Tensor):
                c.mark_host_born(out)
        elif name in _TO_HOST and args and isinstance(args[0], torch.Tensor) and not c.host_born(args[0]):
            c.add("to_host", name)
        elif name in ("to", "cuda") and args and c.host_born(args[0]) and not kwargs.get("non_blocking") \
                and _moves_device(args[1:], kwargs, name):
            c.add("to_device", name)
        return out


def _moves_device(args, kwargs, name: str) -> bool:
    """``.cuda()``, or ``.to(device)`` with a device (a dtype alone moves nothing). A ``.to(device)`` of host data
    counts even when that device is the CPU: the same line copies to the GPU when the model is there."""
    if name == "cuda":
        return True
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, (str, torch.device))


class HostSyncCounter:
    """``with HostSyncCounter() as c: ...`` then ``c.ops``, ``c.syncs`` (total) and ``c.by_kind`` / ``c.where``."""

    def __init__(self, cuda_debug: bool = False):
        self.ops = 0
        self.op_names: Counter = Counter()
        self.by_kind: Counter = Counter()
        self.where: Counter = Counter()  # "kind:op" -> count
        self._born: dict[int, weakref.ref] = {}  # tensors built from host data, by id (tensors compare elementwise)
        self.cuda_debug = cuda_debug and torch.cuda.is_available()
        self.cuda_sync_warnings = 0
        self._modes: list = []
        self._warnings = None

    @property
    def syncs(self) -> int:
        return sum(self.by_kind.values())

    def host_born(self, t) -> bool:
        ref = self._born.get(id(t)) if isinstance(t, torch.Tensor) else None
        return ref is not None and ref() is t

    def mark_host_born(self, t: torch.Tensor) -> None:
        key = id(t)
        self._born[key] = weakref.ref(t, lambda _: self._born.pop(key, None))

    def add(self, kind: str, op: str) -> None:
        self.by_kind[kind] += 1
        self.where[f"{kind}:{op}"] += 1

    def __enter__(self) -> HostSyncCounter:
        if self.cuda_debug:
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._modes = [_Function(self), _Dispatch(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        if self.cuda_debug:
            torch.cuda.set_sync_debug_mode(0)
            self.cuda_sync_warnings = sum("synchroniz" in str(w.message) for w in self._caught)
            self._warnings.__exit__(*exc)

    def summary(self) -> dict:
        out = {"ops": self.ops, "syncs": self.syncs, "by_kind": dict(self.by_kind), "where": dict(self.where)}
        if self.cuda_debug:
            out["cuda_sync_warnings"] = self.cuda_sync_warnings
        return out
