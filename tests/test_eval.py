"""Step 4 engine and CLI: early stop gives the letters of the full decode (and of HF generate), batching and prefix
reuse are invisible, loglik mode, out-of-memory adaptation, resume, sharding, and end-to-end runs on real items
(SmolLM2, ../shared) and on the embedded sample."""
import json
import random

import pytest
import torch

from src.common.chat_formats import resolve_format
from src.evaluate import eval as step4
from src.common.errors import UsageError
from src.evaluate import loglik
from src.evaluate.predict import predict
from src.generation.engine import HFStepModel
from src.evaluate.extract import extract
from src.prepare.bench_items import load_bench
from src.prepare.prompts import PromptBuilder
from src.prepare.bench_prompts import _by_source, build_split

SOURCES = {"medqa-usmle": 4, "cmexam": 5, "mmlu-medical-ar": 4, "headqa": 4, "KorMedMCQA": 5, "RuMedDaNet": 2}
WORDS = ["fever", "cough", "liver", "heart", "drug", "renal", "dose", "pain", "lung", "skin"]


def synthetic_bench(path, per_source=4, seed=0):
    rng = random.Random(seed)
    raw = []
    for source, n in SOURCES.items():
        letters = "ABCDE"[:n]
        for i in range(per_source):
            q = f"Question {i} about {source}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            opts = "\n".join(f"({letters[j]}) choice {j} {rng.randint(0, 99)}" for j in range(n))
            raw.append({"question": q, "options": opts, "answer": f"({rng.choice(letters)})", "source": source})
    path.write_text(json.dumps(raw), encoding="utf-8")
    return path


