"""Post-MoE upcycling (src/models/moe.py): function preservation, hybrid routing, language-id plumbing under gradient
checkpointing, aux loss, routing statistics, save/load, Qwen2-MoE export and the routing analysis tool.
Tiny random models built from config, CPU only."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config,  # noqa: E402
                          Qwen2ForCausalLM)

from src.models import moe  # noqa: E402
from src.models.loading import load_model  # noqa: E402

VOCAB = 96
ARCHS = {
    # initializer_range 0.1 so the MLPs matter for the logits (at 0.02 a tiny model is almost the identity)
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": False}),
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
}


def tiny(arch: str = "qwen2", layers: int = 3, seed: int = 0):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)
    return model_cls(config).eval()


def tiny_moe(arch: str = "qwen2", seed: int = 0, diverge: bool = True, **kwargs):
    """An upcycled tiny model; `diverge` perturbs experts and router so that routing changes the output."""
    model = moe.upcycle(tiny(arch, seed=seed), **{"num_experts": 4, "top_k": 2, **kwargs})
    if diverge:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for block in moe.sparse_blocks(model):
                block.experts.gate_up_proj.add_(0.1 * torch.randn_like(block.experts.gate_up_proj))
                block.gate.weight.normal_(0.0, 0.5)
    return model


def batch(seed: int = 0, shape=(2, 12)):
    """Token ids and family ids (expert 0..3, one per row) with left padding (-1) in the second row."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, shape, generator=g)
    language_ids = torch.arange(shape[0])[:, None].expand(shape).clone() % 4
    language_ids[1, :3] = -1
    input_ids[1, :3] = 0
    return input_ids, language_ids


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_upcycled_model_computes_the_dense_one(arch):
    dense = tiny(arch)
    input_ids, language_ids = batch()
    attention_mask = (language_ids >= 0).long()
    with torch.no_grad():
        want = dense(input_ids=input_ids, attention_mask=attention_mask).logits
    generated = dense.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)

    model = moe.upcycle(dense, num_experts=7, top_k=2)  # in place, default last 2 of 3 layers
    layers = moe.decoder_layers(model)
    assert [isinstance(layer.mlp, moe.SparseMoeBlock) for layer in layers] == [False, True, True]
    assert model.config.post_moe == {"num_experts": 7, "top_k": 2, "moe_layers": [1, 2], "norm_topk_prob": True,
                                     "shared_expert": False, "router_aux_loss_coef": 0.0, "routing": "hybrid",
                                     "router_language_loss_coef": 0.0}
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (got - want).abs().max().item() < 1e-4
    assert torch.equal(model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6,
                                      do_sample=False), generated)


def test_shared_expert_starts_silent_and_raw_probabilities_differ():
    dense = tiny()
    input_ids, _ = batch()
    with torch.no_grad():
        want = dense(input_ids).logits
        shared = moe.upcycle(tiny(), num_experts=4, shared_expert=True)(input_ids).logits
        raw = moe.upcycle(tiny(), num_experts=4, norm_topk_prob=False)(input_ids).logits
    assert (shared - want).abs().max().item() < 1e-4
    assert (raw - want).abs().max().item() > 1e-3  # the reference's routing is not function-preserving


def test_layer_selection_and_clear_errors():
    assert moe.moe_settings(moe.upcycle(tiny(layers=4), moe_layers=[0, -1])).moe_layers == (0, 3)
    with pytest.raises(ValueError, match="already upcycled"):
        moe.upcycle(tiny_moe())
    for bad in (5, [4], 0):
        with pytest.raises(ValueError, match="moe_layers"):
            moe.upcycle(tiny(), moe_layers=bad)
    with pytest.raises(ValueError, match="top_k"):
        moe.upcycle(tiny(), num_experts=2, top_k=3)
    model = tiny()
    model.model.layers[2].mlp = torch.nn.Identity()
    with pytest.raises(ValueError, match="Qwen2DecoderLayer.*not a gated MLP"):
        moe.upcycle(model)
    del model.model.layers[2].mlp
    with pytest.raises(ValueError, match=r"Qwen2DecoderLayer\) has no `.mlp`"):
        moe.upcycle(model)
    assert not moe.is_moe(model)  # nothing was changed by the failed calls
    model = tiny_moe().train()
    input_ids, language_ids = batch()
    with pytest.raises(ValueError, match="shaped like input_ids"):
        model(input_ids=input_ids, language_ids=language_ids[:, 1:])


