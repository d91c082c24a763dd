"""Shared-prefix prefill: the causal-kernel path gives the logits of the plain forward and of transformers' masked
path, is really taken, leaves padded batches to transformers, and leaves the model unchanged; step 4 groups items by
their shared prefix."""
import contextlib
import copy

import pytest
import torch

import src.generation.attention as attention
from src.evaluate.predict import prompt_group
from src.generation.engine import MIN_PREFIX_TOKENS, plan_groups


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from src.models.loading import load_model

    return load_model(tiny_model_dir).eval()


@pytest.fixture
def hits(monkeypatch):
    """Counts the calls that took the causal-kernel path."""
    seen = []
    orig = attention.is_prefix_causal

    def spy(*args):
        ok = orig(*args)
        seen.append(ok)
        return ok

    monkeypatch.setattr(attention, "is_prefix_causal", spy)
    return seen


def _suffix_logits(model, ids, P, fast: bool, mask=None):
    with torch.no_grad():
        cache = model(input_ids=ids[:, :P], use_cache=True).past_key_values
        pos = torch.arange(P, ids.shape[1])[None].expand(ids.shape[0], -1)
        kw = dict(input_ids=ids[:, P:], position_ids=pos, past_key_values=copy.deepcopy(cache), use_cache=True)
        if mask is not None:
            kw["attention_mask"] = mask
        with attention.prefix_attention(model) if fast else contextlib.nullcontext():
            return model(**kw).logits


def test_suffix_after_prefix_equals_the_full_forward(model, hits):
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (1, 90))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, 30:]
    masked = _suffix_logits(model, ids, 30, fast=False)
    assert not any(hits)  # transformers' own path, for reference
    fast = _suffix_logits(model, ids, 30, fast=True)
    assert sum(hits) == model.config.num_hidden_layers  # every layer took the causal kernel
    assert torch.allclose(fast, full, atol=1e-5) and torch.allclose(fast, masked, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_padded_rows_go_to_transformers(model, hits):
    torch.manual_seed(1)
    ids = torch.randint(10, 1000, (2, 60))
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, 20:25] = 0  # a hole in the second row's suffix: not the prefix-causal pattern
    want = _suffix_logits(model, ids, 20, fast=False, mask=mask)
    got = _suffix_logits(model, ids, 20, fast=True, mask=mask)
    assert hits and not any(hits)
    assert torch.allclose(got, want, atol=1e-6)


def test_a_prefix_longer_than_the_suffix_keeps_the_masked_kernel(model, hits):
    torch.manual_seed(2)
    ids = torch.randint(10, 1000, (1, 60))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, 40:]
    got = _suffix_logits(model, ids, 40, fast=True)
    assert not hits  # the placeholders would cost more than the mask here
    assert torch.allclose(got, full, atol=1e-5)


def test_is_prefix_causal_pattern():
    ok = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2)[None, None]
    assert attention.is_prefix_causal(ok.clone(), 3, 5)
    bad = ok.clone()
    bad[0, 0, 0, 3] = True  # a query sees a later suffix token
    assert not attention.is_prefix_causal(bad, 3, 5)
    assert not attention.is_prefix_causal(None, 3, 5)
    assert not attention.is_prefix_causal(ok.float(), 3, 5)  # additive masks are left alone


def test_plan_groups_by_first_shot_then_source():
    head = list(range(100, 100 + MIN_PREFIX_TOKENS))  # system block + instruction
    shot = {"s1": list(range(500, 540)), "s2": list(range(600, 640)), "s3": list(range(700, 740))}
    recs, ids = [], []

    def add(source, shots, tail):
        recs.append({"source": source, "shots": shots})
        ids.append(([1] if source == "a" else [2]) + head + sum((shot[s] for s in shots), []) + tail)

    add("a", ["s1", "s2"], [7, 8])      # 0 \ same first shot: prefix runs through s1 (and the user tag)
    add("a", ["s1", "s3"], [9])         # 1 /
    add("a", ["s2", "s1"], [7])         # 2 \ first shots of their own: the source's prefix (head)
    add("a", ["s3", "s2"], [5, 6])      # 3 /
    add("b", ["s1", "s2"], [4])         # 4   alone in its source: no prefix
    keys = [prompt_group(r) for r in recs]
    groups = plan_groups(ids, keys)
    by_members = {tuple(g.members): len(g.prefix) for g in groups}
    assert by_members == {(0, 1): 1 + len(head) + 40, (2, 3): 1 + len(head), (4,): 0}
    assert plan_groups(ids, keys, "off")[0].members == [0, 1, 2, 3, 4]
    for g in groups:  # a prefix is shared by every member and leaves each at least one token
        assert all(ids[i][:len(g.prefix)] == g.prefix and len(ids[i]) > len(g.prefix) for i in g.members)
