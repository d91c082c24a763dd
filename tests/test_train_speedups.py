"""Step 3's GPU speed paths, checked on CPU: the varlen attention wiring (with a CPU reference kernel in place of
torch's CUDA one), transformers' FlexAttention on packed rows, the attention/kernels/loss choices, the chunked
cross-entropy against the full one (dense, LoRA, Post-MoE), Liger's wiring (with a stand-in package) and
torch.compile of the decoder layers."""
from __future__ import annotations

import importlib.machinery
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_train_deepspeed import ROOT, _common, _env, losses, rows_dir  # noqa: F401 (fixtures)
from test_train_units import PAD, _row

from src.common.errors import UsageError
from src.train import attention, kernels, loss
from src.train.data import Collator
from src.train.steps import forward_loss


def _docs(seed=0, lengths=(9, 14, 6, 11, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 4000, (n,), generator=g).tolist() for n in lengths]


def _rows():
    docs = _docs()
    return [_row(docs[:3]), _row(docs[3:])]  # the second row is shorter: padded in the padded batch


def _model(path, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn)


def _loss_and_grads(model, batch, kind="full", **kw):
    model.zero_grad(set_to_none=True)
    ce, aux = forward_loss(model, batch, "cpu", is_moe=kw.get("is_moe", False), moe=kw.get("moe"), loss=kind)
    total = ce + aux if aux is not None else ce
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return ce.detach(), aux, grads


def _assert_same(a, b, tol=1e-5):
    (la, _, ga), (lb, _, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=tol, atol=tol)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=tol, atol=tol, msg=name)


# ------------------------------------------------------------------------------------------- varlen attention
def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn's contract on CPU: [T, H, D] tensors, one causal sdpa per document."""
    assert window_size == (-1, 0) and isinstance(window_size, tuple)  # torch 2.13's causal rule (a tuple)
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32
    bounds = cu_seq_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[a:b].transpose(0, 1)[None] for t in (query, key, value))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                   enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def cpu_varlen(monkeypatch):
    calls = []

    def kernel(*args, **kwargs):
        calls.append((args[3].clone(), kwargs["enable_gqa"]))
        return reference_varlen(*args, **kwargs)

    monkeypatch.setattr(attention, "varlen_kernel", kernel)
    return calls


