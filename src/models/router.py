"""The router of a Post-MoE sparse block: softmax over E experts, top-k, optional renormalisation, and the training
rule that uses each token's language id (docs/moe.md "Routing").

A routing rule is one function `rule(probs [T, E], experts [T, k], language_ids [T]) -> (experts, weights or None)`
applied only while training with language ids; at inference every rule is plain learned top-k, which is why an export
to a stock MoE class can represent any rule listed here (a rule that changed inference would have to say so in
`INFERENCE_IS_TOP_K` and be refused by `check_exportable`). Ids outside [0, E) (padding -1, or a language without an
expert) force nothing.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

RoutingRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]


def _has_expert(language_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    return (language_ids >= 0) & (language_ids < num_experts)


def learned(probs: torch.Tensor, experts: torch.Tensor, language_ids: torch.Tensor):
    """The router decides alone (language ids only label tokens)."""
    return experts, None


def hybrid(probs: torch.Tensor, experts: torch.Tensor, language_ids: torch.Tensor):
    """ApolloMoE's hybrid routing: the token's language (family) expert is always among its k choices. topk sorts
    descending, so the last column is the lowest-weighted choice; it is replaced when the router did not pick the
    language expert. Weights: the router probabilities at the final choices (gathered by `route`)."""
    ids = language_ids.to(experts.device)
    forced = _has_expert(ids, probs.shape[-1]) & (experts != ids[:, None]).all(dim=-1)
    last = torch.where(forced, ids, experts[:, -1])
    return torch.cat([experts[:, :-1], last[:, None]], dim=1), None


def hard(probs: torch.Tensor, experts: torch.Tensor, language_ids: torch.Tensor):
    """Language-specific routing (top-1): the token goes to its language's expert with weight 1. The router only
    learns through the language loss (`language_loss`), which teaches it to pick that expert at inference."""
    ids = language_ids.to(experts.device)
    valid = _has_expert(ids, probs.shape[-1])
    chosen = torch.where(valid, ids, experts[:, 0])[:, None]
    weights = torch.where(valid[:, None], torch.ones_like(probs[:, :1]), probs.gather(1, chosen))
    return chosen, weights


RULES: dict[str, RoutingRule] = {"hybrid": hybrid, "hard": hard, "learned": learned}
INFERENCE_IS_TOP_K = frozenset(RULES)  # rules whose inference routing is plain top-k over the router's softmax


def check_settings(rule: str, top_k: int, norm_topk_prob: bool, language_loss_coef: float) -> None:
    """Refuse combinations that cannot train or that make training and inference disagree."""
    if rule not in RULES:
        raise ValueError(f"routing rule {rule!r} is not known to this version; known: {', '.join(RULES)}")
    if rule == "hard":
        if top_k != 1:
            raise ValueError(f"routing 'hard' sends each token to one expert: needs top_k=1, got {top_k}")
        if not norm_topk_prob:
            raise ValueError("routing 'hard' trains with weight 1.0; raw probabilities (no norm_topk_prob) would "
                             "give other weights at inference (the reference's train/test mismatch)")
        if language_loss_coef <= 0:
            raise ValueError("routing 'hard' needs a router language loss coefficient > 0: nothing else trains the "
                             "router (the reference's router stays at its random init)")


def check_exportable(rule: str) -> None:
    """A stock MoE class routes by plain top-k at inference; refuse a rule that routes otherwise (or is unknown)."""
    if rule not in INFERENCE_IS_TOP_K:
        raise ValueError(f"routing rule {rule!r}: its inference routing is not plain top-k, which no stock "
                         "transformers MoE class represents")


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool, rule: str = "hybrid",
          language_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (experts [T, k], weights [T, k] fp32, probabilities [T, E] fp32).

    Softmax in fp32, then top-k; `rule` is applied when language_ids [T] are given (the caller passes them only
    while training). Renormalisation comes last, so forced choices are renormalised too.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if language_ids is not None:
        experts, forced_weights = RULES[rule](probs, experts, language_ids)
        weights = forced_weights if forced_weights is not None else probs.gather(1, experts)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return experts, weights, probs


def language_loss(logits: torch.Tensor, language_ids: torch.Tensor) -> torch.Tensor | None:
    """Cross-entropy of the router logits [T, E] against each token's language expert, over tokens that have one;
    None when no token has one. It is what teaches a router to send tokens to their language's expert."""
    ids = language_ids.to(logits.device)
    valid = _has_expert(ids, logits.shape[-1])
    if not bool(valid.any()):
        return None
    return F.cross_entropy(logits[valid].float(), ids[valid])
