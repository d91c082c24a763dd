"""The reference's routing variants by flags (docs/moe.md "Variants"): language-specific hard routing with a shared
expert (whose router does learn here), MoE in every layer, per-language experts (50 ids from step 2's
--language-ids language), beside the default family hybrid routing. Tiny random models, CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from test_moe import VOCAB, batch, tiny  # noqa: E402

from src.common.languages import language_id, languages  # noqa: E402
from src.models import moe, router  # noqa: E402


def hard_model(**kwargs):
    return moe.upcycle(tiny("qwen2"), **{"num_experts": 4, "top_k": 1, "moe_layers": "all", "routing": "hard",
                                         "shared_expert": True, "router_language_loss_coef": 0.5, **kwargs})


def test_hard_routing_with_shared_expert_starts_dense_and_routes_by_language():
    dense = tiny("qwen2")
    input_ids, language_ids = batch(shape=(3, 10))
    with torch.no_grad():
        want = dense(input_ids).logits
    model = hard_model()
    assert all(isinstance(layer.mlp, moe.SparseMoeBlock) for layer in moe.decoder_layers(model))  # every layer
    with torch.no_grad():
        assert (model(input_ids).logits - want).abs().max().item() < 1e-4  # weight 1, silent shared expert
    model.train()
    with moe.RoutingStats(model) as stats:
        model(input_ids=input_ids, language_ids=language_ids)
    for layer in range(3):
        for lang in range(3):  # every real token of language l goes to expert l alone
            counts = stats.counts[layer][lang]
            assert counts[lang] == counts.sum() == (language_ids[lang] >= 0).sum()
    block = moe.sparse_blocks(model)[0]
    experts, weights, _ = block.route(torch.randn(5, 64), torch.tensor([0, 1, 2, 3, -1]))
    assert experts[:4, 0].tolist() == [0, 1, 2, 3] and torch.equal(weights, torch.ones(5, 1))


def test_hard_routing_router_learns_to_pick_the_language_expert():
    """The reference's router gets no gradient under hard routing; here the router language loss trains it, so at
    inference (no ids) the learned router sends tokens to their language's expert."""
    torch.manual_seed(0)
    model = hard_model().train()
    input_ids = torch.randint(3, VOCAB, (4, 12))
    input_ids[:, 0] = torch.arange(4) + 3  # a language marker token at the start of each row
    language_ids = torch.arange(4)[:, None].expand(4, 12).clone()
    routers = [block.gate.weight for block in moe.sparse_blocks(model)]
    optimizer = torch.optim.Adam(routers, lr=0.05)

    def accuracy():
        model.eval()
        with moe.RoutingStats(model) as stats, torch.no_grad():
            model(input_ids=input_ids, language_ids=language_ids)  # eval: ids only label the tokens
        model.train()
        last = stats.counts[2]
        return sum(last[lang][lang].item() for lang in range(4)) / input_ids.numel()

    before = accuracy()
    for _ in range(60):
        optimizer.zero_grad()
        out = model(input_ids=input_ids, labels=input_ids, language_ids=language_ids)
        loss = out.loss + moe.aux_loss(model)
        loss.backward()
        assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in routers)
        optimizer.step()
    assert accuracy() > max(0.9, before + 0.3)


def test_hard_routing_refuses_settings_that_cannot_train_or_would_mismatch():
    with pytest.raises(ValueError, match="needs top_k=1"):
        hard_model(top_k=2)
    with pytest.raises(ValueError, match="stays at its random init"):
        hard_model(router_language_loss_coef=0.0)
    with pytest.raises(ValueError, match="train/test mismatch"):
        hard_model(norm_topk_prob=False)
    with pytest.raises(ValueError, match="not known"):
        router.check_settings("telepathic", 1, True, 0.0)


def test_per_language_experts_follow_the_50_language_ids():
    """--language-ids language gives each of the 50 languages its own id; with 50 experts, hybrid routing puts each
    token's language expert among its k."""
    assert sorted(language_id(code) for code in languages()) == list(range(50))
    model = moe.upcycle(tiny("llama"), num_experts=50, top_k=2).train()
    codes = ["ha", "zh", "en"]
    ids = torch.tensor([language_id(c) for c in codes])[:, None].expand(3, 8).clone()
    with moe.RoutingStats(model) as stats:
        model(input_ids=torch.randint(3, VOCAB, (3, 8)), language_ids=ids)
    for layer in moe.moe_settings(model).moe_layers:
        for code in codes:
            assert stats.counts[layer][language_id(code)][language_id(code)] == 8


def test_step3_refuses_rows_whose_ids_do_not_match_the_experts(tmp_path):
    model_dir = moe.save_moe(moe.upcycle(tiny("llama"), num_experts=12), None, tmp_path / "moe")
    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    assert "not checked" in moe.check_training_rows(model_dir, train)
    mixture = tmp_path / "data" / "mixture.json"

    def rows(mode, codes):
        count = 7 if mode == "family" else 50
        by_language = {c: {"family": languages()[c]["family"], "language_id": language_id(c)} for c in codes}
        mixture.write_text(json.dumps({"language_ids": mode, "num_language_ids": count, "by_language": by_language}))

    rows("language", ["en", "zh", "ar"])  # the 12 major languages have ids 0-11: each has an expert
    assert "50 language ids for 12 experts" in moe.check_training_rows(model_dir, train)
    rows("language", ["en", "ha", "sw"])  # minor languages have ids 12-49
    with pytest.raises(ValueError, match=r"mixture.json: field by_language: 2 language\(s\) \(ha, sw\).* --experts 50"):
        moe.check_training_rows(model_dir, train)
    from src.train.train import main

    for rows_arg in (train, train.parent):  # the train/ folder, or step 2's output folder holding it
        with pytest.raises(SystemExit, match="have language ids >= 12"):
            main(["--model", str(model_dir), "--train", str(rows_arg), "--out", str(tmp_path / "ckpt")])
    rows("family", ["en", "ha", "sw"])
    assert "7 family ids for 12 experts" in moe.check_training_rows(model_dir, train)


def test_upcycle_cli_variant_flags(tiny_model_dir, tmp_path):
    from util.upcycle_moe import main

    out = tmp_path / "ls"
    assert main(["--model", str(tiny_model_dir), "--out", str(out), "--moe-layers", "all", "--experts", "12",
                 "--top-k", "1", "--routing", "hard", "--shared-expert"]) == 0
    settings = moe.settings_from_config(json.loads((out / "config.json").read_text())["post_moe"], out)
    assert settings.moe_layers == (0, 1) and settings.routing == "hard" and settings.shared_expert
    assert settings.router_language_loss_coef > 0 and settings.num_experts == 12
    with pytest.raises(SystemExit):  # hard routing with top-2 is refused before anything is written
        main(["--model", str(tiny_model_dir), "--out", str(tmp_path / "bad"), "--routing", "hard"])
    assert not (tmp_path / "bad").exists()
