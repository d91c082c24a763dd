"""Issue 7: the chat demo through a pipe, proxy-tuning arithmetic, checkpoint averaging."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from src.common.chat_formats import from_chat_template
from src.evaluate.chat_core import fit_history
from src.generation.stream import stream_tokens
from src.generation.types import GREEDY
from src.models.proxy_tuning import ProxyTuned, check_same_tokenizer
from tests.conftest import ROOT, make_tiny_llama
from util.average_checkpoints import average, save_average


@pytest.fixture(scope="module")
def trio(tmp_path_factory, smollm2_tokenizer):
    """Three tiny models sharing SmolLM2's tokenizer, with different random weights."""
    d = tmp_path_factory.mktemp("trio")
    return [make_tiny_llama(smollm2_tokenizer, d / name, seed=seed) for name, seed in
            (("base", 1), ("tuned", 2), ("raw", 3))]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_proxy_logits_are_base_plus_offset(trio, smollm2_tokenizer):
    base, tuned, raw = (_load(p) for p in trio)
    proxy = ProxyTuned(base, tuned, raw)
    ids = smollm2_tokenizer("Aspirin inhibits cyclooxygenase", return_tensors="pt").input_ids
    with torch.no_grad():
        out = proxy(input_ids=ids)
        expect = base(ids).logits + tuned(ids).logits - raw(ids).logits
        assert torch.allclose(out.logits, expect, atol=1e-5)
        # one cached step equals the uncached logits of the longer sequence
        nxt = torch.tensor([[42]])
        step = proxy(input_ids=nxt, past_key_values=out.past_key_values)
        full = torch.cat([ids, nxt], 1)
        expect2 = base(full).logits + tuned(full).logits - raw(full).logits
        assert torch.allclose(step.logits[:, -1], expect2[:, -1], atol=1e-4)


def test_greedy_decoding_follows_the_proxy_logits(trio, smollm2_tokenizer):
    base, tuned, raw = (_load(p) for p in trio)
    proxy = ProxyTuned(base, tuned, raw)
    ids = smollm2_tokenizer("The liver", return_tensors="pt").input_ids
    got = list(stream_tokens(proxy, ids, max_new_tokens=6, stop_ids=set(), sampling=GREEDY))
    seq = ids
    with torch.no_grad():
        for token in got:
            logits = base(seq).logits + tuned(seq).logits - raw(seq).logits
            assert token == int(logits[0, -1].argmax())
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
    plain = list(stream_tokens(base, ids, max_new_tokens=6, stop_ids=set(), sampling=GREEDY))
    assert got != plain  # the offset changes the decoding


def test_tokenizer_mismatch_is_an_error(smollm2_tokenizer):
    import copy

    other = copy.deepcopy(smollm2_tokenizer)
    other.add_tokens(["<my_new_token>"])
    with pytest.raises(ValueError, match="identical tokenizers.*'tuned'"):
        check_same_tokenizer({"base": smollm2_tokenizer, "tuned": other, "raw": smollm2_tokenizer})


def test_history_is_trimmed_to_the_budget(smollm2_tokenizer):
    fmt = from_chat_template(smollm2_tokenizer)
    history = [(f"question number {i} " * 10, f"answer {i} " * 10) for i in range(6)]
    full, dropped = fit_history(fmt, smollm2_tokenizer, history, "new question", 10_000)
    assert dropped == 0 and "question number 0" in full
    budget = len(smollm2_tokenizer(full, add_special_tokens=False).input_ids) // 2
    prompt, dropped = fit_history(fmt, smollm2_tokenizer, history, "new question", budget)
    assert dropped > 0 and len(smollm2_tokenizer(prompt, add_special_tokens=False).input_ids) <= budget
    assert "question number 5" in prompt and "question number 0" not in prompt  # oldest dropped first
    with pytest.raises(ValueError, match="longer than the context budget"):
        fit_history(fmt, smollm2_tokenizer, [], "word " * 500, 50)


def _chat(model_dir, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "src.evaluate.cli_demo", "--model", str(model_dir),
                           "--max-new-tokens", "6", *extra], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


def test_chat_through_a_pipe(trio):
    r = _chat(trio[0], "What causes anaemia?\nclear\n\nAnd scurvy?\nquit\nnever read\n", "--greedy")
    assert r.returncode == 0, r.stderr
    assert "NOT medical advice" in r.stdout
    assert r.stdout.count("Assistant: ") == 2  # one reply per message; the line after quit is not read
    assert "[history cleared]" in r.stdout
    long = "Describe the symptoms of diabetes in detail please. " * 8
    r = _chat(trio[0], f"{long}\n{long}\n{long}\n", "--max-context", "200")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant: ") == 3 and "[dropped the" in r.stdout


def test_average_of_two_checkpoints(tmp_path, trio):
    out = save_average([trio[0], trio[1]], tmp_path / "avg", weights=[1, 3])
    a, b, m = (_load(p).state_dict() for p in (trio[0], trio[1], out))
    for name in a:
        assert torch.allclose(m[name], 0.25 * a[name] + 0.75 * b[name], atol=1e-6), name
    plain = average([trio[0], trio[1]])
    some = next(iter(plain))
    assert torch.allclose(plain[some].float(), (a[some] + b[some]) / 2, atol=1e-6) if some in a else True


def test_average_refuses_different_shapes(tmp_path, trio, smollm2_tokenizer):
    wider = make_tiny_llama(smollm2_tokenizer, tmp_path / "wide", hidden=96)
    with pytest.raises(ValueError, match="shape"):
        average([trio[0], wider])
    deeper = make_tiny_llama(smollm2_tokenizer, tmp_path / "deep", layers=3)
    with pytest.raises(ValueError, match="different tensors"):
        average([trio[0], deeper])


def test_step4_runs_with_the_proxy_wrapper(tmp_path, trio):
    import json

    from src.evaluate import eval as step4
    from src.prepare import bench_prompts
    from tests.conftest import SAMPLE

    data = tmp_path / "data"
    assert bench_prompts.main(["--bench", str(SAMPLE / "bench_test.json"), "--dev", str(SAMPLE / "bench_dev.json"),
                          "--model", str(trio[0]), "--out", str(data), "--shots", "1"]) == 0
    common = ["--input", str(data / "test.jsonl"), "--limit", "3", "--max-new-tokens", "6", "--no-progress"]
    base, tuned, raw = (str(p) for p in trio)
    assert step4.main(["--model", base, "--proxy-tuned", tuned, "--proxy-raw", raw, "--out", str(tmp_path / "p"),
                       *common]) == 0
    assert step4.main(["--model", base, "--out", str(tmp_path / "b"), *common]) == 0
    read = lambda d: [json.loads(x) for x in (tmp_path / d / "predictions.jsonl").open()]  # noqa: E731
    proxy, plain = read("p"), read("b")
    assert len(proxy) == len(plain) == 3
    assert [p["raw"] for p in proxy] != [p["raw"] for p in plain]  # the offset changed what was generated
    run = json.loads((tmp_path / "p" / "run.json").read_text())
    assert run["settings"]["proxy_tuned"] == tuned and "accuracy" in json.dumps(
        json.loads((tmp_path / "p" / "score.json").read_text()))