def test_hybrid_routing_forces_family_expert_in_training_only():
    model = tiny_moe()
    block = moe.sparse_blocks(model)[0]
    with torch.no_grad():  # a router that never picks expert 3 for positive inputs
        block.gate.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [-5.0]]).expand(4, 64))
    x = torch.rand(10, 64) + 0.1
    family = torch.tensor([3, 3, 3, 0, 1, 2, -1, 7, 3, 3])
    block.train()
    experts, weights, probs = block.route(x, family)
    assert all(3 in row for row, f in zip(experts.tolist(), family.tolist()) if f == 3)
    assert experts[:, 0].tolist() == [2] * 10  # the router's best choice is kept
    assert experts[6].tolist() == [2, 1] and experts[7].tolist() == [2, 1]  # padding / unknown family: not forced
    assert torch.allclose(weights, probs.gather(1, experts) / probs.gather(1, experts).sum(-1, keepdim=True))
    block.eval()
    assert 3 not in block.route(x, family)[0]

    # Through the whole model: in training every real token of family f selects expert f exactly once per layer.
    model.train()
    input_ids, language_ids = batch(shape=(3, 10))
    with moe.RoutingStats(model) as stats:
        model(input_ids=input_ids, language_ids=language_ids)
    real = (language_ids >= 0).sum(dim=1)
    for layer in (1, 2):
        for family in range(3):
            counts = stats.counts[layer][family]
            assert counts[family] == real[family] and counts.sum() == 2 * real[family]
    # In eval mode language ids only label tokens: the output is what the router alone gives.
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=input_ids, language_ids=language_ids).logits, model(input_ids).logits)


def test_router_gets_gradients():
    input_ids, language_ids = batch()
    for kwargs in ({"norm_topk_prob": True}, {"norm_topk_prob": False}):
        model = tiny_moe(**kwargs).train()
        model(input_ids=input_ids, labels=input_ids, language_ids=language_ids).loss.backward()
        for block in moe.sparse_blocks(model):
            assert block.gate.weight.grad.abs().sum() > 0


def test_grouped_and_per_expert_matmuls_agree(monkeypatch):
    block = moe.sparse_blocks(tiny_moe())[0].train()
    x = torch.randn(2, 9, 64, requires_grad=True)
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(moe, "_grouped_mm_supported", lambda *a, grouped=grouped: grouped)
        block.zero_grad()
        x.grad = None
        out = block(x)
        out.pow(2).sum().backward()
        results.append((out, x.grad, block.experts.gate_up_proj.grad, block.experts.down_proj.grad))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5)


def _grads(model, steps):
    """Gradients of loss + aux loss for each (input_ids, language_ids, position_ids) after all forwards ran."""
    losses = []
    for input_ids, language_ids, position_ids in steps:
        # use_cache=False: with a cache transformers does not build the packed-document mask (transformers 5.23)
        out = model(input_ids=input_ids, labels=input_ids, language_ids=language_ids, position_ids=position_ids,
                    use_cache=False)
        losses.append(out.loss + moe.aux_loss(model))
    grads = []
    for loss in losses:  # backward only after every forward: a stale routing state would show here
        model.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return grads


def test_gradient_checkpointing_routes_like_the_forward():
    input_ids, language_ids = batch(shape=(2, 12))
    packed = torch.tensor([list(range(5)) + list(range(7))] * 2)  # packed rows: positions restart, no mask
    other = torch.randint(3, VOCAB, (2, 12)), (language_ids + 1) % 4
    steps = [(input_ids, language_ids, packed), (*other, None)]
    reference = tiny_moe(router_aux_loss_coef=0.05).train()
    checkpointed = tiny_moe(router_aux_loss_coef=0.05).train()
    checkpointed.activation_checkpointing_enable()
    with moe.RoutingStats(reference) as want_stats:
        want = _grads(reference, steps)
    with moe.RoutingStats(checkpointed) as got_stats:
        got = _grads(checkpointed, steps)
    for w, g in zip(want, got):
        assert w.keys() == g.keys() and any("gate.weight" in n for n in g)
        for name in w:
            assert torch.allclose(w[name], g[name], atol=1e-6), name
    # Recomputes are not counted again.
    assert {k: {lang: c.tolist() for lang, c in v.items()} for k, v in want_stats.counts.items()} == \
        {k: {lang: c.tolist() for lang, c in v.items()} for k, v in got_stats.counts.items()}


