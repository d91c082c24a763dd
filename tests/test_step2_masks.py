"""Step 2 tokenization and records: exact loss spans, multi-turn, truncation, validation, streamed parsing."""
import json
import random

import numpy as np
import pyarrow as pa
import pytest

from src.common.chat_formats import RELEASE_FORMATS, ChatFormat, release_layout, resolve_format
from src.common.errors import DataError
from src.common.io import JsonStream
from src.prepare.records import iter_file, parse_record, read_records
from src.prepare.tokenize_chat import ChatEncoder, render_with_spans

TRICKY = [
    ["What is it?", "The answer is 42."],
    ["q", "\nan answer that starts with a newline"],
    ["Hi:", "::colons merge with the role string"],
    ["问题是什么？", "答案是肝脏。", "and then?", " leading space, trailing space "],
    ["emoji", "😀 ok", "Ελληνικά", "Русский текст", "हिन्दी", "العربية"],
    ["x", "a<|im_end|>b"],  # a special-token string inside an answer stays inside its span
]


def _formats(tokenizer):
    return [RELEASE_FORMATS["qwen2"], resolve_format(tokenizer), release_layout(tokenizer), RELEASE_FORMATS["phi3"],
            ChatFormat("tight", "", "U:", "A:", tokenizer.eos_token, "")]


def _decoded_spans(tokenizer, ids, spans):
    return [tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            for a, b in spans]


def test_render_with_spans_is_the_formats_render(smollm2_tokenizer):
    for fmt in _formats(smollm2_tokenizer):
        for turns in TRICKY:
            text, spans = render_with_spans(fmt, turns)
            assert text == fmt.render(turns)
            assert [text[a:b] for a, b in spans] == [turns[i] + fmt.end for i in range(1, len(turns), 2)]


def test_decoded_label_spans_are_exactly_answer_plus_end(smollm2_tokenizer):
    splits = 0
    for fmt in _formats(smollm2_tokenizer):
        enc = ChatEncoder(smollm2_tokenizer, fmt, 10_000)
        for turns, (ids, spans, n, split) in zip(TRICKY, enc.encode(TRICKY)):
            assert n == len(ids) and len(spans) == len(turns) // 2
            assert _decoded_spans(smollm2_tokenizer, ids, spans) == [turns[i] + fmt.end
                                                                     for i in range(1, len(turns), 2)], (fmt, turns)
            # everything outside the spans decodes to the prompt parts, in order
            text, _ = render_with_spans(fmt, turns)
            assert smollm2_tokenizer.decode(ids.tolist(), skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False) == text
            splits += split
    assert splits > 0  # some of these texts make BPE merge across a role boundary: the split path ran


def test_end_token_is_a_target_and_role_strings_are_not(smollm2_tokenizer):
    fmt = resolve_format(smollm2_tokenizer)  # ChatML: the end string is the <|im_end|> special token
    (ids, spans, _, _), = ChatEncoder(smollm2_tokenizer, fmt, 4096).encode([["q1", "a1", "q2", "a2"]])
    stop = fmt.stop_token(smollm2_tokenizer)
    for _, b in spans:
        assert ids[b - 1] == stop  # the last target of every answer is the end token
    target = np.zeros(len(ids), bool)
    for a, b in spans:
        target[a:b] = True
    prompt_part = smollm2_tokenizer.decode(ids[~target].tolist(), skip_special_tokens=False)
    assert "a1" not in prompt_part and "q1" in prompt_part and "assistant" in prompt_part


def test_truncation_clips_spans_and_counts(smollm2_tokenizer):
    fmt = RELEASE_FORMATS["qwen2"]
    turns = ["short question", "word " * 50, "second question", "second answer"]
    enc = ChatEncoder(smollm2_tokenizer, fmt, 30)
    table = pa.table({"file": pa.array([0], pa.int32()), "index": ["0"], "source_id": pa.array([0], pa.int32()),
                      "turns": pa.array([turns], pa.list_(pa.string()))})
    out = enc(table).to_pylist()[0]
    assert len(out["input_ids"]) == 30 and out["full_length"] > 30
    spans = np.array(out["label_spans"]).reshape(-1, 2)
    assert len(spans) == 1 and spans[0, 1] == 30  # the first answer is cut at max_len; the second is gone
    full = ChatEncoder(smollm2_tokenizer, fmt, 10_000).encode([turns])[0]
    assert out["input_ids"] == full[0][:30].tolist() and spans[0, 0] == full[1][0, 0]


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False
    with pytest.raises(ValueError, match="fast"):
        ChatEncoder(Slow(), RELEASE_FORMATS["qwen2"], 10)


# ---------- records ----------

def rec(q="q", a="a", source="general_en", **extra):
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "source": source, **extra}


