"""Post-MoE upcycling for any HF decoder (docs/moe.md), with the published ApolloMoE recipe as the default.

`upcycle(model)` turns the MLP of the last N decoder layers into a `SparseMoeBlock`: E experts, each a copy of that
layer's gated MLP, stored fused like transformers' own MoE classes (`experts.gate_up_proj [E, 2I, H]`,
`experts.down_proj [E, H, I]`), plus a router `gate: Linear(H, E)`. The settings live in one config field
(`config.post_moe`) so a checkpoint says what it is.

Routing (src/models/router.py): softmax over E in fp32, top-k; the k weights are renormalised by default so that with
identical experts the upcycled model computes exactly what the dense one did (`norm_topk_prob=False` is the
reference's raw probabilities). While training with `language_ids`, the checkpoint's routing rule applies: hybrid
(default: each token's family expert, language id = expert index, is always among its k), hard (top-1 to the
language expert) or learned. At eval the router decides alone.

How language ids reach the blocks: `model(..., language_ids=B x S)` is an extra keyword argument, which transformers
passes down to every decoder layer and on to its attention call (the layer calls `self.mlp(h)` without arguments). A
forward pre-hook on each layer's attention module takes it out there and hands it to the layer's sparse block, which
runs next. Because the attention module runs inside the layer's forward, a gradient-checkpoint recompute goes through
the hook again with the same saved keyword arguments and routes exactly as the forward did. A hook on the top-level
model checks the ids' shape, adds the 2D attention mask the same way (the padding fallback when no ids are given) and
raises if an architecture did not pass the ids down.
"""
from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from src.models import router

MOE_CONFIG_KEY = "post_moe"
# Private keyword argument carrying the 2D attention mask from the top-level hook to the layers (see module doc).
_PADDING_MASK_KWARG = "post_moe_padding_mask"


@dataclass(frozen=True)
class MoESettings:
    """What `upcycle` did; stored as a dict in `config.post_moe`."""

    num_experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    norm_topk_prob: bool = True
    shared_expert: bool = False
    router_aux_loss_coef: float = 0.0
    # Added after the first release; older checkpoints load with these defaults (what they did then).
    routing: str = "hybrid"  # a rule of src/models/router.py, applied while training with language ids
    router_language_loss_coef: float = 0.0

    def to_config(self) -> dict:
        return {**asdict(self), "moe_layers": list(self.moe_layers)}

    @classmethod
    def from_config(cls, entry: dict) -> MoESettings:
        return cls(**{**entry, "moe_layers": tuple(entry["moe_layers"])})


