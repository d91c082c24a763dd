"""Serving: scripts/serve.sh starts a real `transformers serve` on a free local port, step 4 through it gives the
in-process letters on real XMedBench items (greedy, same prompts), resumes, and refuses what the server cannot do.
One server process (SmolLM2) is shared by the module and killed in teardown."""
import json
import sys

import pytest

from conftest import free_port, serve
from src.evaluate import eval as step4
from src.generation.server import needs_full_decode
from src.generation.stops import cut_first_line
from src.serving.launch import ROOT_SCRIPT

N_ITEMS = 12


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory):
    yield from serve(smollm2_dir, tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def real_records(shared_data, smollm2_dir, smollm2_tokenizer, tmp_path_factory):
    """12 real 3-shot items (dev shots), two from each of six sources in several languages, short prompts."""
    from transformers import AutoConfig

    from src.common.chat_formats import resolve_format
    from src.prepare.bench_items import load_bench
    from src.prepare.prompts import PromptBuilder
    from src.prepare.bench_prompts import _by_source, build_split

    fmt = resolve_format(smollm2_tokenizer, AutoConfig.from_pretrained(smollm2_dir))
    test, _ = load_bench(shared_data / "bench_test.json")
    dev, _ = load_bench(shared_data / "bench_dev.json")
    pool = [it for _, items in sorted(_by_source(test).items()) for it in items[:6]]
    recs, _, _ = build_split(pool, _by_source(dev), PromptBuilder(fmt), smollm2_tokenizer, 3, 0, False, 4096, "t")
    by_source: dict = {}
    for r in sorted(recs, key=lambda r: r["prompt_tokens"]):
        by_source.setdefault(r["source"], []).append(r)
    pick = [r for rs in sorted(by_source.values(), key=lambda rs: rs[0]["prompt_tokens"])[:6] for r in rs[:2]]
    assert len(pick) == N_ITEMS
    path = tmp_path_factory.mktemp("real") / "test.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pick), encoding="utf-8")
    return path, pick


def _preds(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_first_line_cut_keeps_a_leading_newline_out_of_the_answer():
    assert cut_first_line("\n\n(B).\nmore") == ("\n\n(B).\n", True)
    assert cut_first_line("(A)") == ("(A)", False)
    assert cut_first_line("\n\n") == ("\n\n", False)
    assert needs_full_decode("\n", "stop") and needs_full_decode("\n\n", "stop")
    assert not needs_full_decode("(A).\n", "stop") and not needs_full_decode("\n", "length")
    assert not needs_full_decode("", "stop")  # an end token at once: nothing was cut off


def test_step4_through_the_server_gives_the_in_process_letters(server, real_records, smollm2_dir, tmp_path):
    inp, recs = real_records
    ours, api = tmp_path / "inprocess", tmp_path / "api"
    base = ["--model", str(smollm2_dir), "--input", str(inp), "--no-progress", "--threads", "1"]
    assert step4.main(base + ["--out", str(ours)]) == 0
    assert step4.main(base + ["--out", str(api), "--backend", "openai", "--api-base", server.base_url,
                              "--concurrency", "2"]) == 0
    a, b = _preds(ours / "predictions.jsonl"), _preds(api / "predictions.jsonl")
    assert [p["id"] for p in b] == [r["id"] for r in recs]  # input order, every item once
    assert [p["letter"] for p in b] == [p["letter"] for p in a]
    assert sum(p["letter"] is not None for p in b) >= N_ITEMS // 2  # real answers, not an empty comparison
    for p, q in zip(a, b):
        assert set(p) == set(q)
        assert q["stop"] == p["stop"] and q["rule"] == p["rule"]
        assert cut_first_line(q["raw"])[0].split("\n")[0] == cut_first_line(p["raw"])[0].split("\n")[0]
    sa, sb = (json.loads((d / "score.json").read_text()) for d in (ours, api))
    assert sa["languages"] == sb["languages"] and sa["sources"] == sb["sources"]
    run = json.loads((api / "run.json").read_text())
    assert run["settings"]["backend"] == "openai" and run["engine"]["requests"] >= N_ITEMS


def test_a_rerun_resumes_and_settings_are_checked(server, real_records, smollm2_dir, tmp_path, capsys):
    inp, recs = real_records
    out = tmp_path / "api"
    args = ["--model", str(smollm2_dir), "--input", str(inp), "--out", str(out), "--no-progress", "--backend",
            "openai", "--api-base", server.base_url, "--limit", "3"]
    assert step4.main(args) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:2]) + lines[2][:15])  # a run cut short mid-write
    assert step4.main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["predicted_now"] == 1 and run["resumed"] == 2
    assert [p["id"] for p in _preds(out / "predictions.jsonl")] == [r["id"] for r in recs[:3]]
    with pytest.raises(SystemExit, match="other settings"):  # the in-process engine does not mix into this folder
        step4.main(["--model", str(smollm2_dir), "--input", str(inp), "--out", str(out), "--no-progress"])


