"""util/import_apollo_moe.py on a tiny checkpoint written here in the published Apollo-MoE format (model_type
upcycling-qwen2-moe, per-expert weights, router mlp.gate.weight, optional shared expert, auto_map and Python files
beside it). The importer must never run or open those files, and our checkpoint and the stock export must give the
logits of a plain-torch forward computed here from the same weights (the routing the checkpoint encodes)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from src.common.errors import DataError, UsageError  # noqa: E402
from src.models import moe  # noqa: E402
from src.models.loading import load_model  # noqa: E402
from util import import_apollo_moe  # noqa: E402

H, INTER, LAYERS, HEADS, KV, VOCAB, E = 32, 48, 3, 4, 2, 80, 4
CONFIG = {
    "model_type": "upcycling-qwen2-moe", "architectures": ["UpcyclingQwen2MoeForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_upcycling_qwen2_moe.UpcyclingQwen2MoeConfig",
                 "AutoModelForCausalLM": "modeling_upcycling_qwen2_moe.UpcyclingQwen2MoeForCausalLM"},
    "vocab_size": VOCAB, "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV, "hidden_act": "silu", "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    "use_sliding_window": False, "bos_token_id": 1, "eos_token_id": 2,
    "decoder_sparse_step": 1, "num_experts": E, "num_experts_per_tok": 2, "norm_topk_prob": False,
    "output_router_logits": False, "router_aux_loss_coef": 0.0, "mlp_only_layers": [0], "attn_init_change": False,
    "language_gate": True, "moe_intermediate_size": INTER, "shared_expert_intermediate_size": INTER,
}
# Imported as a module, this would leave a marker and fail: the importer must never do it.
TRAP = "import pathlib\npathlib.Path(__file__).with_name('CODE_WAS_RUN').write_text('x')\nraise SystemExit(1)\n"


def write_apollo_checkpoint(folder, share_flag: bool, config_overrides=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    hd = H // HEADS
    w = {"model.embed_tokens.weight": rand(VOCAB, H, std=1.0), "model.norm.weight": 1 + rand(H, std=0.1),
         "lm_head.weight": rand(VOCAB, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": 1 + rand(H, std=0.1), p + "post_attention_layernorm.weight": 1 + rand(H)}
        for name, rows in (("q", HEADS * hd), ("k", KV * hd), ("v", KV * hd)):
            w[p + f"self_attn.{name}_proj.weight"] = rand(rows, H)
            w[p + f"self_attn.{name}_proj.bias"] = rand(rows)
        w[p + "self_attn.o_proj.weight"] = rand(H, HEADS * hd)
        mlps = [f"mlp.experts.{e}." for e in range(E)] if i > 0 else ["mlp."]
        if i > 0:
            w[p + "mlp.gate.weight"] = rand(E, H, std=1.0)
            if share_flag:
                mlps.append("mlp.shared_expert.")
                w[p + "mlp.shared_expert_gate.weight"] = rand(1, H, std=1.0)
        for m in mlps:
            w |= {p + m + "gate_proj.weight": rand(INTER, H), p + m + "up_proj.weight": rand(INTER, H),
                  p + m + "down_proj.weight": rand(H, INTER)}
    folder.mkdir()
    keys = sorted(w)
    save_file({k: w[k] for k in keys[: len(keys) // 2]}, folder / "model-00001-of-00002.safetensors")
    save_file({k: w[k] for k in keys[len(keys) // 2:]}, folder / "model-00002-of-00002.safetensors")
    config = {**CONFIG, "share_flag": share_flag, **(config_overrides or {})}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("modeling_upcycling_qwen2_moe.py", "configuration_upcycling_qwen2_moe.py"):
        (folder / name).write_text(TRAP)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return w


def reference_logits(w: dict[str, torch.Tensor], ids: torch.Tensor, top_k: int = 2) -> torch.Tensor:
    """The reference's forward in plain torch for one sequence: Qwen2 attention (q/k/v bias, rope, GQA, causal) and
    its sparse block (fp32 softmax router, raw top-k probabilities, sigmoid-gated shared expert)."""
    hd, s = H // HEADS, ids.shape[0]

    def norm(x, weight):
        return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def rope(t):
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        angles = torch.arange(s).float()[:, None] * inv[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        half = torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)
        return t * cos + half * sin

    def mlp(prefix, x):
        act = torch.nn.functional.silu(x @ w[prefix + "gate_proj.weight"].T) * (x @ w[prefix + "up_proj.weight"].T)
        return act @ w[prefix + "down_proj.weight"].T

    x = w["model.embed_tokens.weight"][ids]
    causal = torch.full((s, s), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q, k, v = ((h @ w[p + f"self_attn.{n}_proj.weight"].T + w[p + f"self_attn.{n}_proj.bias"])
                   .view(s, -1, hd).transpose(0, 1) for n in "qkv")
        k, v = k.repeat_interleave(HEADS // KV, 0), v.repeat_interleave(HEADS // KV, 0)
        att = torch.softmax(rope(q) @ rope(k).transpose(1, 2) / math.sqrt(hd) + causal, -1) @ v
        x = x + att.transpose(0, 1).reshape(s, H) @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        if p + "mlp.gate.weight" not in w:
            x = x + mlp(p + "mlp.", h)
            continue
        probs = torch.softmax(h @ w[p + "mlp.gate.weight"].T, -1)
        top = torch.topk(probs, top_k, -1)
        outs = torch.stack([mlp(p + f"mlp.experts.{e}.", h) for e in range(E)], 1)  # [S, E, H]
        routed = (outs.gather(1, top.indices[..., None].expand(-1, -1, H)) * top.values[..., None]).sum(1)
        if p + "mlp.shared_expert_gate.weight" in w:
            routed = routed + torch.sigmoid(h @ w[p + "mlp.shared_expert_gate.weight"].T) * mlp(p + "mlp.shared_expert.", h)
        x = x + routed
    return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("share_flag", [False, True])
def test_import_preserves_the_routing_and_never_runs_code(tmp_path, share_flag, capsys):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "apollo"
    weights = write_apollo_checkpoint(src, share_flag)
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    assert import_apollo_moe.main(["--src", str(src), "--out", str(ours), "--export-stock", str(stock)]) == 0
    assert not (src / "CODE_WAS_RUN").exists()
    assert not list(ours.glob("*.py")) and not list(stock.glob("*.py"))
    assert "modeling_upcycling_qwen2_moe.py" in capsys.readouterr().out  # reported as not read

    ids = torch.randint(0, VOCAB, (17,), generator=torch.Generator().manual_seed(1))
    want = reference_logits(weights, ids)
    model = load_model(ours)
    settings = moe.moe_settings(model)
    assert settings.moe_layers == (1, 2) and settings.shared_expert is share_flag and not settings.norm_topk_prob
    assert settings.routing == "hybrid"  # language_gate: hybrid routing when training continues
    exported = AutoModelForCausalLM.from_pretrained(stock).eval()
    with torch.no_grad():
        for got in (model(ids[None]).logits[0], exported(ids[None]).logits[0]):
            assert (got - want).abs().max().item() < 1e-4
    # The routing matters: a top-1 forward differs, so the equality above checks the top-2 routing.
    assert (reference_logits(weights, ids, top_k=1) - want).abs().max().item() > 1e-2


def test_weights_decide_the_moe_layers_and_bad_checkpoints_fail_cleanly(tmp_path, capsys):
    src = tmp_path / "apollo"
    write_apollo_checkpoint(src, share_flag=False, config_overrides={"mlp_only_layers": []})  # the quirk
    assert import_apollo_moe.main(["--src", str(src), "--out", str(tmp_path / "ours")]) == 0
    assert "mlp_only_layers=[]" in capsys.readouterr().out
    assert moe.moe_settings(load_model(tmp_path / "ours")).moe_layers == (1, 2)
    with pytest.raises(UsageError, match="is not empty"):  # never overwrites without --overwrite
        import_apollo_moe.main(["--src", str(src), "--out", str(tmp_path / "ours")])

    bad = tmp_path / "bad"
    write_apollo_checkpoint(bad, share_flag=False, config_overrides={"num_experts": 5})
    with pytest.raises(DataError, match=r"bad/config.json: record 0, field 'num_experts': layer 1 has experts"):
        import_apollo_moe.main(["--src", str(bad), "--out", str(tmp_path / "x")])
    assert not (bad / "CODE_WAS_RUN").exists()
