"""Step 2 end to end: outputs, row invariants, report, determinism, errors, and the real training slice."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from src.common import cli
from src.common.chat_formats import resolve_format
from src.common.languages import family_id, language_id, parse_train_source
from src.prepare import train_data

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "sample" / "train.json"
COLUMNS = ["input_ids", "labels", "position_ids", "language_ids"]


def run(*args):
    return cli.run(train_data.main, [str(a) for a in args])


def load_rows(out):
    import datasets

    return datasets.load_from_disk(str(out / "train"))


def documents(ds):
    """Split every row into its documents at position 0: (row, ids, labels, language ids) per document."""
    for r, row in enumerate(ds):
        pos = np.array(row["position_ids"])
        starts = np.flatnonzero(pos == 0).tolist() + [len(pos)]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:]):
            assert pos[a:b].tolist() == list(range(b - a))
            yield r, row["input_ids"][a:b], row["labels"][a:b], row["language_ids"][a:b]


def label_runs(labels):
    """Contiguous runs of targets (labels != -100) as (start, end) pairs."""
    m = np.concatenate([[False], np.array(labels) != -100, [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return list(zip(edges[::2], edges[1::2]))


def sample_records():
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, smollm2_dir):
    out = tmp_path_factory.mktemp("step2") / "sample"
    assert run("--data", SAMPLE, "--model", smollm2_dir, "--out", out, "--max-seq-len", 1024, "--num-proc", 1) == 0
    return out


def test_sample_outputs_rows_and_report(sample_run, smollm2_tokenizer):
    out = sample_run
    assert {p.name for p in out.iterdir()} == {"train", "mixture.json", "curriculum.png", "train_rejects.jsonl"}
    ds = load_rows(out)
    mix = json.loads((out / "mixture.json").read_text(encoding="utf-8"))
    assert ds.column_names == COLUMNS and mix["columns"] == COLUMNS
    assert len(ds) == mix["totals"]["rows"]
    assert all(len(r["input_ids"]) <= 1024 for r in ds)

    records = sample_records()
    fmt = resolve_format(smollm2_tokenizer)
    # every entry is one whole document; SFT records twice, pretrain-QA once
    expected = Counter()
    for r in records:
        _, lang, qa = parse_train_source(r["source"])
        text = fmt.render([t["value"] for t in r["conversations"]])
        expected[text, family_id(lang)] += 1 if qa else 2
    got, n_targets = Counter(), 0
    for _, ids, labels, langs in documents(ds):
        text = smollm2_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert len(set(langs)) == 1
        got[text, langs[0]] += 1
        # targets: exactly each answer followed by the end string; nothing else
        answers = [smollm2_tokenizer.decode(ids[a:b], skip_special_tokens=False) for a, b in label_runs(labels)]
        assert all(a.endswith(fmt.end) for a in answers) and answers
        assert all(labels[i] in (-100, ids[i]) for i in range(len(ids)))
        n_targets += sum(1 for x in labels if x != -100)
    assert got == expected
    assert n_targets == mix["totals"]["loss_tokens"] and sum(got.values()) == mix["totals"]["entries"]

    # report: per-language record counts match the input; entries = records x epochs
    by_lang = Counter(parse_train_source(r["source"])[1] for r in records)
    assert {k: v["records"] for k, v in mix["by_language"].items()} == dict(by_lang)
    for src, s in mix["by_source"].items():
        assert s["entries"] == s["records"] * s["epochs"]
        assert (s["priority"], s["epochs"]) == ((16, 1) if src.endswith("_qa") else (2, 2))
    assert mix["totals"]["tokens"] == sum(len(r["input_ids"]) for r in ds)
    assert mix["by_class"]["pretrain_qa"]["mean_position"] < mix["by_class"]["sft"]["mean_position"]
    assert mix["pad_language_id"] == -1 and mix["language_ids"] == "family" and mix["seed"] == 42
    assert 0 < mix["totals"]["packing_efficiency"] <= 1
    assert (out / "curriculum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curr = mix["curriculum"]
    assert curr["qa_token_share"][0] > curr["qa_token_share"][-1]  # the soft curriculum: QA early, SFT late


def test_deterministic_whatever_num_proc(sample_run, smollm2_dir, tmp_path):
    out = tmp_path / "again"
    assert run("--data", SAMPLE, "--model", smollm2_dir, "--out", out, "--max-seq-len", 1024, "--num-proc", 2) == 0
    files = sorted(p.relative_to(sample_run) for p in sample_run.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for f in files:
        assert (sample_run / f).read_bytes() == (out / f).read_bytes(), f
    other = tmp_path / "seed"
    assert run("--data", SAMPLE, "--model", smollm2_dir, "--out", other, "--max-seq-len", 1024, "--seed", 7) == 0
    a, b = (json.loads((d / "mixture.json").read_text())["rows_sha256"] for d in (sample_run, other))
    assert a != b


def write(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def rec(q, a, source):
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], "source": source}


def test_bad_records_raise_or_are_rejected(tmp_path, smollm2_dir, capsys):
    data = write(tmp_path / "t.json", [rec("q", "a", "general_en"), rec("q", "", "general_en"),
                                       {"conversations": ["q"], "source": "general_fr"}, rec("q", "a", "general_de")])
    assert run("--data", data, "--model", smollm2_dir, "--out", tmp_path / "o1") == 2  # a user error: exit code 2
    err = capsys.readouterr().err
    assert str(data) in err and "record 1" in err and "conversations[1].value" in err and "empty turn" in err
    assert run("--data", data, "--model", smollm2_dir, "--out", tmp_path / "o2", "--on-error", "skip") == 0
    rejects = [json.loads(x) for x in (tmp_path / "o2" / "train_rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["field"]) for r in rejects] == [(1, "conversations[1].value"), (2, "conversations")]
    mix = json.loads((tmp_path / "o2" / "mixture.json").read_text())
    assert mix["totals"]["records_read"] == 4 and mix["totals"]["records"] == 2 and mix["rejects"]["count"] == 2


def test_unmatched_sources_fail_listing_them(tmp_path, smollm2_dir, capsys):
    data = write(tmp_path / "t.json", [rec("q", "a", "medicalBook_en"), rec("q", "a", "textbook_fr"),
                                       rec("q", "a", "general_en")])
    assert run("--data", data, "--model", smollm2_dir, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "medicalBook_en" in err and "textbook_fr" in err and "match no priority rule" in err
    prio = tmp_path / "p.yaml"
    prio.write_text("rules:\n  - {pattern: '*', priority: 1, epochs: 3}\ninherit_defaults: false\n")
    assert run("--data", data, "--model", smollm2_dir, "--out", tmp_path / "o", "--priorities", prio) == 0
    mix = json.loads((tmp_path / "o" / "mixture.json").read_text())
    assert mix["totals"]["entries"] == 9 and all(s["rule"] == "*" for s in mix["by_source"].values())


def test_truncation_multi_turn_and_language_ids(tmp_path, smollm2_dir, smollm2_tokenizer):
    long_answer = "word " * 300
    data = write(tmp_path / "t.json", [
        rec("short", "fine", "general_sw"),
        {"conversations": ["first q", "first a", "second q", long_answer], "source": "medicalWiki_hi_qa"},
        rec("q", "a", "general_vi"),
    ])
    out = tmp_path / "o"
    assert run("--data", data, "--model", smollm2_dir, "--out", out, "--max-seq-len", 128,
               "--language-ids", "language") == 0
    mix = json.loads((out / "mixture.json").read_text())
    t = mix["totals"]
    assert t["truncated_records"] == 1 and t["truncated_entries"] == 1 and t["truncated_tokens_dropped"] > 0
    assert mix["by_source"]["medicalWiki_hi_qa"]["truncated_entries"] == 1
    assert mix["truncated_examples"][0]["index"] == "1" and mix["truncated_examples"][0]["kept"] == 128
    assert mix["num_language_ids"] == 50
    ds = load_rows(out)
    assert all(len(r["input_ids"]) <= 128 for r in ds)
    seen = set()
    for _, ids, labels, langs in documents(ds):
        seen.add(langs[0])
        text = smollm2_tokenizer.decode(ids, skip_special_tokens=False)
        if "first q" in text:  # the truncated two-turn document: first answer whole, second cut, no end token
            assert len(ids) == 128 and langs[0] == language_id("hi")
            runs = label_runs(labels)
            assert len(runs) == 2 and runs[1][1] == 128
            assert smollm2_tokenizer.decode(ids[runs[0][0]:runs[0][1]], skip_special_tokens=False) == \
                "first a<|im_end|>"
    assert seen == {language_id("sw"), language_id("hi"), language_id("vi")}


def test_release_format_for_a_qwen2_model(tmp_path, smollm2_tokenizer):
    """A model whose config says qwen2 gets the release layout; the <|endoftext|> after each answer is a target."""
    from transformers import Qwen2Config

    model = tmp_path / "qwen2ish"
    smollm2_tokenizer.save_pretrained(model)
    Qwen2Config(vocab_size=len(smollm2_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(model)
    data = write(tmp_path / "t.json", [rec("Which organ?", "The liver.", "medicalExam_en")])
    out = tmp_path / "o"
    assert run("--data", data, "--model", model, "--out", out) == 0
    mix = json.loads((out / "mixture.json").read_text())
    assert mix["chat_format"]["name"] == "qwen2" and mix["max_seq_len"] == 4096
    (_, ids, labels, _), _ = list(documents(load_rows(out)))  # one record, two epochs
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == \
        "User:Which organ?\nAssistant:The liver.<|endoftext|>"
    (a, b), = label_runs(labels)
    assert smollm2_tokenizer.decode(ids[a:b], skip_special_tokens=False) == "The liver.<|endoftext|>"


def test_real_training_slice(shared_data, smollm2_dir, tmp_path):
    path = shared_data / "dataset_train.json"
    out = tmp_path / "real"
    assert run("--data", path, "--model", smollm2_dir, "--out", out, "--num-proc", 2) == 0
    mix = json.loads((out / "mixture.json").read_text())
    records = json.loads(path.read_text(encoding="utf-8"))
    t = mix["totals"]
    assert t["records_read"] == len(records) == t["records"] + t["rejected"]  # every record accounted for
    by_lang = Counter(parse_train_source(r["source"])[1] for r in records)
    assert {k: v["records"] for k, v in mix["by_language"].items()} == dict(by_lang)
    by_src = Counter(r["source"] for r in records)
    assert {k: v["records"] for k, v in mix["by_source"].items()} == dict(by_src)
    qa = sum(n for s, n in by_src.items() if s.endswith("_qa"))
    assert t["entries"] == qa + 2 * (len(records) - qa)
    ds = load_rows(out)
    assert len(ds) == t["rows"] and ds.column_names == COLUMNS
    assert max(len(x) for x in ds["input_ids"]) <= 4096
    assert mix["by_class"]["pretrain_qa"]["mean_position"] < mix["by_class"]["sft"]["mean_position"]


def test_packed_documents_do_not_attend_to_each_other(sample_run, tiny_model_dir):
    """The stored position_ids are all a model needs: with no attention mask, transformers masks documents of a row
    from each other, so a document's logits in the row equal its logits alone (the trainer's contract)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    row = load_rows(sample_run)[0]
    ids, pos = torch.tensor([row["input_ids"]]), torch.tensor([row["position_ids"]])
    starts = (pos[0] == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2
    a, b = starts[1], (starts[2] if len(starts) > 2 else ids.shape[1])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False,
                       labels=torch.tensor([row["labels"]])).logits[0, a:b]
        alone = model(input_ids=ids[:, a:b], use_cache=False).logits[0]
    assert torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()