@pytest.mark.parametrize("bad,field,msg", [
    ({"conversations": [{"from": "human", "value": "q"}], "source": "general_en"}, "conversations", "odd number"),
    (rec(a="   "), "conversations[1].value", "empty turn"),
    (rec(source="generalen"), "source", "is not of the form"),
    (rec(source="general_xx"), "source", "unknown language code 'xx'"),
    ({"source": "general_en"}, "conversations", "missing"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}], "source": "general_en"},
     "conversations[0].from", "role 'gpt' where a user turn is expected"),
    ({"conversations": [], "source": "general_en"}, "conversations", "non-empty list"),
    ({"conversations": ["q", 3], "source": "general_en"}, "conversations[1]", "must be a string"),
    ("not a record", None, "expected an object"),
])
def test_record_validation_names_file_index_field(tmp_path, bad, field, msg):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([rec(), bad]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_records([path], tmp_path / "r.arrow")
    assert e.value.index == 1 and e.value.field == field and msg in str(e.value)
    assert str(path) in str(e.value) and "record 1" in str(e.value)
    res = read_records([path], tmp_path / "r.arrow", skip_errors=True)
    assert res.records == 1 and res.read_per_file == [2]
    assert res.rejects == [{"file": str(path), "index": 1, "field": field, "reason": e.value.reason}]


def test_three_input_formats_read_the_same(tmp_path):
    records = [rec("q1", "a1", "general_en"), rec("q2", "a2", "medicalWiki_de_qa"),
               {"conversations": ["q3", "a3", "q4", "a4"], "source": "general_en"}]
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps(records), encoding="utf-8")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    dct = tmp_path / "dict.json"
    dct.write_text(json.dumps({"general_en": [["q1", "a1"], ["q3", "a3", "q4", "a4"]],
                               "medicalWiki_de_qa": [["q2", "a2"]]}), encoding="utf-8")
    got = {}
    for path in (lst, jsonl, dct):
        res = read_records([path], tmp_path / f"{path.stem}.arrow")
        with pa.ipc.open_stream(str(tmp_path / f"{path.stem}.arrow")) as r:
            t = r.read_all()
        got[path.suffix + path.stem] = sorted((res.sources[s], tuple(turns)) for s, turns in
                                              zip(t.column("source_id").to_pylist(), t.column("turns").to_pylist()))
        assert res.records == 3
    assert len({tuple(v) for v in got.values()}) == 1
    assert [i for i, _, _ in iter_file(dct)] == ["general_en[0]", "general_en[1]", "medicalWiki_de_qa[0]"]


def test_dict_format_errors_name_the_key(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"general_en": [["q", "a"], ["q", "a", "q"]]}), encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_records([path], tmp_path / "r.arrow")
    assert e.value.index == "general_en[1]" and e.value.field == "turns" and "odd number" in str(e.value)


def test_streamed_parser_equals_json_load(tmp_path):
    rnd = random.Random(0)
    alphabet = "ab \n\"\\{}[],:é中😀\t"
    items = [{"conversations": ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 3000))) for _ in range(2)],
              "source": "general_en", "n": rnd.random(), "k": [1, 2, {"x": None}]} for _ in range(200)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(items, indent=rnd.choice([None, 2]), ensure_ascii=False), encoding="utf-8")
    for chunk in (7, 100, 1 << 20):  # tiny chunks force elements across buffer boundaries
        stream = JsonStream(path, chunk_chars=chunk)
        assert [v for _, v in stream.elements()] == items
        stream.close()
    nums = tmp_path / "nums.json"
    nums.write_text("[123456789, 2.5e10 , \n-7]", encoding="utf-8")
    stream = JsonStream(nums, chunk_chars=3)  # a number cut by the buffer must not parse short
    assert [v for _, v in stream.elements()] == [123456789, 2.5e10, -7]


@pytest.mark.parametrize("text,msg", [('[{"a": 1},', "invalid JSON"), ('[{"a": 1}] x', "trailing content"),
                                      ('"just a string"', "expected one of")])
def test_broken_json_is_reported(tmp_path, text, msg):
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=msg) as e:
        list(iter_file(path))
    assert "broken.json" in str(e.value)


def test_parse_record_accepts_role_content_and_plain_strings():
    assert parse_record({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                         "source": "general_sw"}, "f", 0) == ("general_sw", ["q", "a"])
    assert parse_record(["q", "a"], "f", "general_en[0]", source="general_en") == ("general_en", ["q", "a"])


def test_bos_prefix_appears_once_and_is_no_target(smollm2_tokenizer):
    """Formats with a BOS prefix (Gemma, Llama-3) start every document with exactly one BOS, as step 1's prompts
    do: the text carries it and encoding adds no second one (the original trained without it: docs/reference.md, "Priority sampling")."""
    tok = smollm2_tokenizer
    fmt = ChatFormat("bos", tok.bos_token, "User:", "\nAssistant:", tok.eos_token, "\n")
    (ids, spans, _, _), = ChatEncoder(tok, fmt, 4096).encode([["q", "a", "q2", "a2"]])
    assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1
    assert spans[0][0] > 0