def _upcycled(model):
    from src.models import moe

    torch.manual_seed(0)  # the same router for every copy
    moe.upcycle(model, num_experts=7, top_k=2, moe_layers=1, router_aux_loss_coef=0.01)
    return model.train()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_varlen_wiring_gives_the_masked_sdpa_loss_and_gradients(tiny_model_dir, cpu_varlen, kind):
    """Flattened rows + the collator's cu_seq_lens through the registered ``varlen`` function give exactly the loss
    and gradients of the padded batch with sdpa's block-diagonal document mask (Post-MoE: the auxiliary loss too)."""
    from src.models import moe

    is_moe = kind == "moe"
    build = _upcycled if is_moe else (lambda m: m)
    rows = _rows()
    padded = Collator(PAD, with_language_ids=is_moe)(rows)
    flat = Collator(PAD, flatten=attention.needs_flat_rows(attention.VARLEN), with_language_ids=is_moe)(rows)
    assert flat["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in flat
    sdpa = _loss_and_grads(build(_model(tiny_model_dir, "sdpa")), padded, is_moe=is_moe, moe=moe)
    model = build(_model(tiny_model_dir))
    model.set_attn_implementation(attention.VARLEN)
    varlen = _loss_and_grads(model, flat, is_moe=is_moe, moe=moe)
    _assert_same(varlen, sdpa)
    if is_moe:
        assert sdpa[1].item() > 0
        torch.testing.assert_close(varlen[1], sdpa[1])
    # one kernel call per layer, with the collator's document boundaries and GQA (4 query heads, 2 KV heads)
    assert len(cpu_varlen) == model.config.num_hidden_layers
    assert all(torch.equal(cu, flat["cu_seq_lens_q"]) and gqa for cu, gqa in cpu_varlen)
    # the test has teeth: the same flattened row as one causal sequence (no boundaries) gives another loss
    whole = dict(flat, cu_seq_lens_q=torch.tensor([0, flat["input_ids"].shape[1]], dtype=torch.int32))
    whole.update(cu_seq_lens_k=whole["cu_seq_lens_q"], max_length_q=flat["input_ids"].shape[1],
                 max_length_k=flat["input_ids"].shape[1])
    assert abs(_loss_and_grads(model, whole, is_moe=is_moe, moe=moe)[0] - sdpa[0]) > 0.1  # vs the 1e-5 above


def test_varlen_model_generates_like_sdpa(tiny_model_dir, cpu_varlen):
    """The dev evaluation runs step 4 on the training model: padded prompts and a KV cache go to sdpa with the mask,
    an unpadded prefill to the kernel; greedy tokens equal the sdpa model's."""
    prompts = torch.tensor([[PAD, PAD, 11, 12, 13, 14], [21, 22, 23, 24, 25, 26]])
    mask = (prompts != PAD).long()
    want = _model(tiny_model_dir, "sdpa").eval().generate(prompts, attention_mask=mask, max_new_tokens=4,
                                                          do_sample=False, pad_token_id=PAD)
    model = _model(tiny_model_dir).eval()
    model.set_attn_implementation(attention.VARLEN)
    got = model.generate(prompts, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert torch.equal(got, want) and not cpu_varlen  # left padding: sdpa throughout
    got = model.generate(prompts[1:], max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert torch.equal(got, want[1:]) and len(cpu_varlen) == model.config.num_hidden_layers  # the prefill


def test_flex_attention_keeps_packed_documents_apart(tiny_model_dir):
    """transformers' own flex_attention builds a document block mask from packed position ids (forward only: no
    FlexAttention backward on CPU in torch 2.13)."""
    batch = Collator(PAD)(_rows())
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    sdpa = _model(tiny_model_dir, "sdpa")
    with torch.no_grad():
        want = sdpa(**inputs).logits
        got = _model(tiny_model_dir, "flex_attention")(**inputs).logits
        unmasked = sdpa(input_ids=batch["input_ids"]).logits  # what ignoring the documents would give
    real = batch["labels"] != -100
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[real], want[real], atol=1e-3)


def test_attention_choice_says_which_and_why(monkeypatch):
    assert attention.choose("auto", on_gpu=False) == ("sdpa", "CPU: sdpa with the block-diagonal document mask")
    assert attention.choose("eager", on_gpu=False)[0] == "eager"
    with pytest.raises(UsageError, match="--attn-impl: varlen: .*needs a CUDA GPU"):
        attention.choose("varlen", on_gpu=False)
    with pytest.raises(UsageError, match="--attn-impl: flex: FlexAttention has no backward on CPU"):
        attention.choose("flex", on_gpu=False)
    # on a GPU (availability monkeypatched): flash-attn, else torch's varlen, else flex, else sdpa
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: True)
    assert attention.choose("auto", on_gpu=True) == ("flash_attention_2", "flash_attn installed")
    monkeypatch.setattr(attention, "flash_attn_installed", lambda: False)
    monkeypatch.setattr(attention, "varlen_unavailable", lambda on_gpu: None)
    assert attention.choose("auto", on_gpu=True) == ("varlen", "torch varlen_attn; flash_attn not installed")
    sliding = types.SimpleNamespace(layer_types=["full_attention", "sliding_attention"])
    impl, why = attention.choose("auto", on_gpu=True, config=sliding)
    assert impl == "flex_attention" and "sliding-window" in why
    monkeypatch.setattr(attention, "varlen_unavailable", lambda on_gpu: "flash attention needs an Ampere GPU")
    assert attention.choose("auto", on_gpu=True) == (
        "flex_attention", "FlexAttention with a document block mask; varlen: flash attention needs an Ampere GPU")
    monkeypatch.setattr(attention, "flex_unavailable", lambda on_gpu: "no flex")
    impl, why = attention.choose("auto", on_gpu=True)
    assert impl == "sdpa" and "varlen: flash attention needs an Ampere GPU; flex: no flex" in why
    assert attention.needs_flat_rows("varlen") and not attention.needs_flat_rows("flex_attention")


# ------------------------------------------------------------------------------------------- chunked loss
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_chunked_cross_entropy_equals_the_full_one(frozen_weight):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=not frozen_weight)
    targets = torch.randint(0, 50, (23,), generator=g)
    got = loss.chunked_ce_sum(hidden, weight, targets, chunk=5)  # 4 full chunks and a remainder
    got.backward(torch.tensor(0.5))
    gh, gw = hidden.grad.clone(), None if frozen_weight else weight.grad.clone()
    hidden.grad = weight.grad = None
    want = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum")
    want.backward(torch.tensor(0.5))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gh, hidden.grad)
    if not frozen_weight:
        torch.testing.assert_close(gw, weight.grad)
    with torch.no_grad():  # no gradients computed, same value
        torch.testing.assert_close(loss.chunked_ce_sum(hidden, weight, targets, chunk=5), want.detach())