def make_records(tmp_path, tokenizer, fmt, fixed=False, k=2, per_source=4):
    """Step 1 records for synthetic items of six sources; shots from a separate synthetic dev set."""
    items, _ = load_bench(synthetic_bench(tmp_path / "bench.json", per_source))
    dev, _ = load_bench(synthetic_bench(tmp_path / "dev.json", 3, seed=1))
    recs, _, _ = build_split(items, _by_source(dev), PromptBuilder(fmt), tokenizer, k, 0, fixed, 4096, "test")
    return recs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine every parallel op otherwise waits for a free core (~13 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from src.models.loading import load_model, load_tokenizer

    model = load_model(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    return model, tok, resolve_format(tok, model.config)


@pytest.fixture(scope="module")
def records(tiny, tmp_path_factory):
    _, tok, fmt = tiny
    return make_records(tmp_path_factory.mktemp("recs"), tok, fmt)


# A random tiny model mostly repeats one token. To exercise every stop path, a deterministic bias (a function of the
# previous token and its position) pushes it towards newlines, brackets and letters; the same bias is applied to
# HF generate through a LogitsProcessor, so the comparison with the full decode is exact.
FAVOURED = ["\n", " (", "A", "B", "C", "D", "E", ")", "(", ".", " ", "The", " correct", "\n\n", "="]


def _bias_table(tok):
    ids = [tok(s, add_special_tokens=False).input_ids[-1] for s in FAVOURED]
    g = torch.Generator().manual_seed(0)
    table = torch.zeros(97, len(tok))
    table[:, ids] = torch.rand(97, len(ids), generator=g) * 3.0
    return table


def _bias(table, prev, pos):
    b = table[(prev * 31 + pos) % 97].clone()
    b.scatter_(1, prev[:, None], -10.0)  # no immediate repetition
    return b


class Biased:
    """A StepModel wrapper (the protocol a proxy-tuning wrapper implements) adding the bias to the logits."""

    def __init__(self, model, table):
        self.inner, self.table = HFStepModel(model), table
        self.device = self.inner.device
        self.calls = []

    def forward_step(self, input_ids, attention_mask, position_ids, past_key_values, logits_to_keep=1):
        self.calls.append(tuple(input_ids.shape))
        logits, cache = self.inner.forward_step(input_ids, attention_mask, position_ids, past_key_values,
                                                logits_to_keep)
        return logits + _bias(self.table, input_ids[:, -1], position_ids[:, -1])[:, None, :], cache


def test_early_stop_gives_the_full_decode_letters(tiny, records):
    model, tok, fmt = tiny
    table = _bias_table(tok)
    stats_early, stats_full = {}, {}
    early = predict(Biased(model, table), tok, records, fmt=fmt, batch_size=4, max_new_tokens=32, progress=False,
                    stats=stats_early)
    full = predict(Biased(model, table), tok, records, fmt=fmt, batch_size=4, max_new_tokens=32, progress=False,
                   early_stop=False, stats=stats_full)
    assert stats_early["stops"].get("line", 0) >= len(records) // 2  # early stop really happened
    assert stats_early["new_tokens"] < stats_full["new_tokens"] / 2
    assert {p["rule"] for p in early} >= {"loose", "none"}
    for a, b in zip(early, full):
        assert a["id"] == b["id"]
        assert b["raw"].startswith(a["raw"])
        assert (a["letter"], a["rule"]) == (b["letter"], b["rule"])
        assert a["correct"] == (a["letter"] == a["gold"])


def test_full_decode_equals_hf_generate(tiny, records):
    from transformers import LogitsProcessor, LogitsProcessorList

    model, tok, fmt = tiny
    table = _bias_table(tok)

    class Proc(LogitsProcessor):
        def __call__(self, input_ids, scores):
            pos = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1)
            return scores + _bias(table, input_ids[:, -1], pos)

    subset = records[::3]
    ours = predict(Biased(model, table), tok, subset, fmt=fmt, batch_size=4, max_new_tokens=20, progress=False,
                   early_stop=False)
    stop = fmt.stop_token(tok)
    for rec, pred in zip(subset, ours):
        ids = tok(rec["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                             min_new_tokens=2, eos_token_id=[stop], pad_token_id=tok.pad_token_id,
                             logits_processor=LogitsProcessorList([Proc()]))
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == pred["raw"]


def test_batching_and_prefix_reuse_are_invisible(tiny, tmp_path):
    model, tok, fmt = tiny
    fixed = make_records(tmp_path, tok, fmt, fixed=True, k=2)
    assert len({tuple(r["shots"]) for r in fixed if r["source"] == "headqa"}) == 1
    table = _bias_table(tok)
    stats = {}
    a = predict(Biased(model, table), tok, fixed, fmt=fmt, batch_size=4, max_new_tokens=16, progress=False,
                stats=stats)
    b = predict(Biased(model, table), tok, fixed, fmt=fmt, batch_size=1, max_new_tokens=16, progress=False,
                prefix_cache="off")
    c = predict(Biased(model, table), tok, fixed, fmt=fmt, batch_size=6, max_new_tokens=16, progress=False,
                prefill_batch=6, max_padding=1.0)  # GPU style: padded prefill batches
    assert stats["prefix_saved_tokens"] > 0 and stats["prefix_tokens"] > 0 and stats["merges"] > 0
    assert stats["prompt_tokens"] + stats["prefix_saved_tokens"] == sum(r["prompt_tokens"] for r in fixed)
    assert [p["raw"] for p in a] == [p["raw"] for p in b] == [p["raw"] for p in c]


def test_per_item_shots_share_their_prefixes_invisibly(tiny, records):
    """Per-item shots: items with the same first shot, and the rest of each source, share a computed-once prefix;
    the generations equal those computed without any prefix reuse."""
    model, tok, fmt = tiny
    assert len({tuple(r["shots"]) for r in records}) > len({r["source"] for r in records})  # really per item
    table = _bias_table(tok)
    stats = {}
    a = predict(Biased(model, table), tok, records, fmt=fmt, batch_size=4, max_new_tokens=16, progress=False,
                stats=stats)
    b = predict(Biased(model, table), tok, records, fmt=fmt, batch_size=4, max_new_tokens=16, progress=False,
                prefix_cache="off")
    assert stats["prefix_saved_tokens"] > 0.1 * sum(r["prompt_tokens"] for r in records)
    assert stats["prompt_tokens"] + stats["prefix_saved_tokens"] == sum(r["prompt_tokens"] for r in records)
    assert [p["raw"] for p in a] == [p["raw"] for p in b]


def test_sorted_batches_limit_padding(tiny, records):
    model, tok, fmt = tiny
    stats = {}
    predict(model, tok, records, fmt=fmt, batch_size=8, max_new_tokens=2, progress=False, prefix_cache="off",
            max_padding=0.05, stats=stats, prefill_batch=8)
    assert stats["padded_tokens"] <= 0.05 * (stats["prompt_tokens"] + stats["padded_tokens"])


def test_out_of_memory_halves_the_batch(tiny, records):
    model, tok, fmt = tiny

    class Small(HFStepModel):
        def forward_step(self, input_ids, *args, **kwargs):
            if input_ids.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().forward_step(input_ids, *args, **kwargs)

    stats = {}
    got = predict(Small(model), tok, records, fmt=fmt, batch_size=8, max_new_tokens=6, progress=False, stats=stats,
                  prefix_cache="off", max_padding=1.0)
    want = predict(model, tok, records, fmt=fmt, batch_size=8, max_new_tokens=6, progress=False, prefix_cache="off")
    assert stats["oom_splits"] >= 1 and stats["batch_size_final"] <= 2
    assert [p["id"] for p in got] == [p["id"] for p in want]
    assert [p["raw"] for p in got] == [p["raw"] for p in want]
    # the same when the prefill of a padded batch is what runs out of memory
    stats = {}
    got = predict(Small(model), tok, records, fmt=fmt, batch_size=8, max_new_tokens=6, progress=False, stats=stats,
                  prefix_cache="off", max_padding=1.0, prefill_batch=8)
    assert stats["oom_splits"] >= 1 and [p["raw"] for p in got] == [p["raw"] for p in want]


def test_train_mode_is_restored_and_no_grad(tiny, records):
    model, tok, fmt = tiny
    model.train()
    try:
        seen = []
        model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
        predict(model, tok, records[:2], fmt=fmt, max_new_tokens=2, progress=False)
        assert seen and all(s == (False, False) for s in seen)
        assert model.training
    finally:
        model._forward_pre_hooks.clear()
        model.eval()


def test_loglik_mode(tiny, records, monkeypatch):
    model, tok, fmt = tiny
    subset = records[:6]
    preds = predict(model, tok, subset, fmt=fmt, batch_size=3, mode="loglik", progress=False)
    for rec, p in zip(subset, preds):
        assert p["rule"] == "loglik" and set(p["scores"]) == set(rec["letters"])
        assert p["letter"] == max(rec["letters"], key=lambda L: p["scores"][L])
        assert p["correct"] == (p["letter"] == rec["answer"])
        ctx = rec["prompt"] + rec["answer_phrase"] + "("
        ids = tok(ctx, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        for L in rec["letters"]:
            tid = tok(ctx + L, add_special_tokens=False).input_ids[-1]
            assert p["scores"][L] == pytest.approx(float(logp[tid]), abs=2e-3)
    # the general path (letters that are not single tokens) scores the same
    monkeypatch.setattr(loglik, "_single_tokens", lambda tokenizer, rec: None)
    general = predict(model, tok, subset, fmt=fmt, mode="loglik", progress=False)
    for a, b in zip(preds, general):
        assert a["letter"] == b["letter"]
        assert a["scores"] == pytest.approx(b["scores"], abs=2e-3)


def test_proxy_tuning_wrapper_plugs_in(tiny, records):
    pt = pytest.importorskip("src.models.proxy_tuning")
    model, tok, fmt = tiny
    wrapped = pt.ProxyTuned(model, model, model)  # base + (tuned - raw) with tuned == raw: the base model
    a = predict(wrapped, tok, records[:4], fmt=fmt, batch_size=2, max_new_tokens=6, progress=False)
    b = predict(model, tok, records[:4], fmt=fmt, batch_size=2, max_new_tokens=6, progress=False)
    assert [p["raw"] for p in a] == [p["raw"] for p in b]


def test_shard_covers_every_item_once(records):
    for world in (1, 2, 3, 5):
        parts = [step4.shard(records, world, r) for r in range(world)]
        ids = [p["id"] for part in parts for p in part]
        assert sorted(ids) == sorted(r["id"] for r in records)
        assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------------------- CLI
def _write(path, recs):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def _preds(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_cli_writes_scores_and_resumes(tiny_model_dir, records, tmp_path, capsys):
    inp = _write(tmp_path / "test.jsonl", records)
    out = tmp_path / "res"
    common = ["--model", str(tiny_model_dir), "--input", str(inp), "--out", str(out), "--max-new-tokens", "8",
              "--no-progress"]
    args = common + ["--limit", "8"]
    assert step4.main(args) == 0
    first = _preds(out / "predictions.jsonl")
    assert [p["id"] for p in first] == [r["id"] for r in records[:8]]
    score = json.loads((out / "score.json").read_text())
    assert score["items"] == 8 and "| language |" in (out / "score.md").read_text()
    assert "| source |" in capsys.readouterr().out

    # a crash: 5 lines kept and half a line written
    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:5]) + lines[5][:20], encoding="utf-8")
    assert step4.main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resumed"] == 5 and run["predicted_now"] == 3
    again = _preds(out / "predictions.jsonl")
    assert [(p["id"], p["raw"], p["letter"]) for p in again] == [(p["id"], p["raw"], p["letter"]) for p in first]

    # nothing left to do (run.json still names the chat format: scripts read it to score an export alike); the full
    # input then continues where the limit stopped
    resolved = run["settings"]["resolved_format"]
    assert resolved
    assert step4.main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["predicted_now"] == 0 and run["settings"]["resolved_format"] == resolved
    assert step4.main(common + ["--limit-per-source", "2"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["items"] == 2 * len(SOURCES) and run["predicted_now"] == run["items"] - run["resumed"]

    # other settings in the same folder are refused, --overwrite starts afresh
    with pytest.raises(SystemExit, match="other settings"):
        step4.main(args + ["--mode", "loglik"])
    assert step4.main(args + ["--mode", "loglik", "--overwrite"]) == 0
    assert {p["rule"] for p in _preds(out / "predictions.jsonl")} == {"loglik"}


def test_cli_input_errors(tiny_model_dir, records, tmp_path):
    from src.common.errors import DataError

    bad = dict(records[0])
    del bad["letters"]
    inp = _write(tmp_path / "bad.jsonl", [records[1], bad])
    with pytest.raises(DataError, match="record 2, field 'letters'"):
        step4.main(["--model", str(tiny_model_dir), "--input", str(inp), "--out", str(tmp_path / "o")])
    inp = _write(tmp_path / "dup.jsonl", [records[1], records[1]])
    with pytest.raises(DataError, match="duplicate id"):
        step4.main(["--model", str(tiny_model_dir), "--input", str(inp), "--out", str(tmp_path / "o")])


GOOD = {"id": "x", "source": "headqa", "language": "es", "prompt": "P", "answer": "B", "letters": ["A", "B"]}


@pytest.mark.parametrize("change,field,message", [
    ({"letters": "AB"}, "letters", "must be a list of option letters A-H"),
    ({"letters": ["A", "BC"]}, "letters", "must be a list of option letters A-H"),
    ({"letters": ["A", "A", "B"]}, "letters", "repeats a letter"),
    ({"answer": "AB"}, "answer", "'AB' is not one of the letters"),  # "AB" in "ABCD" would have passed as a substring
    ({"prompt": ["P"]}, "prompt", "must be a string, got list"),
    ({"answer_phrase": 5}, "answer_phrase", "must be a string, got int"),
    ({"source": ""}, "source", "missing"),
])
def test_step1_record_defects_name_the_field(change, field, message):
    from src.common.errors import DataError
    from src.evaluate.records import check_record

    assert check_record(GOOD, "t.jsonl", 1) is GOOD
    assert check_record({**GOOD, "answer_phrase": None}, "t.jsonl", 1)  # absent and null are the same
    with pytest.raises(DataError, match=f"t.jsonl: record 3, field '{field}': {message}"):
        check_record({**GOOD, **change}, "t.jsonl", 3)
    with pytest.raises(DataError, match="t.jsonl: record 3: expected an object, got list"):
        check_record([GOOD], "t.jsonl", 3)


def test_cli_merges_parts_of_several_processes(tiny_model_dir, records, tmp_path):
    # What rank files of an interrupted multi-process run look like: they are folded in and not redone.
    inp = _write(tmp_path / "test.jsonl", records[:6])
    out = tmp_path / "res"
    ref = tmp_path / "ref"
    base = ["--model", str(tiny_model_dir), "--input", str(inp), "--max-new-tokens", "6", "--no-progress"]
    assert step4.main(base + ["--out", str(ref)]) == 0
    full = _preds(ref / "predictions.jsonl")
    (out / "parts").mkdir(parents=True)
    _write(out / "parts" / "predictions.rank0.jsonl", full[:2])
    _write(out / "parts" / "predictions.rank1.jsonl", full[4:5])
    (out / "run.json").write_text((ref / "run.json").read_text())
    assert step4.main(base + ["--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["resumed"] == 3 and run["predicted_now"] == 3
    assert not (out / "parts").exists()
    assert [p["raw"] for p in _preds(out / "predictions.jsonl")] == [p["raw"] for p in full]


# ---------------------------------------------------------------------------------------------- real data
def test_real_items_with_smollm2(shared_data, smollm2_dir, smollm2_tokenizer, tmp_path):
    """A few real 3-shot items (dev shots) through the CLI with the real SmolLM2."""
    from transformers import AutoConfig

    fmt = resolve_format(smollm2_tokenizer, AutoConfig.from_pretrained(smollm2_dir))
    test, _ = load_bench(shared_data / "bench_test.json")
    dev, _ = load_bench(shared_data / "bench_dev.json")
    pick = []
    for source in ("medmcqa", "headqa", "frenchmedmcqa"):
        pick += [it for it in test if it.source == source][:1]
    recs, _, _ = build_split(pick, _by_source(dev), PromptBuilder(fmt), smollm2_tokenizer, 3, 0, False, 4096, "t")
    inp = _write(tmp_path / "test.jsonl", recs)
    out = tmp_path / "res"
    assert step4.main(["--model", str(smollm2_dir), "--input", str(inp), "--out", str(out), "--no-progress"]) == 0
    preds = _preds(out / "predictions.jsonl")
    assert len(preds) == 3
    for p, r in zip(preds, recs):
        assert p["letter"] in r["letters"] and p["rule"] == "bracketed"  # SmolLM2 copies "(X)." from the shots
        assert p["stop"] in ("eos", "line") and p["new_tokens"] <= 20
        assert extract(p["raw"], r["letters"]).letter == p["letter"]
    score = json.loads((out / "score.json").read_text())
    assert set(score["languages"]) == {"en", "es", "fr"} and score["items"] == 3


def test_embedded_sample_end_to_end(tiny_model_dir, tmp_path):
    """Step 1 on the embedded sample, then step 4 (tiny model: this checks the plumbing, not accuracy)."""
    from pathlib import Path

    from src.prepare import bench_prompts

    sample = Path(__file__).resolve().parents[1] / "assets" / "sample"
    if not (sample / "bench_test.json").is_file():
        pytest.skip("the embedded sample is not present")
    data = tmp_path / "data"
    bench_prompts.main(["--bench", str(sample / "bench_test.json"), "--dev", str(sample / "bench_dev.json"),
                   "--model", str(tiny_model_dir), "--out", str(data)])
    out = tmp_path / "res"
    assert step4.main(["--model", str(tiny_model_dir), "--input", str(data / "test.jsonl"), "--out", str(out),
                       "--limit-per-source", "1", "--max-new-tokens", "4", "--no-progress"]) == 0
    score = json.loads((out / "score.json").read_text())
    sources = {json.loads(x)["source"] for x in (data / "test.jsonl").read_text(encoding="utf-8").splitlines()}
    assert set(score["sources"]) == sources and score["items"] == len(sources)
    assert len(score["languages"]) >= 4


def test_two_processes_score_every_item_once(tiny_model_dir, records, tmp_path):
    """torchrun with 2 CPU processes (gloo): each item once, parts merged by rank 0."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists() and not shutil.which("torchrun"):
        pytest.skip("torchrun not available")
    inp = _write(tmp_path / "test.jsonl", records[:10])
    out = tmp_path / "res"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    import socket

    with socket.socket() as sock:  # a free port: other test runs may share the machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(torchrun if torchrun.exists() else "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "src.evaluate.eval", "--model", str(tiny_model_dir), "--input", str(inp), "--out", str(out),
           "--max-new-tokens", "4", "--no-progress"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = _preds(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == [r["id"] for r in records[:10]]
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 2 and run["predicted_now"] == 10
    assert not (out / "parts").exists()


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_other_architectures_match_hf_generate(arch, smollm2_tokenizer, records):
    """Qwen2 (preallocated cache, continuous batching) and Gemma2 (sliding-window layers: no merging, batch by
    batch) give HF generate's greedy output."""
    import transformers

    tok = smollm2_tokenizer
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "qwen2":
        config = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.Gemma2Config(**common, head_dim=16, sliding_window=64)
        cls = transformers.Gemma2ForCausalLM
    torch.manual_seed(1)
    model = cls(config).eval()
    from src.common.chat_formats import from_chat_template

    fmt = from_chat_template(tok)
    subset = records[:5]
    stats = {}
    ours = predict(model, tok, subset, fmt=fmt, batch_size=3, max_new_tokens=8, progress=False, early_stop=False,
                   stats=stats)
    assert (stats["merges"] > 0) == (arch == "qwen2")
    for rec, pred in zip(subset, ours):
        ids = tok(rec["prompt"], add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             min_new_tokens=2, eos_token_id=[fmt.stop_token(tok)], pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == pred["raw"]


def test_upcycled_moe_model_scores_like_its_dense_model(tiny_model_dir, records):
    """A Post-MoE model upcycled from the tiny dense model (function-preserving) generates the same through the
    engine: the MoE forward accepts our masks, positions and cache."""
    moe = pytest.importorskip("src.models.moe")
    from src.models.loading import load_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    dense = predict(load_model(tiny_model_dir), tok, records[:6], batch_size=4, max_new_tokens=6, progress=False)
    upcycled = moe.upcycle(load_model(tiny_model_dir), num_experts=3, top_k=2, moe_layers=1)
    sparse = predict(upcycled, tok, records[:6], batch_size=4, max_new_tokens=6, progress=False)
    assert [p["raw"] for p in sparse] == [p["raw"] for p in dense]


def test_hf_generate_engine_gives_the_custom_engine_letters(tiny, records):
    """``--engine hf`` (plain model.generate) and the custom engine agree letter for letter; the custom engine's
    early-stopped text is a prefix of generate's full decode."""
    from transformers import LogitsProcessor, LogitsProcessorList

    model, tok, fmt = tiny
    table = _bias_table(tok)

    class Proc(LogitsProcessor):
        def __call__(self, input_ids, scores):
            pos = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1)  # batch 1: no padding
            return scores + _bias(table, input_ids[:, -1], pos)

    ours = predict(Biased(model, table), tok, records, fmt=fmt, batch_size=4, max_new_tokens=24, progress=False)
    stats: dict = {}
    hf = predict(model, tok, records, engine="hf", fmt=fmt, batch_size=1, max_new_tokens=24, progress=False,
                 stats=stats, logits_processor=LogitsProcessorList([Proc()]))
    assert stats["items"] == len(records) and stats["batches"] == len(records)
    assert {p["rule"] for p in hf} - {"none"}, "the bias should make some letters appear"
    for a, b in zip(ours, hf):
        assert a["id"] == b["id"]
        assert b["raw"].startswith(a["raw"])
        assert (a["letter"], a["rule"], a["correct"]) == (b["letter"], b["rule"], b["correct"])


def test_cli_engine_hf_writes_the_same_scores(tiny_model_dir, records, tmp_path):
    inp = _write(tmp_path / "test.jsonl", records[:6])
    common = ["--model", str(tiny_model_dir), "--input", str(inp), "--max-new-tokens", "6", "--no-progress"]
    assert step4.main(common + ["--out", str(tmp_path / "custom")]) == 0
    assert step4.main(common + ["--out", str(tmp_path / "hf"), "--engine", "hf"]) == 0
    custom, hf = _preds(tmp_path / "custom" / "predictions.jsonl"), _preds(tmp_path / "hf" / "predictions.jsonl")
    assert [(p["id"], p["letter"], p["rule"]) for p in custom] == [(p["id"], p["letter"], p["rule"]) for p in hf]
    scores = [json.loads((tmp_path / d / "score.json").read_text()) for d in ("custom", "hf")]
    assert scores[0]["sources"] == scores[1]["sources"]
    assert json.loads((tmp_path / "hf" / "run.json").read_text())["settings"]["engine"] == "hf"
    with pytest.raises(UsageError, match="--engine: hf generates with a plain transformers model"):
        step4.main(common + ["--out", str(tmp_path / "x"), "--engine", "hf", "--mode", "loglik"])
