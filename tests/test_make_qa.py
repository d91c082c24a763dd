"""QA rewriting (scripts/make_qa.sh): blocks per language, prompts, dialogue parsing, the in-process backend (seeded,
resumable), the rejection reasons, a real `transformers serve` through the HTTP backend, and step 2 reading the
output unchanged."""
import json
import re

import pytest

from conftest import free_port, serve
from src.common.languages import major_languages
from src.prepare import make_qa, rewrite
from src.prepare.blocks import block_size, cut_document, split_unit, token_measure

EN_SENT = "Hypertension raises the risk of stroke and heart failure in adults over many years. "
ZH_SENT = "高血压会增加中风和心力衰竭的风险，应当定期测量血压。"
AR_SENT = "يزيد ارتفاع ضغط الدم خطر السكتة الدماغية. "
HI_SENT = "उच्च रक्तचाप से हृदय रोग का खतरा बढ़ता है। "


def _ok_ends(blocks, ends):
    return all(b.rstrip()[-1] in ends for b in blocks)


# ------------------------------------------------------------------------------------------------ blocks
def test_block_sizes_are_the_papers_per_language():
    assert [block_size(c) for c in ("en", "es", "fr", "hi", "zh", "ar")] == [2048, 2048, 2048, 2048, 256, 128]
    assert block_size("ja") == 256 and block_size("sw") == 2048 and block_size("de") == 2048
    assert block_size("zh", 100) == 100
    with pytest.raises(ValueError):
        block_size("en", 0)


@pytest.mark.parametrize("lang,sentence,ends", [("en", EN_SENT, "."), ("zh", ZH_SENT, "。"), ("ar", AR_SENT, "."),
                                                 ("hi", HI_SENT, "।")])
