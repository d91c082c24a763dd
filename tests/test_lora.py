"""LoRA / QLoRA fine-tuning (src/train/lora.py): what is trainable on dense and Post-MoE models, adapter folders that
step 4 loads directly, merging, and step 3 end to end (2 processes, gloo) with resume and ZeRO-2/ZeRO-3."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from test_train_deepspeed import _common, _env, dev_file, losses, rows_dir, single_node  # noqa: F401 (fixtures)

from conftest import make_tiny_llama
from src.common import cli
from src.models import moe
from src.models.adapter import adapter_base, is_adapter_dir
from src.models.loading import load_model, load_tokenizer
from src.train import lora
from src.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def flags(*argv) -> TrainConfig:
    from src.train.train import build_parser

    return TrainConfig.from_args(build_parser().parse_args(["--model", "m", "--train", "t", "--out", "o",
                                                             *map(str, argv)]))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny Llama wide enough (hidden 384) that its weights outweigh the 3.5 MB tokenizer an adapter folder carries."""
    return make_tiny_llama(smollm2_tokenizer, tmp_path_factory.mktemp("lora_base"), hidden=384)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tiny_model_dir) -> Path:
    model = load_model(tiny_model_dir)
    moe.upcycle(model, num_experts=4, top_k=2, moe_layers=1)
    torch.manual_seed(3)
    with torch.no_grad():  # experts that differ, so that routing matters
        for block in moe.sparse_blocks(model):
            block.experts.gate_up_proj.add_(0.05 * torch.randn_like(block.experts.gate_up_proj))
    return moe.save_moe(model, load_tokenizer(tiny_model_dir), tmp_path_factory.mktemp("lora_moe") / "moe")


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def perturb_adapter(model, seed: int = 0) -> None:
    """LoRA's B starts at zero (the adapter is a no-op): give every trainable tensor a random offset instead."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("argv, message", [
    (["--lora-alpha", "8"], "--lora-alpha: only with --lora-r"),
    (["--lora-r", "4", "--qlora"], "--qlora needs a CUDA GPU"),
    (["--lora-r", "4", "--lora-experts", "lora", "--lora-dropout", "0.1"], "--lora-experts lora needs --lora-dropout 0"),
    (["--lora-r", "-1"], "--lora-r must be >= 0"),
])
def test_bad_lora_flags_give_one_clear_line(argv, message, capsys):
    if "--qlora" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present: --qlora is allowed")
    from src.train.train import main

    assert cli.run(main, ["--model", "m", "--train", "t", "--out", "o", *argv]) == 2
    assert message in capsys.readouterr().err


def test_dense_targets_and_bad_names(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert lora.lora_targets(model, "all-linear", []) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                          "up_proj", "v_proj"]
    with pytest.raises(SystemExit, match="no linear layer named \\['qproj'\\]"):
        lora.lora_targets(model, "q_proj,qproj", [])
    with pytest.raises(SystemExit, match="is a dense model"):
        lora.apply(model, flags("--lora-r", 4, "--lora-experts", "full"), base=tiny_model_dir, is_moe=False)
    with pytest.raises(SystemExit, match="--lora-router frozen: .* is a dense model"):
        lora.apply(model, flags("--lora-r", 4, "--lora-router", "frozen"), base=tiny_model_dir, is_moe=False)
    peft_model = lora.apply(model, flags("--lora-r", 4, "--lora-targets", "q_proj,v_proj"), base=tiny_model_dir,
                            is_moe=False)
    names = trainable(peft_model)
    assert names and all("lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in names)
    counts = lora.param_counts(peft_model)
    assert counts["trainable"] == counts["lora"] == sum(p.numel() for n, p in peft_model.named_parameters()
                                                        if n in names)
    assert counts["total"] > 100 * counts["trainable"]


@pytest.mark.parametrize("experts", ["frozen", "full", "lora"])
def test_moe_router_in_full_experts_by_flag(moe_dir, experts):
    model = load_model(moe_dir)
    peft_model = lora.apply(model, flags("--lora-r", 4, "--lora-experts", experts), base=moe_dir, is_moe=True)
    names = trainable(peft_model)
    router = [n for n in names if "mlp.gate.modules_to_save" in n]
    expert_params = [n for n in names if ".experts." in n]
    assert len(router) == 1  # the one sparse block's router, trained in full
    assert any(".self_attn.q_proj.lora_A" in n for n in names)
    assert any("layers.0.mlp.down_proj.lora_B" in n for n in names)  # the dense MLP of layer 0
    if experts == "frozen":
        assert not expert_params
    elif experts == "full":
        assert expert_params and all("modules_to_save" in n and "lora_" not in n for n in expert_params)
    else:
        assert expert_params and all("lora_" in n for n in expert_params)
    # Training signal reaches the router and the adapted experts through hybrid routing's language ids.
    perturb_adapter(peft_model)
    peft_model.train()
    ids = torch.randint(3, 2000, (2, 12))
    out = peft_model(input_ids=ids, language_ids=torch.ones_like(ids), use_cache=False)
    out.logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n in router + expert_params)


def test_moe_router_frozen(moe_dir):
    peft_model = lora.apply(load_model(moe_dir), flags("--lora-r", 4, "--lora-router", "frozen"), base=moe_dir,
                            is_moe=True)
    assert not [n for n in trainable(peft_model) if ".gate." in n or ".experts." in n]


# ------------------------------------------------------------------------------------------- adapter folders
@pytest.mark.parametrize("kind", ["dense", "moe-experts-lora"])
def test_adapter_folder_loads_merged_with_the_adapter_logits(kind, base_dir, moe_dir, tmp_path, capsys):
    base = base_dir if kind == "dense" else moe_dir
    argv = ["--lora-r", 4] + (["--lora-experts", "lora"] if kind != "dense" else [])
    peft_model = lora.apply(load_model(base), flags(*argv), base=base, is_moe=kind != "dense")
    perturb_adapter(peft_model)
    peft_model.eval()
    adapter = tmp_path / "adapter"
    lora.save_adapter_files(peft_model, load_tokenizer(base), adapter)
    assert is_adapter_dir(adapter) and adapter_base(adapter) == str(Path(base).resolve())
    ids = torch.randint(3, 2000, (2, 16))
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        merged = load_model(adapter)  # what step 4, the chat and proxy-tuning call
        got = merged(input_ids=ids).logits
        base_logits = load_model(base)(input_ids=ids).logits
    assert not lora.is_lora(merged) and moe.is_moe(merged) == (kind != "dense")
    assert not torch.allclose(base_logits, want, atol=1e-3)  # the adapter changes the model ...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ... and merging keeps exactly that change
    assert load_tokenizer(adapter).pad_token is not None

    # util/merge_lora.py writes a full checkpoint: stock transformers loads a dense one with the same logits
    from util import merge_lora

    out = tmp_path / "merged"
    assert merge_lora.main(["--adapter", str(adapter), "--out", str(out)]) == 0
    if kind == "dense":
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(out)
    else:
        assert moe.is_moe_checkpoint(out)
        reloaded = load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert cli.run(merge_lora.main, ["--adapter", str(adapter), "--out", str(out)]) == 2  # no silent overwrite
    assert "is not empty" in capsys.readouterr().err


def test_saved_engine_state_leaves_out_the_frozen_tied_output_projection(tiny_model_dir):
    """Pins the DeepSpeed 0.19.8 behaviour lora.drop_frozen_tied_weights_on_save works around, and the workaround."""
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine

    peft_model = lora.apply(load_model(tiny_model_dir), flags("--lora-r", 4), base=tiny_model_dir, is_moe=False)
    engine = SimpleNamespace(module=peft_model, random_ltd_enabled=lambda: False)
    engine.module_state_dict = lambda **kw: DeepSpeedEngine.module_state_dict(engine, **kw)
    tied = "base_model.model.lm_head.weight"
    assert tied in engine.module_state_dict(exclude_frozen_parameters=True)  # DeepSpeed's own exclusion misses it
    lora.drop_frozen_tied_weights_on_save(engine)
    kept = engine.module_state_dict(exclude_frozen_parameters=True)
    assert set(kept) == trainable(peft_model)  # (this model's rotary buffers are not persistent)
    assert tied in engine.module_state_dict()  # without the flag: everything, as before


# ------------------------------------------------------------------------------------------ step 3 end to end
def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir, rows_dir, dev_file):  # noqa: F811 (fixtures imported above)
    out = tmp_path_factory.mktemp("lora_zero2") / "ckpts"
    single_node(_common(base_dir, rows_dir, out, "--zero", 2, "--lora-r", 8, "--save-every", 2, "--max-ckpts", 0,
                        "--max-steps", 4, "--dev", dev_file, "--eval-every", 0, "--dev-max-new-tokens", 2,
                        "--gradient-checkpointing"))
    return out


def test_lora_zero2_trains_and_saves_small_adapter_folders(lora_run, base_dir, dev_file, tmp_path):  # noqa: F811
    loss = losses(lora_run)
    assert sorted(loss) == [1, 2, 3, 4] and loss[4] < loss[1] - 0.5, loss
    ckpt = lora_run / "checkpoint-4"
    assert is_adapter_dir(ckpt) and not (ckpt / "model.safetensors").exists()
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "trainer_state.json").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["signature"]["lora"]["r"] == 8
    # the whole folder (adapter, tokenizer, optimizer and trainer state) is < 10% of the base model's weights
    assert _folder_bytes(ckpt) < 0.1 * (base_dir / "model.safetensors").stat().st_size
    # TensorBoard has the trainable-parameter counts; dev evaluation ran on the LoRA model
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((lora_run / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    trainable_n = events.Scalars("params/trainable")[0].value
    assert 0 < trainable_n < 0.05 * events.Scalars("params/total")[0].value
    assert json.loads((lora_run / "dev" / "step-4" / "score.json").read_text())["items"] == 5
    # step 4 loads the adapter folder directly
    results = tmp_path / "results"
    proc = subprocess.run(["bash", "4.eval.sh", "--model", str(ckpt), "--input", str(dev_file), "--out", str(results),
                           "--max-new-tokens", "2", "--batch-size", "5"], cwd=ROOT, capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((results / "score.json").read_text())["items"] == 5


def test_lora_resume_reproduces_the_uninterrupted_losses(lora_run, base_dir, rows_dir, tmp_path):  # noqa: F811
    out = tmp_path / "resumed"
    args = _common(base_dir, rows_dir, out, "--zero", 2, "--lora-r", 8, "--save-every", 2, "--max-steps", 4,
                   "--eval-every", -1, "--gradient-checkpointing")
    single_node(args + ["--resume", lora_run / "checkpoint-2"])
    full, resumed = losses(lora_run), losses(out)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6)


def test_lora_on_upcycled_moe_under_zero3_trains_the_router(moe_dir, rows_dir, dev_file, tmp_path):  # noqa: F811
    out = tmp_path / "moe3"
    single_node(_common(moe_dir, rows_dir, out, "--zero", 3, "--lora-r", 4, "--lora-experts", "lora",
                        "--max-steps", 2, "--save-every", 0, "--dev", dev_file, "--eval-every", 0,
                        "--dev-max-new-tokens", 2))
    assert sorted(losses(out)) == [1, 2]
    # dev evaluation under ZeRO-3 runs on a merged full copy (the adapter saved, loaded onto the base)
    assert json.loads((out / "dev" / "step-2" / "score.json").read_text())["items"] == 5
    ckpt = out / "checkpoint-2"
    from safetensors.torch import load_file

    weights = load_file(ckpt / "adapter_model.safetensors")
    router = [k for k in weights if "mlp.gate" in k]
    assert router and any("experts" in k and "lora_A" in k for k in weights)
    before = load_file(moe_dir / "model.safetensors")
    key = next(k for k in before if k.endswith("mlp.gate.weight"))
    assert not torch.allclose(weights[router[0]], before[key])  # the router was trained in full
    merged = load_model(ckpt)
    assert moe.is_moe(merged)