def test_chunked_loss_through_the_model_equals_the_full_loss(tiny_model_dir, monkeypatch):
    """Same summed CE and gradients (every parameter, the tied embedding/output weight included) as steps'
    token_losses: same shift, -100 prompts and padding, document starts ignored; chunks smaller than the batch."""
    model = _model(tiny_model_dir)
    monkeypatch.setattr(loss, "CHUNK_BYTES", 7 * 4 * model.config.vocab_size)  # 7-row chunks
    assert loss.chunk_rows(model.config.vocab_size) == 7
    batch = Collator(PAD)(_rows())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    full = _loss_and_grads(model, batch, "full")
    chunked = _loss_and_grads(model, batch, "chunked")
    _assert_same(chunked, full)
    out = model(input_ids=batch["input_ids"])  # the capture hook is gone after the step: logits as usual
    assert out.logits.shape[:2] == batch["input_ids"].shape
    # a micro-batch without any label token: loss 0, zero gradients, no error
    empty = dict(batch, labels=torch.full_like(batch["labels"], -100))
    ce, _, grads = _loss_and_grads(model, empty, "chunked")
    assert ce.item() == 0.0 and all(not g.any() for g in grads.values())


def test_chunked_loss_with_lora(tiny_model_dir):
    from src.train import lora
    from src.train.config import TrainConfig

    args = TrainConfig(model=str(tiny_model_dir), train="x", out="y", lora_r=4)
    model = lora.apply(_model(tiny_model_dir), args, base=tiny_model_dir, is_moe=False)
    with torch.no_grad():  # LoRA B starts at 0: move it so the LoRA path changes the loss
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    batch = Collator(PAD)(_rows())
    full = _loss_and_grads(model, batch, "full")
    _assert_same(_loss_and_grads(model, batch, "chunked"), full)
    assert any("lora_A" in n for n in full[2]) and not any("embed_tokens" in n for n in full[2])  # frozen head


def test_chunked_loss_on_a_post_moe_model_keeps_the_aux_loss(tiny_model_dir):
    from src.models import moe

    model = _upcycled(_model(tiny_model_dir))
    batch = Collator(PAD, with_language_ids=True)(_rows())
    full = _loss_and_grads(model, batch, "full", is_moe=True, moe=moe)
    chunked = _loss_and_grads(model, batch, "chunked", is_moe=True, moe=moe)
    _assert_same(chunked, full)
    assert full[1] is not None and full[1].item() > 0
    torch.testing.assert_close(chunked[1], full[1])
    assert any(".gate." in n for n in chunked[2])  # the router is trained


