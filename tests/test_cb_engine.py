"""``--engine cb`` (src/generation/cb.py): transformers' continuous batching under the custom engine's rules gives
the custom engine's predictions (text, letter, rule, new tokens, stop) on CPU, for a tiny model whose output favours
newlines, brackets, letters and the stop token (every stopping rule fires) and for SmolLM2 on embedded sample items;
the CLI records the engine, ``auto`` picks the custom engine on a CPU, our Post-MoE class is refused naming the
export."""
import json

import pytest
import torch
from test_eval import _preds, _write, make_records

from src.evaluate import eval as step4
from src.evaluate.predict import predict

FAVOURED = [" (", "A", "B", "C", ")", "(", ".", " The", " answer", "\n", "\n\n"]
FIELDS = ("id", "raw", "letter", "rule", "new_tokens", "stop")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def favouring(smollm2_tokenizer, tmp_path_factory):
    """A tiny random Llama whose output layer favours a few tokens and the end token: greedy decoding writes
    bracketed letters, newlines and stops, so min_new_tokens, the first-line stop, EOS and max_new_tokens all
    happen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from src.models.loading import load_model

    tok = smollm2_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    ids = sorted({tok(s, add_special_tokens=False).input_ids[-1] for s in FAVOURED} | {tok.eos_token_id})
    with torch.no_grad():
        model.lm_head.weight[ids] = torch.randn(len(ids), 64)
    path = tmp_path_factory.mktemp("favouring")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, load_model(path).eval(), tok


@pytest.fixture(scope="module")
def records(favouring, tmp_path_factory):
    from src.common.chat_formats import resolve_format

    _, model, tok = favouring
    return make_records(tmp_path_factory.mktemp("recs"), tok, resolve_format(tok, model.config))


def rows(preds):
    return [tuple(p[f] for f in FIELDS) for p in preds]


@pytest.mark.parametrize("min_new, max_new", [(2, 12), (5, 8)])
def test_cb_gives_the_custom_engine_predictions(favouring, records, min_new, max_new):
    _, model, tok = favouring
    common = dict(batch_size=6, max_new_tokens=max_new, min_new_tokens=min_new, progress=False)
    ours = predict(model, tok, records, **common)
    stats: dict = {}
    cb = predict(model, tok, records, engine="cb", stats=stats, **common)
    assert rows(cb) == rows(ours)
    assert stats["items"] == len(records) and stats["stops"] == {
        s: sum(p["stop"] == s for p in ours) for s in {p["stop"] for p in ours}}
    if min_new == 2:  # the model's text exercises every rule
        assert {p["stop"] for p in ours} == {"eos", "line", "max_tokens"}
        assert {p["rule"] for p in ours} - {"none"}


def test_cb_on_smollm2_sample_items(smollm2_dir, smollm2_tokenizer):
    """SmolLM2 on three embedded sample items (1-shot prompts built by step 1's code): the same answers, ended by
    its end token, as the custom engine."""
    from bench.eval_speed import build_items
    from src.common.chat_formats import resolve_format
    from src.common.defaults import ROOT
    from src.models.loading import load_model

    model = load_model(smollm2_dir).eval()
    fmt = resolve_format(smollm2_tokenizer, model.config)
    recs, _ = build_items(ROOT / "assets" / "sample", smollm2_tokenizer, fmt, 3, 400, seed=0, k=1)
    assert len(recs) == 3
    common = dict(fmt=fmt, batch_size=3, max_new_tokens=20, progress=False)
    ours = predict(model, smollm2_tokenizer, recs, **common)
    assert rows(predict(model, smollm2_tokenizer, recs, engine="cb", **common)) == rows(ours)
    assert "eos" in {p["stop"] for p in ours} and any(p["letter"] for p in ours)


def test_cli_engine_cb_and_auto(favouring, records, tmp_path):
    path, _, _ = favouring
    inp = _write(tmp_path / "test.jsonl", records[:6])
    common = ["--model", str(path), "--input", str(inp), "--max-new-tokens", "8", "--no-progress"]
    assert step4.main(common + ["--out", str(tmp_path / "auto")]) == 0
    assert step4.main(common + ["--out", str(tmp_path / "cb"), "--engine", "cb"]) == 0
    auto, cb = (_preds(tmp_path / d / "predictions.jsonl") for d in ("auto", "cb"))
    assert rows(cb) == rows(auto)
    engines = [json.loads((tmp_path / d / "run.json").read_text())["settings"]["engine"] for d in ("auto", "cb")]
    assert engines == ["custom", "cb"]  # auto is the custom engine on a CPU


def test_cb_refuses_our_post_moe_naming_the_export(favouring, tmp_path, capsys):
    from src.common import cli
    from src.common.errors import UsageError
    from src.models import moe

    path, _, tok = favouring
    from src.models.loading import load_model

    upcycled = moe.upcycle(load_model(path), num_experts=2, top_k=1, moe_layers=1, norm_topk_prob=False)
    with pytest.raises(UsageError, match="moe_export"):
        predict(upcycled, tok, [{"id": "x", "prompt": "hi", "letters": ["A", "B"], "answer": "A"}], engine="cb")
    folder = moe.save_moe(upcycled, tok, tmp_path / "moe")
    capsys.readouterr()
    code = cli.run(step4.main, ["--model", str(folder), "--input", str(tmp_path / "none.jsonl"), "--out",
                                str(tmp_path / "o"), "--engine", "cb"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "python -m util.moe_export" in err[0]