def test_long_units_are_cut_at_sentence_ends_within_the_size(lang, sentence, ends):
    size = block_size(lang)
    text = sentence * (3 * size // len(sentence) + 2)
    blocks = cut_document(text, size)
    assert len(blocks) >= 3
    assert all(len(b) <= size for b in blocks)
    assert _ok_ends(blocks, ends)  # no block ends inside a sentence
    assert "".join(b.replace(" ", "") for b in blocks) == text.replace(" ", "")  # nothing lost or reordered
    assert max(len(b) for b in blocks) > size - 2 * len(sentence)  # packed, not one sentence per block


def test_cjk_question_marks_and_arabic_question_mark_are_sentence_ends():
    zh = "血压高吗？" * 80
    assert _ok_ends(cut_document(zh, 256), "？")
    ar = "هل الضغط مرتفع؟ " * 20
    assert _ok_ends(cut_document(ar, 128), "؟")


def test_a_sentence_without_ends_is_cut_between_words_then_anywhere():
    words = " ".join(f"word{i}" for i in range(1500))  # no sentence end: cut at spaces, never inside a word
    blocks = cut_document(words, 2048)
    assert all(len(b) <= 2048 for b in blocks) and len(blocks) >= 5
    assert " ".join(blocks).split() == words.split()
    zh = "血压" * 300 + "，" + "心脏" * 300  # no sentence end: the clause mark is the boundary
    parts = cut_document(zh, 700)
    assert parts[0].endswith("，") and all(len(p) <= 700 for p in parts)
    blob = "x" * 5000  # no boundary at all: cut at the size
    assert [len(b) for b in cut_document(blob, 2048)] == [2048, 2048, 904]
    assert "".join(split_unit(blob, 2048)) == blob


def test_short_paragraphs_are_merged_up_to_the_size_and_long_ones_stay_apart():
    paras = [f"Paragraph {i} says one short thing about anaemia." for i in range(6)]
    text = "\n\n".join(paras)
    merged = cut_document(text, 120)
    assert all(len(b) <= 120 for b in merged) and len(merged) == 3
    assert merged[0] == paras[0] + "\n\n" + paras[1]
    assert cut_document(text, 120, merge=False) == paras


def test_token_sizes(smollm2_tokenizer):
    measure = token_measure(smollm2_tokenizer)
    blocks = cut_document(EN_SENT * 60, 64, measure)
    assert all(measure(b) <= 64 for b in blocks) and _ok_ends(blocks, ".")


def test_a_run_in_tokens(texts, tiny_model_dir, smollm2_tokenizer, tmp_path, capsys):
    out = tmp_path / "tok"
    assert _run(*_gen_args(tiny_model_dir, out, texts / "medicalGuideline_en_text.json"), "--block-unit", "tokens",
                "--block-size", 12) == 0
    rows = [json.loads(x) for x in (out / "blocks.jsonl").read_text().splitlines()]
    measure = token_measure(smollm2_tokenizer)
    assert len(rows) >= 4 and all(measure(r["block"]) <= 12 for r in rows)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["block_unit"] == "tokens" and report["settings"]["block_sizes"] == {"en": 12}
    assert _run("--api-base", "http://127.0.0.1:9/v1", "--out", tmp_path / "x", "--input", texts,
                "--block-unit", "tokens") == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --tokenizer:")


def test_the_shipped_sample_text_is_in_the_release_format():
    from argparse import Namespace
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "assets" / "sample" / "text"
    args = Namespace(input=[sample], language=None, category=None, text_field="text", block_size=None,
                     no_merge=False, limit=None)
    inputs = []
    blocks = list(make_qa.iter_blocks(args, len, inputs))
    assert {i["language"] for i in inputs} >= {"en", "zh", "ar", "es", "fr"}
    for path in sample.iterdir():  # a JSON list of strings per <category>_<lang>_text.json file
        docs = json.loads(path.read_text(encoding="utf-8"))
        assert re.fullmatch(r"medical[A-Z][a-z]+_[a-z]{2}_text\.json", path.name) and all(isinstance(d, str) for d in docs)
    assert all(len(b.text) <= block_size(b.language) for b in blocks)
    assert sum(b.language == "ar" for b in blocks) >= 2  # the 128-character Arabic blocks are exercised


# ------------------------------------------------------------------------------------------------ prompts
def test_prompts_exist_for_the_12_major_languages_and_name_them():
    table = rewrite.prompt_table()["languages"]
    assert set(major_languages()) <= set(table)
    block = "TEXT {question} {text} TEXT"  # braces in a block are left alone
    for lang in major_languages():
        w = rewrite.wording(lang)
        assert w["own"] and w["patient"] and w["doctor"]
        q = rewrite.question_prompt(lang, block)
        a = rewrite.answer_prompt(lang, "QUESTION?", block)
        d = rewrite.dialogue_prompt(lang, block)
        for p in (q, a, d):
            assert block in p and not re.search(r"\{(text|question|reference|language)\}", p.replace(block, ""))
        assert "QUESTION?" in a and a.index("QUESTION?") < a.index(block)
        assert "Apollo" in a
        if lang != "en":
            assert "English" not in q + a + d and q != rewrite.question_prompt("en", block)
    en = rewrite.question_prompt("en", "T")
    assert en.startswith("Please create a <question> that closely aligns with the provided <text>. Ensure that the "
                         "<question> is formulated in English and does not explicitly reference the text.")
    assert rewrite.answer_prompt("en", "Q", "R").startswith("You are Apollo, equipped with in-depth knowledge in "
                                                             "medicine. Your task is to directly answer the user's "
                                                             "<question> in English.")
    assert "dialogues between patients and doctors in English" in rewrite.dialogue_prompt("en", "T")
    assert "in Chinese" not in rewrite.question_prompt("zh", "T") and "中文" in rewrite.question_prompt("zh", "T")
    sw = rewrite.question_prompt("sw", "T")  # a minor language: the English wording naming it
    assert "formulated in Swahili" in sw and not rewrite.wording("sw")["own"]


def test_a_reply_that_repeats_the_instruction_is_caught_but_quoting_the_text_is_not():
    """SmolLM2 sometimes answers with its own prompt: that is a rejection (echoed_prompt), in every language's
    wording; the block's or question's words inside the reply are not the instruction and do not count."""
    en_answer = rewrite.answer_prompt("en", "Why measure blood pressure?", "Blood pressure is measured twice.")
    assert rewrite.echoed_instruction(en_answer[:160], "en", "answer")
    zh_question = rewrite.question_prompt("zh", "高血压需要长期管理。")
    assert rewrite.echoed_instruction("好的。" + zh_question[:60], "zh", "question")
    block = "Blood pressure should be measured on at least two separate visits before hypertension is diagnosed."
    assert rewrite.echoed_instruction("As the guidance says: " + block, "en", "answer") is None
    assert rewrite.echoed_instruction("Patients should measure it at home, twice a day.", "en", "dialogue") is None


def test_echoed_tags_and_quotes_are_cleaned():
    q_en, q_zh = rewrite.wording("en")["question"], rewrite.wording("zh")["question"]
    assert rewrite.clean_reply('<question>: "What lowers blood pressure?"', q_en) == "What lowers blood pressure?"
    assert rewrite.clean_reply("**Question:** Why?", q_en) == "Why?"
    assert rewrite.clean_reply("<问题>：为什么？", q_zh) == "为什么？"


# ------------------------------------------------------------------------------------------------ dialogues
def test_dialogues_parse_in_tag_and_label_forms():
    tags = ("Here are dialogues:\n<Patient>I have had a cough for two weeks.</Patient>\n<Doctor>Do you have fever?"
            "</Doctor><Patient>No.</Patient> <Doctor>Then it is probably viral.</Doctor>")
    turns, problem = rewrite.parse_dialogue(tags, "en")
    assert problem is None and [r for r, _ in turns] == ["patient", "doctor", "patient", "doctor"]
    assert turns[0][1] == "I have had a cough for two weeks." and turns[3][1] == "Then it is probably viral."
    zh = "**患者：** 我最近总是头晕。\n**医生：** 您量过血压吗？\n患者：量过，有点高。\n医师：需要复查。"
    turns, problem = rewrite.parse_dialogue(zh, "zh")
    assert problem is None and [t for _, t in turns] == ["我最近总是头晕。", "您量过血压吗？", "量过，有点高。", "需要复查。"]
    fr = "Patiente : J'ai mal au dos.\nMédecin : Depuis quand ?\nPatient: Since Monday.\nDoctor: Rest."
    assert len(rewrite.parse_dialogue(fr, "fr")[0]) == 4  # English labels are read in every language
    ru = "<Пациент>У меня болит голова.</Пациент><Врач>Как давно?</Врач>"
    assert rewrite.parse_dialogue(ru, "ru")[0] == [("patient", "У меня болит голова."), ("doctor", "Как давно?")]
    # a doctor turn first and a patient left without an answer (cut at the token limit) are dropped; repeats joined
    cut = "Doctor: Hello.\nPatient: My knee hurts.\nPatient: Mostly at night.\nDoctor: Since when?\nPatient: Since"
    assert rewrite.dialogue_turns(cut, "en") == ([("patient", "My knee hurts.\n\nMostly at night."),
                                                  ("doctor", "Since when?")], 2, None)


def test_malformed_dialogues_are_rejected_with_a_reason():
    assert rewrite.parse_dialogue("The patient should rest and drink water.", "en") == \
        ([], "no patient/doctor labels found")
    assert rewrite.parse_dialogue("Patient: I feel dizzy.", "en") == \
        ([], "no patient question followed by a doctor answer")
    assert rewrite.parse_dialogue("", "zh")[1]


def test_language_and_copy_checks():
    block = ZH_SENT * 3
    assert rewrite.language_problem("这是一个关于高血压的问题吗？", block, "zh") is None
    assert "CJK" in rewrite.language_problem("What is the risk of stroke?", block, "zh")
    # ja and zh share CJK characters: kana tell them apart
    ja = "高血圧は脳卒中のリスクを高めますか？"
    assert rewrite.language_problem(ja, block, "ja") is None
    assert "reads as ja" in rewrite.language_problem(ja, block, "zh")
    assert "reads as zh (0% of its letters are kana)" in rewrite.language_problem("这是一个关于高血压的问题吗？", block, "ja")
    en_block = EN_SENT * 3
    assert rewrite.language_problem("The heart pumps blood to the body and the brain.", en_block, "en") is None
    assert "reads as es" in rewrite.language_problem(
        "La presión de la sangre es un factor de riesgo para el corazón y los pulmones.", en_block, "en")
    assert rewrite.copied_from("Hypertension raises the risk of stroke and heart failure", en_block)
    assert not rewrite.copied_from("Why should adults have their blood pressure checked?", en_block)


# ------------------------------------------------------------------------------------------------ runs
@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Three inputs in the three formats: a release text list (en, 2 documents), a .txt (zh), a .jsonl (ar)."""
    d = tmp_path_factory.mktemp("texts")
    (d / "medicalGuideline_en_text.json").write_text(json.dumps([
        "Blood pressure should be measured twice before hypertension is diagnosed. Home readings help.",
        "Hand hygiene prevents infections. Alcohol rub is used for routine care; soap for visible dirt.",
    ]), encoding="utf-8")
    (d / "medicalBook_zh_text.txt").write_text(ZH_SENT * 12 + "\n\n" + "糖尿病需要长期管理。", encoding="utf-8")
    (d / "notes.jsonl").write_text(json.dumps({"body": AR_SENT * 2}, ensure_ascii=False) + "\n", encoding="utf-8")
    return d


def _run(*args) -> int:
    return make_qa.main([str(a) for a in args] + ["--no-progress"])


def _gen_args(model, out, *inputs, seed=1):
    return ["--model", model, "--out", out, "--seed", seed, "--max-question-tokens", 6, "--max-new-tokens", 8,
            *[x for i in inputs for x in ("--input", i)]]


def test_inputs_need_a_language(texts, tmp_path, tiny_model_dir, capsys):
    assert _run(*_gen_args(tiny_model_dir, tmp_path / "o", texts / "notes.jsonl")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --language:") and "notes.jsonl" in err and len(err.strip().splitlines()) == 1
    assert _run(*_gen_args(tiny_model_dir, tmp_path / "o", texts / "notes.jsonl"), "--language", "ar") == 2
    assert "'text'" in capsys.readouterr().err  # the default field is missing in this file: named


@pytest.fixture(scope="module")
def inprocess(texts, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    assert _run(*_gen_args(tiny_model_dir, out, texts), "--text-field", "body", "--language", "ar") == 0
    return out


def test_in_process_run_is_seeded_and_independent_of_order(inprocess, texts, tiny_model_dir, tmp_path):
    report = json.loads((inprocess / "report.json").read_text())
    done = [json.loads(x) for x in (inprocess / "blocks.jsonl").read_text().splitlines()]
    # the zh text repeats one sentence: two of its blocks are the same text, generated once (and then a duplicate)
    assert report["blocks"] == {"read": len(done) + 2, "generated_now": len(done), "resumed": 0, "repeated": 2}
    assert len(done) >= 4 and len({d["key"] for d in done}) == len(done)
    assert report["tokens"]["prompt"] > 0 and report["tokens"]["completion"] > 0
    assert report["pairs_written"] + report["rejected_total"] == len(done) + 2
    again = tmp_path / "b"
    assert _run(*_gen_args(tiny_model_dir, again, texts), "--text-field", "body", "--language", "ar") == 0
    for name in ("blocks.jsonl", "records.json", "rejects.jsonl", "report.json"):
        a, b = (inprocess / name).read_text(), (again / name).read_text()
        assert a == b.replace(str(again), str(inprocess)), name
    # one block alone gives what it gave among the others (sampling is seeded per block, not per run)
    alone = tmp_path / "alone"
    assert _run(*_gen_args(tiny_model_dir, alone, texts / "medicalBook_zh_text.txt"), "--language", "ar") == 0
    first = json.loads((alone / "blocks.jsonl").read_text().splitlines()[0])
    match = [d for d in done if d["key"] == first["key"]]
    assert match and match[0]["question"] == first["question"] and match[0]["answer"] == first["answer"]
    other = tmp_path / "seed2"
    assert _run(*_gen_args(tiny_model_dir, other, texts / "medicalBook_zh_text.txt", seed=2), "--language", "ar") == 0
    second = json.loads((other / "blocks.jsonl").read_text().splitlines()[0])
    assert (second["question"], second["answer"]) != (first["question"], first["answer"])


def test_resume_does_no_new_generation_and_refuses_to_overwrite(inprocess, texts, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r"
    args = _gen_args(tiny_model_dir, out, texts) + ["--text-field", "body", "--language", "ar"]
    assert _run(*args) == 0
    records = (out / "records.json").read_text()
    lines = (out / "blocks.jsonl").read_text().splitlines(keepends=True)
    assert _run(*args) == 2 and "--resume" in capsys.readouterr().err  # an earlier run's outputs are kept
    assert _run(*args, "--resume") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["blocks"]["generated_now"] == 0 and report["blocks"]["resumed"] == len(lines)
    assert report["blocks"]["repeated"] == report["blocks"]["read"] - len(lines)
    assert report["tokens_this_run"] == {"prompt": 0, "completion": 0}
    assert (out / "records.json").read_text() == records
    (out / "blocks.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])  # a crash cut the last line
    assert _run(*args, "--resume") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["blocks"]["generated_now"] == 1 and (out / "blocks.jsonl").read_text() == "".join(lines)
    (out / "blocks.jsonl").write_text(lines[0][:20] + "\n" + "".join(lines[1:]))  # damage that no crash leaves
    assert _run(*args, "--resume") == 2 and "only the last line may be cut short" in capsys.readouterr().err
    assert _run(*args, "--overwrite") == 0
    assert json.loads((out / "report.json").read_text())["blocks"]["generated_now"] == len(lines)


ZH_GOOD = ("高血压患者应该多久测量一次血压，为什么要这样做？",
           "高血压患者应当定期测量血压，因为长期血压升高会明显增加中风和心力衰竭的风险，及时发现可以尽早调整治疗。")
CRAFTED = [  # per block of the en and zh inputs: what a model might have written (reason checked below)
    ("How often should blood pressure be measured before a diagnosis?",
     "Blood pressure is measured on at least two visits, and home readings help confirm the diagnosis."),  # kept
    ("", ""),  # empty
    ZH_GOOD,  # kept
    ("为什么要长期管理糖尿病？", "太短了。"),  # too short
    ("What is the risk of high blood pressure?", "It raises the risk of stroke and heart failure."),  # not zh
]


def test_rejections_are_counted_and_the_output_goes_through_step2(texts, tiny_model_dir, tmp_path):
    from src.prepare import train_data

    out = tmp_path / "craft"
    args = _gen_args(tiny_model_dir, out, texts / "medicalGuideline_en_text.json", texts / "medicalBook_zh_text.txt")
    assert _run(*args) == 0
    rows = [json.loads(x) for x in (out / "blocks.jsonl").read_text().splitlines()]
    assert [r["language"] for r in rows] == ["en", "en", "zh", "zh", "zh"]
    for r, (q, a) in zip(rows, CRAFTED):  # under the real keys
        r["question"], r["answer"] = q, a
    rows.append(dict(rows[2], key="x"))  # (a stale line of another setting: ignored)
    (out / "blocks.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    # ... and two more inputs whose blocks repeat a question and copy one from the text
    dup = texts.parent / "dup"
    dup.mkdir(exist_ok=True)
    (dup / "medicalWeb_zh_text.json").write_text(json.dumps(["肾脏病需要长期随访。", "流感会引起发热。"],
                                                             ensure_ascii=False))
    assert _run(*args, "--input", dup / "medicalWeb_zh_text.json", "--resume") == 0
    more = [json.loads(x) for x in (out / "blocks.jsonl").read_text().splitlines()][len(rows):]
    assert len(more) == 2
    more[0]["question"], more[0]["answer"] = ZH_GOOD  # duplicate of block 2's question
    more[1]["question"], more[1]["answer"] = "流感会引起发热。", ZH_GOOD[1]  # the block itself
    (out / "blocks.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + more))
    assert _run(*args, "--input", dup / "medicalWeb_zh_text.json", "--resume") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["blocks"]["generated_now"] == 0
    assert report["rejected"] == {"empty": 1, "too_short": 1, "unparsed_dialogue": 0, "echoed_prompt": 0,
                                  "not_in_language": 1, "copied_question": 1, "duplicate": 1}
    assert report["pairs_written"] == 2
    assert report["by_source"]["medicalBook_zh_qa"] == {"blocks": 3, "written": 1, "rejected": 2}
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["empty", "too_short", "not_in_language", "duplicate",
                                              "copied_question"]
    records = json.loads((out / "records.json").read_text())
    assert records[0] == {"conversations": [{"from": "human", "value": CRAFTED[0][0]},
                                            {"from": "gpt", "value": CRAFTED[0][1]}],
                          "source": "medicalGuideline_en_qa", "class": "major"}
    assert records[1]["source"] == "medicalBook_zh_qa"
    # a dialogue record in the release format, through the same writer and check
    block = make_qa.Block(ZH_SENT, "zh", "medicalBook", "f", "0", 0)
    turns, reason, _ = make_qa.judge({"mode": "dialogue", "reply": f"<患者>{ZH_GOOD[0]}</患者><医生>{ZH_GOOD[1]}</医生>"},
                                     block, make_qa.Checks(), set())
    assert reason is None
    dialogue = make_qa.release_record(turns, block, "dialogue")
    assert dialogue["source"] == "medicalPatient_zh" and [t["from"] for t in dialogue["conversations"]] == \
        ["human", "gpt"]
    (tmp_path / "dialogues.json").write_text(json.dumps([dialogue], ensure_ascii=False))
    step2 = tmp_path / "step2"
    assert train_data.main(["--data", str(out / "records.json"), "--data", str(tmp_path / "dialogues.json"),
                            "--model", str(tiny_model_dir), "--out", str(step2), "--max-seq-len", "1024",
                            "--num-proc", "1"]) == 0
    mixture = json.loads((step2 / "mixture.json").read_text())
    assert {s: v["entries"] for s, v in mixture["by_source"].items()} == \
        {"medicalGuideline_en_qa": 1, "medicalBook_zh_qa": 1, "medicalPatient_zh": 2}
    assert mixture["by_source"]["medicalBook_zh_qa"]["pretrain_qa"]


def test_dialogue_mode_rejects_replies_that_do_not_parse(texts, tiny_model_dir, tmp_path):
    out = tmp_path / "dlg"
    assert _run(*_gen_args(tiny_model_dir, out, texts / "medicalGuideline_en_text.json"), "--mode", "dialogue") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "dialogue" and report["blocks"]["read"] == 2
    assert report["dialogues_written"] + report["rejected_total"] == 2
    assert set(report["by_source"]) == {"medicalPatient_en"}
    for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines()):
        assert r["reason"] in rewrite.REASONS and r["detail"] and "reply" in r


# ------------------------------------------------------------------------------------------------ HTTP backend
@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    yield from serve(tiny_model_dir, tmp_path_factory.mktemp("serve"), timeout=180)


def test_http_backend_against_transformers_serve(server, texts, tiny_model_dir, tmp_path, monkeypatch, capsys):
    secret = "sk-test-never-written-1234"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    out = tmp_path / "api"
    args = ["--api-base", server.base_url, "--api-model", str(tiny_model_dir), "--out", out, "--input",
            texts / "medicalBook_zh_text.txt", "--concurrency", 2, "--max-question-tokens", 4, "--max-new-tokens", 6,
            "--timeout", 60]
    assert _run(*args) == 0
    report = json.loads((out / "report.json").read_text())
    n = report["blocks"]["read"]
    assert n == 3 and report["blocks"]["generated_now"] == n
    assert report["settings"]["backend"] == "api" and report["settings"]["api_model"] == str(tiny_model_dir)
    assert report["tokens"]["prompt"] > 0 and report["tokens"]["completion"] > 0
    assert report["pairs_written"] + report["rejected_total"] == n
    rows = [json.loads(x) for x in (out / "blocks.jsonl").read_text().splitlines()]
    assert sorted(r["where"] for r in rows) == sorted(f"{texts / 'medicalBook_zh_text.txt'}#{i}" for i in range(n))
    assert _run(*args, "--resume") == 0
    assert json.loads((out / "report.json").read_text())["blocks"]["generated_now"] == 0
    printed = capsys.readouterr()
    for f in out.iterdir():
        assert secret not in f.read_text()
    assert secret not in printed.out + printed.err
    assert _run("--api-base", f"http://127.0.0.1:{free_port()}/v1", "--api-model", "m", "--out", tmp_path / "x",
                "--input", texts / "medicalBook_zh_text.txt", "--retries", 0, "--timeout", 5) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --api-base:")