def test_loss_choice(tiny_model_dir):
    model = _model(tiny_model_dir)
    assert loss.choose("auto", model, zero=1, kernels="none", on_gpu=False)[0] == "full"
    assert loss.choose("auto", model, zero=1, kernels="none", on_gpu=True)[0] == "chunked"
    assert loss.choose("auto", model, zero=1, kernels="liger", on_gpu=True)[0] == "liger"
    assert loss.choose("auto", model, zero=3, kernels="liger", on_gpu=True) == (
        "full", "ZeRO-3 partitions the output projection, which these losses read directly")
    assert loss.choose("chunked", model, zero=2, kernels="none", on_gpu=False) == ("chunked", "as requested")
    with pytest.raises(UsageError, match="--loss: liger needs Liger's kernels"):
        loss.choose("liger", model, zero=1, kernels="none", on_gpu=True)
    model.config.model_type = "gemma2"  # logits softcapped after the projection
    with pytest.raises(UsageError, match="--loss: chunked: checked only for llama, .* not gemma2"):
        loss.choose("chunked", model, zero=1, kernels="none", on_gpu=True)


# ------------------------------------------------------------------------------------------------ Liger
class _StandInFusedLoss(torch.nn.Module):
    """Liger 0.8.5's LigerFusedLinearCrossEntropyLoss contract in plain torch: forward(lin_weight, _input, target)."""

    def __init__(self, ignore_index=-100, reduction="mean", accum_dtype=None, **kw):
        super().__init__()
        self.ignore_index, self.reduction, self.accum_dtype = ignore_index, reduction, accum_dtype

    def forward(self, lin_weight, _input, target, bias=None):
        return F.cross_entropy(F.linear(_input, lin_weight, bias).float(), target, ignore_index=self.ignore_index,
                               reduction=self.reduction)


class _StandInSwiGLU(torch.nn.Module):
    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.fixture
def liger_stand_in(monkeypatch):
    """A package named liger_kernel with the entry points we call, in plain torch (the real one is Triton/CUDA)."""
    applied = []
    pkg = types.ModuleType("liger_kernel")
    pkg.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    sub = types.ModuleType("liger_kernel.transformers")
    sub.LigerFusedLinearCrossEntropyLoss = _StandInFusedLoss
    sub.LigerSwiGLUMLP = _StandInSwiGLU
    sub.apply_liger_kernel_to_llama = lambda **kw: applied.append(kw)
    pkg.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    kernels.liger_loss.cache_clear()
    yield applied
    kernels.liger_loss.cache_clear()


def test_liger_wiring_with_a_stand_in(tiny_model_dir, liger_stand_in):
    from src.models import moe

    assert kernels.choose("auto", on_gpu=True, family="llama") == ("liger", "Liger-Kernel installed")
    assert kernels.choose("auto", on_gpu=True, family="gpt2")[0] == "none"
    model = _model(tiny_model_dir)
    moe.upcycle(model, num_experts=7, top_k=2, moe_layers=1)
    model.train()
    batch = Collator(PAD, with_language_ids=True)(_rows())
    with torch.no_grad():
        want = model(**{k: batch[k] for k in ("input_ids", "position_ids", "language_ids")}).logits
    assert kernels.apply_liger(model, is_moe=True) == "RMSNorm, RoPE, SwiGLU on the 1 dense layers"
    (kw,) = liger_stand_in
    assert kw["model"] is model and kw["swiglu"] is False and not kw["fused_linear_cross_entropy"]
    layers = moe.decoder_layers(model)
    assert layers[0].mlp.forward.__func__ is _StandInSwiGLU.forward
    assert isinstance(layers[1].mlp, moe.SparseMoeBlock) and "forward" not in vars(layers[1].mlp)
    with torch.no_grad():  # the stand-in kernels compute what the model did: its sparse block still works
        got = model(**{k: batch[k] for k in ("input_ids", "position_ids", "language_ids")}).logits
    torch.testing.assert_close(got, want)
    fused = kernels.liger_loss()
    assert (fused.reduction, fused.ignore_index, fused.accum_dtype) == ("sum", -100, torch.float32)
    _assert_same(_loss_and_grads(model, batch, "liger", is_moe=True, moe=moe),
                 _loss_and_grads(model, batch, "full", is_moe=True, moe=moe))