def test_aux_loss():
    input_ids, language_ids = batch()
    model = tiny_moe().train()
    model(input_ids=input_ids, language_ids=language_ids)
    assert moe.aux_loss(model).item() == 0.0  # default coefficient 0, as in the paper
    model = tiny_moe(router_aux_loss_coef=0.01).train()
    model(input_ids=input_ids, language_ids=language_ids)
    loss = moe.aux_loss(model)
    assert loss.item() > 0
    loss.backward()
    assert all(block.gate.weight.grad.abs().sum() > 0 for block in moe.sparse_blocks(model))
    # Padding does not count, whether it is marked by language id -1 or (without ids) by the attention mask.
    padded_ids = torch.cat([torch.zeros(2, 4, dtype=torch.long), input_ids], dim=1)
    padded_lang = torch.cat([torch.full((2, 4), -1), language_ids], dim=1)
    mask = (padded_lang >= 0).long()
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=(language_ids >= 0).long(), language_ids=language_ids)
        want = moe.aux_loss(model)
        model(input_ids=padded_ids, attention_mask=mask, language_ids=padded_lang)
        assert torch.allclose(moe.aux_loss(model), want, atol=1e-5)
        model(input_ids=padded_ids, attention_mask=mask)
        without_ids = moe.aux_loss(model)
        model(input_ids=input_ids, attention_mask=(language_ids >= 0).long())
        assert torch.allclose(without_ids, moe.aux_loss(model), atol=1e-5)
    model.eval()  # no balancing loss outside training
    model(input_ids=input_ids)
    assert moe.aux_loss(model).item() == 0.0


def test_save_and_load_round_trip(tmp_path):
    model = tiny_moe("llama", shared_expert=True)  # tied embeddings, shared expert
    input_ids, _ = batch()
    out = moe.save_moe(model, None, tmp_path / "moe")
    assert moe.is_moe_checkpoint(out)
    config = json.loads((out / "config.json").read_text())
    assert config["post_moe"]["shared_expert"] is True
    assert config["model_type"] == moe.MOE_MODEL_TYPE and config[moe.BASE_TYPE_KEY] == "llama"
    loaded = load_model(out, torch_dtype="auto")
    assert not loaded.training and moe.moe_settings(loaded) == moe.moe_settings(model)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    assert next(load_model(out, torch_dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    # A dense checkpoint goes through the same call.
    tiny("llama").save_pretrained(tmp_path / "dense")
    assert not moe.is_moe_checkpoint(tmp_path / "dense")
    assert not moe.is_moe(load_model(tmp_path / "dense"))
    with pytest.raises(ValueError, match="not an upcycled"):
        moe.save_moe(tiny(), None, tmp_path / "nope")


def test_one_dtype_policy_for_dense_and_moe_folders(tmp_path):
    """load_model: a dtype as given, "auto" the checkpoint's own, None the device's default (fp32 on CPU), the same
    for a dense folder and a Post-MoE one (the MoE loader used to keep the checkpoint's dtype where the dense one
    chose fp32)."""
    dense = tiny("llama").to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "dense")
    moe.save_moe(moe.upcycle(tiny("llama"), num_experts=2, top_k=2).to(torch.bfloat16), None, tmp_path / "moe")
    for folder in ("dense", "moe"):
        path = tmp_path / folder
        assert next(load_model(path, torch_dtype="auto").parameters()).dtype == torch.bfloat16
        assert next(load_model(path).parameters()).dtype == torch.float32
        assert next(load_model(path, torch_dtype="float16").parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match="not a Post-MoE checkpoint"):
        moe.load_moe(tmp_path / "dense", torch.float32)
    with pytest.raises(ValueError, match="'float42' is not a torch dtype"):
        load_model(tmp_path / "dense", torch_dtype="float42")


def test_routing_analysis_tool(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from util.routing_analysis import main

    words = "the patient has fever cough pain le patient a de la fièvre toux".split()
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        bos_token="[BOS]", eos_token="[EOS]")
    model_dir = moe.save_moe(tiny_moe("llama", num_experts=7), tokenizer, tmp_path / "moe")
    items = [{"prompt": "the patient has fever " * n, "language": "en"} for n in (1, 2, 3)]
    items += [{"prompt": "le patient a de la fièvre " * n, "language": "fr"} for n in (1, 4)]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("\n".join(json.dumps(item, ensure_ascii=False) for item in items) + "\n")

    assert main(["--model", str(model_dir), "--input", str(test_file), "--out", str(tmp_path / "routing"),
                 "--batch-size", "2", "--limit", "2"]) == 0
    assert (tmp_path / "routing" / "routing.png").stat().st_size > 1000
    report = json.loads((tmp_path / "routing" / "routing.json").read_text())
    assert list(report["languages"]) == ["en", "fr"] and report["moe_layers"] == [1, 2]
    assert report["languages"]["en"]["tokens"] == 4 + 8  # --limit 2: padding not counted
    assert report["experts"][4] == "Indo-European"
    for language in report["languages"].values():
        for ratios in language["ratios"].values():
            assert abs(sum(ratios) - 1.0) < 1e-6