def test_loglik_needs_prompt_logprobs(server, real_records, smollm2_dir, tmp_path):
    inp, _ = real_records
    with pytest.raises(SystemExit, match="log-probabilities"):
        step4.main(["--model", str(smollm2_dir), "--input", str(inp), "--out", str(tmp_path / "ll"), "--limit", "1",
                    "--no-progress", "--backend", "openai", "--api-base", server.base_url, "--mode", "loglik"])


def test_openai_backend_needs_a_server_url(smollm2_dir, tmp_path):
    from src.common.errors import UsageError

    with pytest.raises(UsageError, match="--api-base"):
        step4.main(["--model", str(smollm2_dir), "--backend", "openai", "--out", str(tmp_path)])


def test_serve_refuses_a_moe_checkpoint_it_cannot_export(tiny_model_dir, tmp_path):
    import subprocess

    from src.models import moe
    from src.models.loading import load_model, load_tokenizer

    ckpt = moe.save_moe(moe.upcycle(load_model(tiny_model_dir), num_experts=2, top_k=1, moe_layers=1),
                        load_tokenizer(tiny_model_dir), tmp_path / "moe")
    r = subprocess.run([sys.executable, "-m", "src.serving.launch", "--model", str(ckpt), "--port",
                        str(free_port())], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "only exports Qwen2-based" in r.stderr and "4.eval.sh --model" in r.stderr


def test_cli_chat_through_the_server(server, smollm2_dir):
    import os
    import subprocess


    root = ROOT_SCRIPT.parents[1]
    r = subprocess.run([sys.executable, "-m", "src.evaluate.cli_demo", "--api-base", server.base_url, "--model",
                        str(smollm2_dir), "--greedy", "--max-new-tokens", "8"],
                       input="What causes anaemia?\nclear\nquit\n", capture_output=True, text=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "NOT medical advice" in r.stdout and "[history cleared]" in r.stdout
    reply = r.stdout.split("Assistant: ", 1)[1].split("\n", 1)[0]
    assert reply.strip()  # streamed from /v1/chat/completions


def test_mmedbench_answers_through_the_server_are_whole(server, smollm2_dir, tmp_path):
    """MMedBench records are generated to the end (rationale, then answer): no newline stop on the server either."""
    from src.prepare import bench_prompts
    from tests.conftest import SAMPLE

    prep = tmp_path / "prep"
    assert bench_prompts.main(["--bench", str(SAMPLE / "mmedbench" / "Test" / "English.jsonl"), "--model",
                          str(smollm2_dir), "--out", str(prep)]) == 0
    ours, api = tmp_path / "inprocess", tmp_path / "api"
    base = ["--model", str(smollm2_dir), "--input", str(prep / "test.jsonl"), "--limit", "2", "--max-new-tokens",
            "48", "--no-progress", "--threads", "1"]
    assert step4.main(base + ["--out", str(ours)]) == 0
    assert step4.main(base + ["--out", str(api), "--backend", "openai", "--api-base", server.base_url]) == 0
    a, b = _preds(ours / "predictions.jsonl"), _preds(api / "predictions.jsonl")
    assert [p["raw"] for p in b] == [p["raw"] for p in a]  # greedy, the same text, past the first line
    assert any("\n" in p["raw"].strip("\n") for p in b) and all(p["stop"] != "line" for p in b)
    assert [(p["letter"], p["reference_answer"]) for p in b] == [(p["letter"], p["reference_answer"]) for p in a]
