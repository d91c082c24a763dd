from types import SimpleNamespace

import pytest

from src.common.chat_formats import RELEASE_FORMATS, from_chat_template, resolve_format


def test_release_qwen2_layout():
    fmt = RELEASE_FORMATS["qwen2"]
    assert fmt.render(["q1", "a1", "q2", "a2"]) == "User:q1\nAssistant:a1<|endoftext|>\nUser:q2\nAssistant:a2<|endoftext|>"
    assert fmt.render(["q"], open_last=True) == "User:q\nAssistant:"
    with pytest.raises(ValueError):
        fmt.render(["q"])


def test_phi3_tag_is_spelled_correctly():
    assert "<|assistant|>" in RELEASE_FORMATS["phi3"].assistant


def test_template_derivation_matches_apply_chat_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    fmt = from_chat_template(tok)
    turns = ["What is anaemia?", "A low haemoglobin.", "And its causes?", "Iron deficiency, blood loss."]
    msgs = [{"role": r, "content": t} for r, t in zip(["user", "assistant"] * 2, turns)]
    assert fmt.render(turns) + fmt.sep == tok.apply_chat_template(msgs, tokenize=False)
    assert fmt.render(turns[:1], open_last=True) == tok.apply_chat_template(msgs[:1], tokenize=False,
                                                                             add_generation_prompt=True)
    assert fmt.end == "<|im_end|>" and fmt.stop_token(tok) == tok.convert_tokens_to_ids("<|im_end|>")


def test_resolution_order(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert resolve_format(tok, SimpleNamespace(model_type="qwen2")).name == "qwen2"
    assert resolve_format(tok, SimpleNamespace(model_type="gemma2")).name == "gemma2"
    assert resolve_format(tok, SimpleNamespace(model_type="phi3")).name == "phi3"
    assert resolve_format(tok, SimpleNamespace(model_type="llama")).name == "template"  # SmolLM2
    assert resolve_format(tok, SimpleNamespace(model_type="qwen2"), "template").name == "template"
    release = resolve_format(tok, None, "release")
    assert release.user == "User:" and release.end == tok.eos_token
    with pytest.raises(ValueError, match="unknown chat format"):
        resolve_format(tok, None, "chatml")