# ----------------------------------------------------------------------------------------------------------------------
# Expert compute


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """torch's grouped GEMM runs on CPU (forward and backward) and, per its docs, on CUDA SM80+ in bf16 only."""
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cpu":
        return True
    return (x.device.type == "cuda" and x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (8, 0)
            and x.shape[-1] % 8 == 0 and weight.shape[1] % 8 == 0)


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of `x` grouped by expert (counts[e] consecutive rows for expert e) times weight[e]^T; weight [E, out, in]
    (the `nn.Linear` layout)."""
    if torch.is_autocast_enabled(x.device.type):  # grouped_mm is not autocast-aware: cast like F.linear would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if _grouped_mm_supported(x, weight):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=torch.cumsum(counts, 0, dtype=torch.int32))
    # One matmul per expert. unbind (not weight[e]) so the backward stacks one gradient instead of summing E
    # full-size ones.
    chunks = x.split(counts.tolist())
    return torch.cat([F.linear(chunk, w) for chunk, w in zip(chunks, weight.unbind(0))])


class Experts(nn.Module):
    """E gated MLPs, down(act(gate(x)) * up(x)), fused like transformers' MoE classes (gate rows first in gate_up)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act_fn: nn.Module,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; experts, weights [T, k] -> sum_j weights[:, j] * expert_{experts[:, j]}(x), [T, H]."""
        num_tokens, k = experts.shape
        flat = experts.reshape(-1)
        # Sort the T*k (token, slot) pairs by expert once; every expert then reads one contiguous slice.
        order = torch.argsort(flat, stable=True)
        # tokens per expert, without bincount (which reads the largest id back to size its output: a host sync)
        counts = flat.new_zeros(self.gate_up_proj.shape[0]).index_add_(0, flat, torch.ones_like(flat))
        gate, up = _grouped_linear(x[order // k], self.gate_up_proj, counts).chunk(2, dim=-1)
        out = _grouped_linear(self.act_fn(gate) * up, self.down_proj, counts)
        # Undo the sort with a gather (deterministic, unlike index_add_ on GPU) and sum each token's k outputs.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = out[inverse].view(num_tokens, k, -1)
        return (out * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# The sparse block


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a gradient-checkpointed layer is being recomputed. torch's own
    checkpoint code asks the same question this way (a private torch 2.13 call; tests/test_library_internals.py
    pins it)."""
    return torch._C._current_graph_task_id() != -1


# Called after routing with (block, experts [T, k], language ids [T] or None, real-token mask [T] or None).
RoutingObserver = Callable[["SparseMoeBlock", torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], None]


class SparseMoeBlock(nn.Module):
    """Drop-in replacement for a decoder layer's MLP: router + E experts (+ optional gated shared expert).

    Submodule names follow transformers' Qwen2MoeSparseMoeBlock (`gate`, `experts`, `shared_expert`,
    `shared_expert_gate`), so a Qwen2-based checkpoint exports to Qwen2MoeForCausalLM key for key.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act_fn: nn.Module, settings: MoESettings,
                 layer_idx: int, shared_expert: nn.Module | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = settings.num_experts
        self.top_k = settings.top_k
        self.norm_topk_prob = settings.norm_topk_prob
        self.router_aux_loss_coef = settings.router_aux_loss_coef
        self.routing = settings.routing
        self.router_language_loss_coef = settings.router_language_loss_coef
        self.gate = nn.Linear(hidden_size, settings.num_experts, bias=False, device=device, dtype=dtype)
        self.experts = Experts(settings.num_experts, hidden_size, intermediate_size, act_fn, device, dtype)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (nn.Linear(hidden_size, 1, bias=False, device=device, dtype=dtype)
                                   if shared_expert is not None else None)
        # Per-call inputs, set by the attention pre-hook just before the layer calls this block (see module doc).
        self.language_ids: torch.Tensor | None = None
        self.padding_mask: torch.Tensor | None = None
        # Coefficient-weighted auxiliary losses of the last training forward (load balancing, router language loss),
        # None when both coefficients are 0 or after an eval forward; summed over blocks by aux_loss().
        self.last_aux_loss: torch.Tensor | None = None
        self.routing_observers: list[RoutingObserver] = []

    @classmethod
    def from_mlp(cls, mlp: nn.Module, settings: MoESettings, layer_idx: int, router_init_std: float) -> SparseMoeBlock:
        """Upcycle a gated MLP: every expert is a copy of it; the router is drawn from N(0, router_init_std)."""
        gate_w, up_w, down_w = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        shared = None
        if settings.shared_expert:
            shared = copy.deepcopy(mlp)
            # Zero output projection: the shared expert starts silent, so the upcycled model still computes the dense
            # one (the reference copies it whole, which adds sigmoid(gate) x MLP to the output).
            nn.init.zeros_(shared.down_proj.weight)
        block = cls(gate_w.shape[1], gate_w.shape[0], copy.deepcopy(mlp.act_fn), settings, layer_idx, shared,
                    device=gate_w.device, dtype=gate_w.dtype)
        with torch.no_grad():
            block.experts.gate_up_proj.copy_(torch.cat([gate_w, up_w]).expand_as(block.experts.gate_up_proj))
            block.experts.down_proj.copy_(down_w.expand_as(block.experts.down_proj))
            block.gate.weight.normal_(0.0, router_init_std)
            if block.shared_expert_gate is not None:
                block.shared_expert_gate.weight.zero_()
        return block

    def route(self, x: torch.Tensor, language_ids: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (experts [T, k], weights [T, k] fp32, router probabilities [T, E] fp32). The routing rule
        uses the language ids in training only."""
        return router.route(self.gate(x), self.top_k, self.norm_topk_prob, self.routing,
                            language_ids if self.training else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        language_ids = self._flat_language_ids(x.shape[0])
        experts, weights, probs = self.route(x, language_ids)
        out = self.experts(x, experts, weights)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        real = self._real_tokens(language_ids, shape)
        # Computed in a checkpoint recompute too, so the recompute saves the same tensors as the forward did;
        # only the forward publishes it and notifies observers (no double counting).
        balance = self._aux_losses(x, probs, experts, real, language_ids) if self.training else None
        if not _in_backward():
            self.last_aux_loss = balance
            for observer in self.routing_observers:
                observer(self, experts, language_ids, real)
        return out.view(shape)

    def _flat_language_ids(self, num_tokens: int) -> torch.Tensor | None:
        if self.language_ids is None:
            return None
        if self.language_ids.numel() != num_tokens:
            raise ValueError(f"layer {self.layer_idx}: language_ids has {self.language_ids.numel()} entries for "
                             f"{num_tokens} tokens (pass a batch x sequence tensor matching input_ids; "
                             "generation needs no language ids)")
        return self.language_ids.reshape(-1)

    def _real_tokens(self, language_ids: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
        """Mask of non-padding tokens: language id >= 0 when ids are given, else the 2D attention mask, else None."""
        if language_ids is not None:
            return language_ids >= 0
        mask = self.padding_mask
        if mask is None or len(shape) != 3 or mask.shape[0] != shape[0] or mask.shape[1] < shape[1]:
            return None
        # With a KV cache the mask also covers the past tokens; this call sees the last shape[1] of them.
        return mask[:, -shape[1]:].reshape(-1).to(torch.bool)

    def _aux_losses(self, x: torch.Tensor, probs: torch.Tensor, experts: torch.Tensor, real: torch.Tensor | None,
                    language_ids: torch.Tensor | None) -> torch.Tensor | None:
        """coef x load-balancing loss + coef x router language loss (each only when its coefficient is > 0)."""
        total = None
        if self.router_aux_loss_coef > 0:
            total = self.router_aux_loss_coef * self._balance_loss(probs, experts, real)
        if self.router_language_loss_coef > 0 and language_ids is not None:
            # Logits again from the gate (cheap: T x H x E) rather than carried out of route().
            lang = router.language_loss(self.gate(x), language_ids)
            if lang is not None:
                lang = self.router_language_loss_coef * lang
                total = lang if total is None else total + lang
        return total

    def _balance_loss(self, probs: torch.Tensor, experts: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Switch/Mixtral loss E * sum_e f_e * P_e over real tokens (1.0 when perfectly balanced): f_e = share of the
        T*k final selections (hybrid forcing included) that went to e, P_e = mean router probability of e."""
        w = real.to(probs.dtype) if real is not None else probs.new_ones(probs.shape[0])
        n = w.sum().clamp(min=1.0)
        selections = probs.new_zeros(self.num_experts).scatter_add_(
            0, experts.reshape(-1), w.repeat_interleave(self.top_k))
        f = selections / (n * self.top_k)
        p = (probs * w[:, None]).sum(dim=0) / n
        return self.num_experts * (f * p).sum()


SPARSE_BLOCK_CLASSES: tuple[type[nn.Module], ...] = (SparseMoeBlock,)  # e.g. for deepspeed set_z3_leaf_modules


def sparse_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """The sparse blocks of a model (also through DeepSpeed/DDP wrappers), in layer order."""
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def is_moe(model: nn.Module) -> bool:
    return bool(sparse_blocks(model))


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over MoE layers of the last training forward's auxiliary losses: coef x load-balancing loss plus
    coef x router language loss (cross-entropy of the router against the language expert); a 0 tensor when both
    coefficients are 0.

    Padding is excluded: tokens whose language id is < 0 or, when no ids are given, whose 2D attention mask is 0.
    Under gradient checkpointing use the default non-reentrant mode (the loss is built inside the checkpointed layer).
    """
    blocks = sparse_blocks(model)
    losses = [b.last_aux_loss for b in blocks if b.last_aux_loss is not None]
    if not losses:
        return torch.zeros((), device=next(model.parameters()).device)
    if torch.is_grad_enabled() and not all(loss.requires_grad for loss in losses):
        warnings.warn("the load-balancing loss has no gradient: the layers ran without autograd (reentrant gradient "
                      "checkpointing does that); use non-reentrant checkpointing")
    return torch.stack(losses).sum()


# ----------------------------------------------------------------------------------------------------------------------
# Hooks carrying per-forward data to the blocks (see module doc). They are small callable objects rather than
# closures so that copy.deepcopy(model) gives the copy hooks that point at its own blocks.


class _ForwardState:
    """Whether the current top-level forward was given language ids and whether they reached a layer."""

    def __init__(self) -> None:
        self.ids_given = False
        self.ids_delivered = False


class _BeforeModelForward:
    """Top-level forward pre-hook: check `language_ids`, pass the 2D attention mask down beside them."""

    def __init__(self, state: _ForwardState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.get("language_ids")
        if ids is not None:
            reference = kwargs.get("input_ids", args[0] if args else None)
            if reference is None and kwargs.get("inputs_embeds") is not None:
                reference = kwargs["inputs_embeds"][..., 0]
            if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or (
                    reference is not None and ids.shape != reference.shape):
                shape = tuple(reference.shape) if reference is not None else "?"
                raise ValueError(f"language_ids must be an integer tensor shaped like input_ids {shape}, got "
                                 f"{type(ids).__name__} {tuple(getattr(ids, 'shape', ()))}")
        mask = kwargs.get("attention_mask")
        kwargs[_PADDING_MASK_KWARG] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.state.ids_given, self.state.ids_delivered = ids is not None, False
        return args, kwargs


class _AfterModelForward:
    """Top-level forward hook: fail loudly if an architecture did not pass the ids down to its layers."""

    def __init__(self, state: _ForwardState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if self.state.ids_given and not self.state.ids_delivered:
            raise RuntimeError(f"language_ids did not reach the decoder layers of {type(module).__name__}: this "
                               "architecture does not pass extra keyword arguments down to its attention modules")
        return output


class _DeliverToBlock:
    """Pre-hook on a layer's attention: take our keyword arguments out and hand them to the layer's sparse block."""

    def __init__(self, block: SparseMoeBlock | None, state: _ForwardState) -> None:
        self.block, self.state = block, state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.pop("language_ids", None)
        mask = kwargs.pop(_PADDING_MASK_KWARG, None)
        self.state.ids_delivered |= ids is not None
        if self.block is not None:
            self.block.language_ids, self.block.padding_mask = ids, mask
        return args, kwargs


# ----------------------------------------------------------------------------------------------------------------------
# Upcycling


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers found (expected a `.layers` ModuleList on "
                         f"{type(decoder).__name__})")
    return layers


def _gated_mlp(layer: nn.Module, idx: int) -> nn.Module:
    """The layer's MLP, checked to be the gated kind upcycling copies (Qwen2, Llama/SmolLM2, Gemma, Mistral...)."""
    name = type(layer).__name__
    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        raise ValueError(f"decoder layer {idx} ({name}) has no `.mlp`: cannot upcycle this architecture")
    if isinstance(mlp, SparseMoeBlock):
        raise ValueError(f"decoder layer {idx} ({name}) is already a sparse block: the model is upcycled")
    projections = [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) and p.bias is None for p in projections) or not hasattr(mlp, "act_fn"):
        raise ValueError(f"decoder layer {idx} ({name}): its mlp ({type(mlp).__name__}) is not a gated MLP with "
                         "bias-free gate_proj/up_proj/down_proj and an act_fn, which upcycling needs")
    if not isinstance(getattr(layer, "self_attn", None), nn.Module):
        raise ValueError(f"decoder layer {idx} ({name}) has no `.self_attn`, which carries language ids to the block")
    return mlp


def _resolve_layers(moe_layers: int | str | Sequence[int], num_layers: int) -> tuple[int, ...]:
    if moe_layers == "all":
        return tuple(range(num_layers))
    if isinstance(moe_layers, int):
        if not 1 <= moe_layers <= num_layers:
            raise ValueError(f"moe_layers={moe_layers}: the model has {num_layers} layers")
        return tuple(range(num_layers - moe_layers, num_layers))
    resolved = sorted({i + num_layers if i < 0 else i for i in moe_layers})
    if not resolved or resolved[0] < 0 or resolved[-1] >= num_layers:
        raise ValueError(f"moe_layers={list(moe_layers)}: indices must be in [0, {num_layers}) (or negative from end)")
    return tuple(resolved)


def build_sparse_blocks(model: nn.Module, settings: MoESettings, router_init_std: float) -> None:
    """Swap the MLPs of settings.moe_layers for sparse blocks and install the hooks."""
    layers = decoder_layers(model)
    mlps = {idx: _gated_mlp(layers[idx], idx) for idx in settings.moe_layers}  # check everything before changing
    state = _ForwardState()
    for idx, layer in enumerate(layers):
        block = None
        if idx in mlps:
            block = layer.mlp = SparseMoeBlock.from_mlp(mlps[idx], settings, idx, router_init_std)
        layer.self_attn.register_forward_pre_hook(_DeliverToBlock(block, state), with_kwargs=True)
    model.register_forward_pre_hook(_BeforeModelForward(state), with_kwargs=True)
    model.register_forward_hook(_AfterModelForward(state), with_kwargs=True)


def upcycle(model: nn.Module, num_experts: int = 7, top_k: int = 2, moe_layers: int | str | Sequence[int] = 2,
            norm_topk_prob: bool = True, shared_expert: bool = False, router_aux_loss_coef: float = 0.0,
            router_init_std: float | None = None, routing: str = "hybrid",
            router_language_loss_coef: float = 0.0) -> nn.Module:
    """Upcycle a dense HF causal LM in place (and return it); defaults are the paper's (7 experts, top-2, last 2).

    moe_layers: an int N (the last N layers), "all", or a list of layer indices. router_init_std defaults to the
    config's initializer_range (0.02 when absent). routing: a rule of src/models/router.py (hybrid, hard, learned).
    The settings are recorded in `model.config.post_moe`.
    """
    if is_moe(model):
        raise ValueError("the model is already upcycled")
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    router.check_settings(routing, top_k, norm_topk_prob, router_language_loss_coef)
    if top_k == 1 and norm_topk_prob and router_language_loss_coef <= 0:
        warnings.warn("top_k=1 with norm_topk_prob: the single weight is always 1, so the router never gets a "
                      "gradient; use norm_topk_prob=False (raw probability, as Switch does) or a router language "
                      "loss to train it")
    settings = MoESettings(num_experts, top_k, _resolve_layers(moe_layers, len(decoder_layers(model))),
                           norm_topk_prob, shared_expert, float(router_aux_loss_coef), routing,
                           float(router_language_loss_coef))
    if router_init_std is None:
        router_init_std = getattr(model.config, "initializer_range", 0.02)
    build_sparse_blocks(model, settings, router_init_std)
    setattr(model.config, MOE_CONFIG_KEY, settings.to_config())
    return model


def moe_settings(model: nn.Module) -> MoESettings:
    entry = getattr(model.config, MOE_CONFIG_KEY, None)
    if entry is None or not is_moe(model):
        raise ValueError(f"{type(model).__name__} is not an upcycled Post-MoE model")
    return MoESettings.from_config(entry)


# ----------------------------------------------------------------------------------------------------------------------
# Routing statistics


class RoutingStats:
    """Expert selections per MoE layer and language over the forwards run inside `with RoutingStats(model) as s:`.

    counts[layer][language] is an int64 CPU tensor [E]: each real token adds its k final selections (hybrid forcing
    included while training). Padding (language id < 0, or attention mask 0 when no ids are given) is skipped; tokens of
    a forward without language ids count under language None. Checkpoint recomputes are not counted twice.
    In eval mode language ids only label tokens (nothing is forced), so any non-negative ids below
    `max_language_ids` work as language keys.

    The counts accumulate on the model's device (a table [max_language_ids, E] per layer): recording never waits for
    the device, so a forward costs no host synchronisation; reading `counts` brings them to the host once. A language
    id >= max_language_ids cannot be counted: reading `counts` then raises, naming the limit.
    """

    def __init__(self, model: nn.Module, max_language_ids: int = 64) -> None:
        self.blocks = sparse_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no sparse blocks: nothing to count")
        self.max_language_ids = max_language_ids
        self._by_language: dict[int, torch.Tensor] = {}  # layer -> [max_language_ids, E] on the device
        self._unlabelled: dict[int, torch.Tensor] = {}  # layer -> [E]: forwards without language ids
        self._too_large: dict[int, torch.Tensor] = {}  # layer -> selections of ids >= max_language_ids
        self._counts: dict | None = None  # what `counts` last read back (None: stale)

    def __enter__(self) -> RoutingStats:
        for block in self.blocks:
            block.routing_observers.append(self.record)
        return self

    def __exit__(self, *exc) -> None:
        for block in self.blocks:
            block.routing_observers.remove(self.record)

    @torch.no_grad()
    def record(self, block: SparseMoeBlock, experts: torch.Tensor, language_ids: torch.Tensor | None,
               real: torch.Tensor | None) -> None:
        """Add one forward's selections (device ops only: weights instead of boolean selection, a fixed-size table
        instead of a bincount sized by the largest id)."""
        self._counts = None
        layer, num_experts, k = block.layer_idx, block.num_experts, block.top_k
        flat = experts.reshape(-1)
        weight = (real.to(flat.device).repeat_interleave(k) if real is not None
                  else torch.ones_like(flat, dtype=torch.bool))
        if language_ids is None:
            acc = self._unlabelled.setdefault(layer, flat.new_zeros(num_experts))
            acc.index_add_(0, flat, weight.long())
            return
        langs = language_ids.to(flat.device).repeat_interleave(k)
        counted = weight & (langs >= 0)
        fits = langs < self.max_language_ids
        table = self._by_language.setdefault(layer, flat.new_zeros(self.max_language_ids * num_experts))
        table.index_add_(0, langs.clamp(0, self.max_language_ids - 1) * num_experts + flat, (counted & fits).long())
        over = self._too_large.setdefault(layer, flat.new_zeros(()))
        over += (counted & ~fits).sum()

    @property
    def counts(self) -> dict[int, dict[int | None, torch.Tensor]]:
        """layer -> language -> selections per expert (CPU), for the languages that had real tokens."""
        if self._counts is None:
            out: dict[int, dict[int | None, torch.Tensor]] = {}
            for layer in sorted(set(self._by_language) | set(self._unlabelled)):
                if int(self._too_large.get(layer, torch.zeros(()))) > 0:
                    raise ValueError(f"RoutingStats: language ids >= max_language_ids={self.max_language_ids} "
                                     f"reached layer {layer}; count with RoutingStats(model, max_language_ids=N)")
                langs: dict[int | None, torch.Tensor] = {}
                if layer in self._unlabelled:
                    langs[None] = self._unlabelled[layer].cpu()
                if layer in self._by_language:
                    table = self._by_language[layer].cpu().view(self.max_language_ids, -1)
                    langs.update({lang: table[lang].clone() for lang in table.sum(1).nonzero().flatten().tolist()})
                out[layer] = langs
            self._counts = out
        return self._counts

    def ratios(self) -> dict[int, dict[int | None, list[float]]]:
        """counts normalised to sum to 1 per layer and language."""
        return {layer: {lang: (c / c.sum().clamp(min=1)).tolist() for lang, c in langs.items()}
                for layer, langs in sorted(self.counts.items())}

    def reset(self) -> None:
        self._by_language.clear()
        self._unlabelled.clear()
        self._too_large.clear()
        self._counts = None


# ----------------------------------------------------------------------------------------------------------------------
# Save, load, export


# The folder format (docs/moe.md "Checkpoint format"): save_pretrained's files, with config.json's model_type replaced
# by MOE_MODEL_TYPE, which transformers does not know, so stock AutoModelForCausalLM / AutoConfig fail with a
# message that quotes it (transformers 5.23 prints "has model type `<model_type>` but Transformers does not
# recognize this architecture"): the type itself names our loader and the export command. The base model's type
# and architectures move to BASE_TYPE_KEY / BASE_ARCHITECTURES_KEY. Folders written before this format (base
# model_type plus the post_moe field) still load here, and so do folders whose model_type names the export command
# by its earlier module (EARLIER_MOE_MODEL_TYPES).
MOE_MODEL_TYPE = ("apollomoe-post-moe: not a transformers model type; load this folder with "
                  "src.models.loading.load_model, or export it to a stock class with "
                  "python -m util.moe_export --model DIR --out DIR")
EARLIER_MOE_MODEL_TYPES = ("apollomoe-post-moe: not a transformers model type; load this folder with "
                           "src.models.loading.load_model, or export it to a stock class with "
                           "python -m util.moe_export --model DIR --out DIR",)
BASE_TYPE_KEY = "post_moe_base_model_type"
BASE_ARCHITECTURES_KEY = "post_moe_base_architectures"


def _config_dict(path: str | Path) -> dict | None:
    config = Path(path) / "config.json"
    return json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None


def is_moe_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint folder written by save_moe (its config.json has the post_moe field)."""
    config = _config_dict(path)
    return config is not None and MOE_CONFIG_KEY in config


def settings_from_config(entry: dict, where: str | Path) -> MoESettings:
    """MoESettings from a config's post_moe field, with errors that name the file and the field."""
    known = set(MoESettings.__dataclass_fields__)
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ValueError(f"{where}: field {MOE_CONFIG_KEY}.{unknown[0]} is not known to this version "
                         f"(known: {', '.join(sorted(known))})")
    try:
        settings = MoESettings.from_config(entry)
        router.check_settings(settings.routing, settings.top_k, settings.norm_topk_prob,
                              settings.router_language_loss_coef)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{where}: field {MOE_CONFIG_KEY}: {e}") from None
    return settings


def base_config(path: str | Path):
    """The base model's transformers config of one of our MoE folders (old or new format), post_moe included."""
    from transformers import AutoConfig

    file = Path(path) / "config.json"
    entry = _config_dict(path)
    if entry is None or MOE_CONFIG_KEY not in entry:
        raise ValueError(f"{file}: not a Post-MoE checkpoint (no {MOE_CONFIG_KEY} field)")
    if entry.get("model_type") in (MOE_MODEL_TYPE, *EARLIER_MOE_MODEL_TYPES):
        if BASE_TYPE_KEY not in entry:
            raise ValueError(f"{file}: field {BASE_TYPE_KEY} is missing (the base model's model_type)")
        entry["model_type"] = entry.pop(BASE_TYPE_KEY)
        entry["architectures"] = entry.pop(BASE_ARCHITECTURES_KEY, None)
    settings_from_config(entry[MOE_CONFIG_KEY], file)
    model_type = entry.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **entry)
    except ValueError as e:
        raise ValueError(f"{file}: base model_type {model_type!r}: {e}") from None


def _mark_moe_config(out: Path) -> None:
    """Rewrite save_pretrained's config.json into the MoE folder format (see MOE_MODEL_TYPE)."""
    file = out / "config.json"
    entry = json.loads(file.read_text(encoding="utf-8"))
    entry[BASE_TYPE_KEY] = entry["model_type"]
    entry[BASE_ARCHITECTURES_KEY] = entry.pop("architectures", None)
    entry["model_type"] = MOE_MODEL_TYPE
    file.write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_moe(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained-style folder (safetensors, tokenizer when given) whose config.json stock transformers refuses
    with a message naming our loader; `load_model` reads it back."""
    moe_settings(model)  # refuses a dense model
    out = Path(out_dir)
    model.save_pretrained(out)
    _mark_moe_config(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [path / name for name in sorted(set(shards))]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _load_weights_strict(model: nn.Module, path: Path) -> None:
    """Load every shard into the built model; every key must be expected and every weight present (tied ones, which
    save_pretrained writes once, count as present when the weight they share is loaded)."""
    from safetensors.torch import load_file

    expected = set(model.state_dict())
    loaded: set[str] = set()
    for file in _weight_files(path):
        shard = load_file(file)
        unexpected = sorted(set(shard) - expected)
        if unexpected:
            raise ValueError(f"{file}: weights the model does not have: {unexpected[:5]}")
        model.load_state_dict(shard, strict=False)
        loaded |= set(shard)
    names: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), set()).add(name)
    shared = {name: group for group in names.values() for name in group}
    missing = sorted(k for k in expected - loaded if not shared.get(k, set()) & loaded)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks weights: {missing[:5]}")


def check_training_rows(model_dir: str | Path, train_dir: str | Path) -> str | None:
    """Refuse step 2 rows whose language ids the checkpoint has no expert for: a routing rule would silently force
    nothing for those tokens. Step 2's mixture.json beside the rows says which ids it used (`language_ids`: family
    or language; `by_language`: each language's family and language_id). Returns a note when the id count differs
    from the experts without leaving any token out (e.g. the 12 major languages on 12 experts), or when there is no
    mixture.json to check."""
    mixture = Path(train_dir).parent / "mixture.json"
    if not mixture.is_file():
        return f"no {mixture}: the rows' language ids are not checked against the experts"
    entry = json.loads(mixture.read_text(encoding="utf-8"))
    settings = settings_from_config(_config_dict(model_dir)[MOE_CONFIG_KEY], Path(model_dir) / "config.json")
    mode, count = entry.get("language_ids"), entry.get("num_language_ids")
    field = "family" if mode == "family" else "language_id"
    used = {lang: info[field] for lang, info in (entry.get("by_language") or {}).items() if field in info}
    uncovered = sorted(lang for lang, i in used.items() if i >= settings.num_experts)
    if settings.routing != "learned" and uncovered:
        raise ValueError(f"{mixture}: field by_language: {len(uncovered)} language(s) ({', '.join(uncovered[:8])}) "
                         f"have {mode} ids >= {settings.num_experts}, the experts per MoE layer of {model_dir} "
                         f"({settings.routing} routing): upcycle with as many experts as ids (e.g. --experts "
                         f"{count} for --language-ids {mode}) or prepare the rows with the matching --language-ids")
    if count is not None and count != settings.num_experts:
        return (f"{mixture}: {count} {mode} ids for {settings.num_experts} experts; every language in the rows has "
                "an expert")
    return None


def load_moe(path: str | Path, dtype: torch.dtype) -> nn.Module:
    """One of our Post-MoE checkpoints, in eval mode: rebuilt as its base architecture (from its config), upcycled
    structurally, then loaded with a strict key check. Load through ``src.models.loading.load_model``, which also
    takes dense and adapter folders and decides the dtype (one policy for all)."""
    path = Path(path)
    if not is_moe_checkpoint(path):
        raise ValueError(f"{path}: not a Post-MoE checkpoint (load it with src.models.loading.load_model)")
    config = base_config(path)
    model = build_empty(config, dtype)
    build_sparse_blocks(model, MoESettings.from_config(getattr(config, MOE_CONFIG_KEY)), router_init_std=0.0)
    _load_weights_strict(model, path)
    model.eval()
    return model


def build_empty(config, dtype: torch.dtype) -> nn.Module:
    """A causal LM of `config` whose weights are all to be loaded (not initialised; tied weights tied)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights also skips the tying that init normally does
    return model
