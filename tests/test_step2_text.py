"""Step 2 on raw pretraining text (*_text sources): loss on every token, BOS/EOS policy, the three text formats,
mixing with QA and SFT under a priority table, bad input, long documents split into pieces, and step 3 on the rows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from src.common import cli
from src.common.chat_formats import adds_bos, resolve_format
from src.prepare import train_data
from src.prepare.tokenize_chat import ChatEncoder, text_framing

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "assets" / "sample" / "train.json"
IGNORE = -100

EN_DOCS = ["Aspirin irreversibly inhibits cyclooxygenase, lowering thromboxane A2.",
           "Insulin is secreted by pancreatic beta cells.\n\nIt lowers blood glucose.",  # a blank line inside: JSON only
           "Hypertension: systolic >= 140 mmHg or diastolic >= 90 mmHg (adults)."]
FR_DOCS = ["Le cœur pompe le sang dans tout le corps.\nIl possède quatre cavités.", "Le foie filtre le sang."]
ZH_DOCS = ["糖尿病是一种代谢性疾病。", "高血压会增加中风的风险。"]


def run(*args):
    return cli.run(train_data.main, [str(a) for a in args])


def documents(out):
    """Every packed document of out/train: (input ids, labels), split at position 0."""
    import datasets

    for row in datasets.load_from_disk(str(out / "train")):
        pos = np.array(row["position_ids"])
        starts = np.flatnonzero(pos == 0).tolist() + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            yield row["input_ids"][a:b], row["labels"][a:b]


def mixture(out) -> dict:
    return json.loads((out / "mixture.json").read_text(encoding="utf-8"))


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def text_docs(out, tokenizer) -> list[str]:
    """The decoded documents whose every token is a target (the raw text ones), sorted."""
    found = []
    for ids, labels in documents(out):
        if labels == ids:
            found.append(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return sorted(found)


def test_loss_on_every_text_token_and_eos_no_bos(tmp_path, smollm2_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert not adds_bos(tok) and text_framing(tok) == (None, tok.eos_token_id)  # SmolLM2: EOS only
    text = write_json(tmp_path / "medicalBook_en_text.json", EN_DOCS)
    out = tmp_path / "o"
    assert run("--text", text, "--data", SAMPLE, "--model", smollm2_dir, "--out", out, "--max-seq-len", 1024,
               "--num-proc", 1) == 0
    eos = tok.eos_token
    want = sorted(d + eos for d in EN_DOCS)
    n_text = 0
    for ids, labels in documents(out):
        decoded = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded in want:  # a text document: exactly [text tokens] + EOS, every token a target
            n_text += 1
            assert ids == tok(decoded[:-len(eos)], add_special_tokens=False).input_ids + [tok.eos_token_id]
            assert labels == ids
        else:  # a conversation: its chat-format masking is untouched (prefix and user turns without loss)
            assert labels[0] == IGNORE and labels != ids
    assert n_text == len(EN_DOCS)
    mix = mixture(out)
    src = mix["by_source"]["medicalBook_en_text"]
    assert src["kind"] == "text" and not src["pretrain_qa"] and src["rule"] == "*_text"
    assert (src["priority"], src["epochs"]) == (16, 1)
    assert src["records"] == src["pieces"] == src["entries"] == len(EN_DOCS)
    assert src["loss_tokens"] == src["tokens"]
    assert mix["by_class"]["text"]["records"] == len(EN_DOCS)
    assert {i["kind"] for i in mix["inputs"]} == {"records", "text"}
    assert mix["totals"]["split_records"] == 0 and mix["totals"]["truncated_records"] == 0


def test_bos_is_kept_but_not_a_target_where_the_tokenizer_adds_one(smollm2_tokenizer):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer.name_or_path)
    tok.backend_tokenizer.post_processor = TemplateProcessing(  # a Llama-3/Gemma-like tokenizer: adds its BOS
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert adds_bos(tok) and text_framing(tok) == (tok.bos_token_id, tok.eos_token_id)
    enc = ChatEncoder(tok, resolve_format(tok), max_len=1024)
    (ids, spans), = enc.encode_text(["Aspirin inhibits cyclooxygenase."])[0]
    body = tok("Aspirin inhibits cyclooxygenase.", add_special_tokens=False).input_ids
    assert ids.tolist() == [tok.bos_token_id, *body, tok.eos_token_id]  # one BOS, not two
    assert spans.tolist() == [[1, len(ids)]]  # every token but the BOS


def test_txt_jsonl_and_dict_inputs_parse(tmp_path, smollm2_dir, smollm2_tokenizer):
    txt = tmp_path / "medicalWiki_fr_text.txt"  # recognised from --data by its name
    txt.write_text("\n\n" + FR_DOCS[0] + "\n\n \n\t\n" + FR_DOCS[1] + "\n", encoding="utf-8")
    jsonl = tmp_path / "notes.jsonl"  # a name without a source: SOURCE= gives it; a line's own source wins
    jsonl.write_text(json.dumps(ZH_DOCS[0], ensure_ascii=False) + "\n\n"
                     + json.dumps({"text": ZH_DOCS[1], "source": "medicalWeb_zh_text"}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    merged = write_json(tmp_path / "merged.json", {"general_en": [["Hi?", "Hello."]], "medicalPaper_en_text": EN_DOCS})
    out = tmp_path / "o"
    assert run("--data", txt, "--data", merged, "--text", f"medicalBook_zh_text={jsonl}", "--model", smollm2_dir,
               "--out", out, "--num-proc", 1) == 0
    eos = smollm2_tokenizer.eos_token
    assert text_docs(out, smollm2_tokenizer) == sorted(d + eos for d in FR_DOCS + ZH_DOCS + EN_DOCS)
    mix = mixture(out)
    by = {k: v["records"] for k, v in mix["by_source"].items()}
    assert by == {"medicalWiki_fr_text": 2, "medicalBook_zh_text": 1, "medicalWeb_zh_text": 1,
                  "medicalPaper_en_text": 3, "general_en": 1}
    assert [(Path(i["file"]).name, i["kind"], i["records_read"]) for i in mix["inputs"]] == [
        ("medicalWiki_fr_text.txt", "text", 2), ("merged.json", "records", 4), ("notes.jsonl", "text", 2)]
    assert mix["by_language"]["zh"]["records"] == 2 and mix["by_language"]["fr"]["records"] == 2


def test_mixed_text_qa_sft_follow_the_priority_table(tmp_path, smollm2_dir):
    docs = [f"Document {i}: the kidney filters {i} litres of plasma a day." for i in range(60)]
    text = write_json(tmp_path / "medicalBook_en_text.json", docs)
    prio = tmp_path / "prio.yaml"
    prio.write_text("rules:\n"
                    "  - {pattern: '*_text', priority: 200, epochs: 2}\n"
                    "  - {pattern: '*_qa', priority: 20, epochs: 1}\n"
                    "  - {pattern: '*', priority: 1, epochs: 3}\n"
                    "inherit_defaults: false\n", encoding="utf-8")
    out = tmp_path / "o"
    assert run("--data", SAMPLE, "--text", text, "--priorities", prio, "--model", smollm2_dir, "--out", out,
               "--max-seq-len", 1024, "--num-proc", 1) == 0
    mix = mixture(out)
    for name, s in mix["by_source"].items():
        epochs = {"text": 2, "qa": 1, "sft": 3}[s["kind"]]
        assert s["epochs"] == epochs and s["entries"] == epochs * s["records"], name
    c = mix["by_class"]
    assert c["text"]["entries"] == 120
    assert c["text"]["mean_position"] < c["pretrain_qa"]["mean_position"] < c["sft"]["mean_position"]
    assert mix["totals"]["entries"] == sum(s["entries"] for s in mix["by_source"].values())
    share = mix["curriculum"]["qa_token_share"]  # the pretraining side (text + QA) leads, SFT trails
    assert share[0] > 0.9 and share[-1] < 0.1


def test_bad_text_input_names_file_record_and_field(tmp_path, smollm2_dir, capsys):
    bad = write_json(tmp_path / "medicalBook_en_text.json", ["fine", 17, "   ", {"txt": "typo"}, "also fine"])
    assert run("--text", bad, "--model", smollm2_dir, "--out", tmp_path / "o1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(bad) in err and "record 1" in err and "'text'" in err and "got int" in err
    assert run("--text", bad, "--model", smollm2_dir, "--out", tmp_path / "o2", "--on-error", "skip") == 0
    rejects = [json.loads(x) for x in (tmp_path / "o2" / "train_rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["field"]) for r in rejects] == [(1, "text"), (2, "text"), (3, "text")]
    assert [r["reason"].split(" (")[0] for r in rejects] == [
        "a document must be a string, got int", "empty document", "missing"]
    t = mixture(tmp_path / "o2")["totals"]
    assert (t["records_read"], t["records"], t["rejected"]) == (5, 2, 3)


@pytest.mark.parametrize("case, message", [
    ("txt without a source", "no source key for this text file"),
    ("flag source not _text", "the source of raw text must end in _text"),
    ("conversation under a _text key", "is a raw text source"),
    ("record file of strings", "raw text? pass the file with --text"),
])
def test_text_source_errors_are_one_clear_line(case, message, tmp_path, smollm2_dir, capsys):
    if case == "txt without a source":
        (tmp_path / "notes.txt").write_text("a document\n", encoding="utf-8")
        argv = ["--text", tmp_path / "notes.txt"]
    elif case == "flag source not _text":
        argv = ["--text", f"medicalBook_en={tmp_path / 'x.txt'}"]
    elif case == "conversation under a _text key":
        argv = ["--data", write_json(tmp_path / "t.json", [{"source": "medicalBook_en_text",
                                                              "conversations": ["q", "a"]}])]
    else:
        argv = ["--data", write_json(tmp_path / "t.json", ["a document in a records file"])]
    assert run(*argv, "--model", smollm2_dir, "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_long_documents_are_split_not_dropped(tmp_path, smollm2_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    long_doc = " ".join(f"Sentence {i} about the renal tubule and its transporters." for i in range(150))
    n = len(tok(long_doc, add_special_tokens=False).input_ids) + 1  # + EOS
    max_len = 256
    assert n > 3 * max_len
    text = write_json(tmp_path / "medicalBook_en_text.json", [long_doc, "A short one."])
    out = tmp_path / "o"
    assert run("--text", text, "--model", smollm2_dir, "--out", out, "--max-seq-len", max_len, "--num-proc", 1) == 0
    docs = list(documents(out))
    assert all(labels == ids for ids, labels in docs)  # every piece: loss on all its tokens
    lengths = sorted(len(ids) for ids, _ in docs)
    k = -(-n // max_len)
    assert lengths.count(max_len) == k - 1 and len(docs) == k + 1  # k pieces of the long one + the short one
    # the pieces are the document's tokens, nothing lost: their multiset equals the document's
    full = tok(long_doc, add_special_tokens=False).input_ids + [tok.eos_token_id]
    short = tok("A short one.", add_special_tokens=False).input_ids + [tok.eos_token_id]
    pieces = [ids for ids, _ in docs if ids != short]
    assert sorted(sum(pieces, [])) == sorted(full)
    assert any(p == full[:max_len] for p in pieces) and any(p == full[(k - 1) * max_len:] for p in pieces)
    t = mixture(out)["totals"]
    assert (t["records"], t["split_records"], t["pieces"], t["entries"]) == (2, 1, k + 1, k + 1)
    assert t["truncated_records"] == 0 and t["truncated_tokens_dropped"] == 0
    assert t["tokens"] == t["loss_tokens"] == n + len(short)
    # splitting changes the row count inside datasets.map: the output is still the same whatever --num-proc
    out2 = tmp_path / "o2"
    assert run("--text", text, "--data", SAMPLE, "--model", smollm2_dir, "--out", out2, "--max-seq-len", max_len,
               "--num-proc", 2) == 0
    out1 = tmp_path / "o1"
    assert run("--text", text, "--data", SAMPLE, "--model", smollm2_dir, "--out", out1, "--max-seq-len", max_len,
               "--num-proc", 1) == 0
    assert (out1 / "mixture.json").read_bytes() == (out2 / "mixture.json").read_bytes()
    assert mixture(out1)["totals"]["split_records"] >= 1


def train(model, rows, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "src.train.train", "--model", str(model), "--train", str(rows),
                           "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1",
                           "--lr", "1e-3", "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    steps = [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps and all(np.isfinite(r["loss"]) for r in steps)
    ckpts = sorted(p for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts
    return ckpts[-1]


def test_step3_trains_text_then_sft(tmp_path, smollm2_dir, tiny_model_dir):
    """The two-stage recipe of docs/step2.md on a tiny model: text rows, then SFT rows from stage 1's checkpoint."""
    docs = [f"Case {i}: fever and cough for {i % 7 + 2} days; chest X-ray shows consolidation." for i in range(40)]
    text = write_json(tmp_path / "medicalBook_en_text.json", docs)
    assert run("--text", text, "--model", smollm2_dir, "--out", tmp_path / "rows1", "--max-seq-len", 512,
               "--num-proc", 1) == 0
    stage1 = train(tiny_model_dir, tmp_path / "rows1", tmp_path / "ckpt1")
    sft_only = tmp_path / "sft_only.yaml"
    sft_only.write_text('rules:\n  - {pattern: "*_qa", priority: 16, epochs: 0}\n', encoding="utf-8")
    assert run("--data", SAMPLE, "--priorities", sft_only, "--model", smollm2_dir, "--out", tmp_path / "rows2",
               "--max-seq-len", 512, "--num-proc", 1) == 0
    mix = mixture(tmp_path / "rows2")
    assert set(mix["by_class"]) == {"pretrain_qa", "sft"} and mix["by_class"]["pretrain_qa"]["entries"] == 0
    train(stage1, tmp_path / "rows2", tmp_path / "ckpt2")