def test_real_liger_signatures_when_installed():
    pytest.importorskip("liger_kernel", reason="liger-kernel is a GPU extra (requirements-gpu.txt)")
    import inspect

    import liger_kernel.transformers as liger

    params = list(inspect.signature(liger.LigerFusedLinearCrossEntropyLoss.forward).parameters)
    assert params[:4] == ["self", "lin_weight", "_input", "target"]
    assert "accum_dtype" in inspect.signature(liger.LigerFusedLinearCrossEntropyLoss).parameters
    for name in kernels.LIGER_APPLY.values():
        assert {"rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy", "model"} <= set(
            inspect.signature(getattr(liger, name)).parameters)


@pytest.mark.parametrize("argv, line", [
    (["--kernels", "liger"], "error: --kernels liger: Liger's kernels are Triton kernels and need a CUDA GPU"),
    (["--loss", "liger"], "error: --loss liger: Liger's kernels are Triton kernels and need a CUDA GPU"),
    (["--attn-impl", "varlen"], "error: --attn-impl: varlen: torch's varlen flash attention needs a CUDA GPU"),
    (["--zero", "3", "--loss", "chunked"], "error: --loss chunked: ZeRO-3 partitions the output projection"),
    (["--zero", "3", "--compile"], "error: --compile: with --zero 1 or 2"),
    (["--loss", "liger", "--kernels", "none"], "error: --loss liger: "),
])
def test_speed_flags_that_cannot_run_here_are_one_line(argv, line, capsys, tmp_path):
    if torch.cuda.is_available() and "--zero" not in argv and "none" not in argv:
        pytest.skip("a GPU is present")
    from src.common import cli
    from src.train.train import main

    code = cli.run(main, ["--model", "m", "--train", "t", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(line), err
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------------ compile
def test_compiled_layers_train_like_eager(tiny_model_dir):
    batch = Collator(PAD)(_rows())
    eager = _loss_and_grads(_model(tiny_model_dir), batch, "chunked")
    model = _model(tiny_model_dir)
    assert kernels.compile_layers(model) == model.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert list(model.state_dict()) == list(_model(tiny_model_dir).state_dict())  # checkpoints keep their names
    _assert_same(_loss_and_grads(model, batch, "chunked"), eager, tol=1e-4)


# ------------------------------------------------------------------------------------------- in the trainer
def test_trainer_with_the_chunked_loss(tiny_model_dir, rows_dir, tmp_path):  # noqa: F811
    """Through DeepSpeed (ZeRO-2, one process): step 1's loss is the full loss of its rows (before any update), the
    run learns, and the start-up line says what runs and why."""
    from src.train.data import load_rows

    out = tmp_path / "chunked"
    proc = subprocess.run([sys.executable, "-m", "src.train.train", *_common(
        tiny_model_dir, rows_dir, out, "--zero", 2, "--max-steps", 2, "--save-every", -1, "--eval-every", -1,
        "--loss", "chunked")], cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attention sdpa (CPU: " in proc.stdout and "; loss chunked (as requested)" in proc.stdout
    got = losses(out)
    rows = load_rows(rows_dir)
    model = _model(tiny_model_dir)
    with torch.no_grad():  # step 1 = 2 micro-batches of 2 rows (_common's batch size and accumulation)
        micro = [Collator(PAD)([rows[i] for i in range(j, j + 2)]) for j in (0, 2)]
        ce = sum(forward_loss(model, b, "cpu", is_moe=False)[0] for b in micro)
    n_label = sum(int((b["labels"] != -100).sum()) for b in micro)
    assert got[1] == pytest.approx(ce.item() / n_label, rel=1e-5)
    assert got[2] < got[1]


# ----------------------------------------------------------------------------------- bench/train_speed.py
def test_train_speed_reports_each_method_as_it_ends(monkeypatch, tmp_path, capsys):
    """The benchmark's reporting with stand-in runs (the runs themselves are the trainer, tested above): one JSON line
    per method in run order, skipped methods with the reason, a timed-out run with the steps it logged, the ratios."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: varlen would run")
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "bench" / "train_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = types.SimpleNamespace(model_type="llama", num_hidden_layers=2, hidden_size=8, vocab_size=100)
    monkeypatch.setattr(bench, "prepare", lambda args, work: {"model": work, "rows": work, "moe": work, "config": cfg})

    def fake_run(method, inputs, out, args):
        seconds = 2.0 if method == "moe" else 1.0
        records = [{"loss": 3.0 - i + (0.03 if method == "ours" else 0.0), "tokens": 100, "step_seconds": seconds,
                    "step_cpu_seconds": 0.5, "mfu": 0.25} for i in range(3)]
        if method == "compile":
            return {"status": "timed out after 5 s", "error": "", "records": records[:2]}
        return {"status": "ok", "compute_params": 15 if method == "moe" else 10, "peak_rss_bytes": 2 ** 30,
                "cuda_peak_bytes": None, "records": records}

    monkeypatch.setattr(bench, "run_method", fake_run)
    jsonl = tmp_path / "r.jsonl"
    bench.main(["--methods", "plain,ours,varlen,moe,compile", "--steps", "2", "--jsonl", str(jsonl),
                "--json", str(tmp_path / "r.json")])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [(x["method"], x["status"]) for x in lines] == [
        ("plain", "ok"), ("ours", "ok"), ("varlen", "skipped"), ("moe", "ok"), ("compile", "timed out after 5 s"),
        ("plain", "ok")]
    assert [json.loads(x) for x in jsonl.read_text().splitlines()] == lines
    by = {(x["method"], x["round"]): x for x in lines}
    assert by["varlen", 0]["reason"] == "torch's varlen flash attention needs a CUDA GPU"
    ours, moe, compiled = by["ours", 0], by["moe", 0], by["compile", 0]
    assert ours["tokens_per_s"] == 100 and ours["tokens_per_cpu_s"] == 200 and ours["mfu"] == 0.25
    assert ours["vs_plain"] == 1.0 and ours["peak_memory_bytes"] == 2 ** 30 and ours["losses"] == [3.03, 2.03, 1.03]
    assert ours["loss_max_rel_diff"] == {"vs": "plain", "value": pytest.approx(0.03)}
    assert moe["tokens_x_params_vs_dense"] == pytest.approx(50 * 15 / (100 * 10))
    assert compiled["steps_timed"] == 1 and compiled["tokens_per_s"] == 100  # what it measured before the limit
    assert json.loads((tmp_path / "r.json").read_text())["ratio_wall"] == 1.0


def test_train_speed_error_is_the_last_message_not_a_progress_bar():
    """A failed or timed-out run's "error" field: the child's last stderr line, skipping tqdm's redrawn bars."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_speed", ROOT / "bench" / "train_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bar = "Loading weights:   0%|   | 0/20 [00:00<?, ?it/s]\rLoading weights: 100%|##| 20/20 [00:00<00:00, 548.7it/s]\n"
    assert bench.last_message("[train] step 3 loss 2.1\n" + bar) == "[train] step 3 loss 2.1"
    assert bench.last_message(bar + "Traceback ...\nValueError: bad rows\n") == "ValueError: bad rows"
    assert bench.last_message(bar) == ""
