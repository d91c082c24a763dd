"""Step 1: validation, wording, shot selection, token budget, determinism, and the real bench."""
import json
import re

import pytest

from src.common.chat_formats import RELEASE_FORMATS
from src.common.errors import DataError, UsageError
from src.common.languages import major_languages
from src.prepare import bench_prompts
from src.prepare.bench_items import load_bench
from src.prepare.prompts import PromptBuilder, candidate_shots


def item(q, source="headqa", answer="(B)", n=4, **extra):
    opts = "\n".join(f"({'ABCDEFGH'[i]}) option {i} of {q}" for i in range(n))
    return {"question": q, "options": opts, "answer": answer, "source": source, **extra}


def write(tmp_path, name, items):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("bad,field,msg", [
    ({"options": "(A) x\n(B) y", "answer": "(A)", "source": "headqa"}, "question", "missing"),
    ({**item("q"), "answer": "(E)"}, "answer", "not among the options"),
    ({**item("q"), "options": ""}, "options", "at least 2 options"),
    ({**item("q"), "options": "(A) x\n(A) y"}, "options", "duplicate option letters A"),
    ({**item("q"), "options": {"A": "x", "B": ""}}, "options", "empty text"),
    ({**item("q"), "source": "nowhere"}, "source", "unknown bench source 'nowhere'"),
    ({**item("q"), "answer": "B and C"}, "answer", "expected"),
])
def test_validation_names_file_index_field(tmp_path, bad, field, msg):
    path = write(tmp_path, "bench.json", [item("fine"), bad])
    with pytest.raises(DataError) as e:
        load_bench(path)
    assert e.value.index == 1 and e.value.field == field and msg in str(e.value)
    assert str(path) in str(e.value) and "record 1" in str(e.value)
    items, rejects = load_bench(path, skip_errors=True)
    assert len(items) == 1 and len(rejects) == 1 and rejects[0]["field"] == field


def test_bad_json_is_reported(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"question": "q",', encoding="utf-8")
    with pytest.raises(DataError, match="broken.json.*invalid JSON"):
        load_bench(path)


def test_mapping_options_and_plain_letter_answer(tmp_path):
    path = write(tmp_path, "b.json", [{"question": "q", "options": {"A": "yes", "B": "no"}, "answer": "B",
                                       "source": "RuMedDaNet"}])
    (it,), _ = load_bench(path)
    assert it.letters == ["A", "B"] and it.answer == "B" and it.language == "ru"
    assert it.options_block() == "(A) yes\n(B) no"


def _one(lang_source, n=4, answer="(B)"):
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp())
    (it,), _ = load_bench(write(d, "b.json", [item("Q?", lang_source, answer=answer, n=n)]))
    return it


SOURCE_OF = {"ar": "mmlu-medical-ar", "de": "MMLU_anatomy_de", "en": "medqa-usmle", "es": "headqa",
             "fr": "frenchmedmcqa", "hi": "mmlu-medical-hi", "it": "MedExpQA", "ja": "IgakuQA", "ko": "KorMedMCQA",
             "pt": "MMLU_anatomy_pt", "ru": "RuMedDaNet", "zh": "cmexam"}

# Golden strings, transcribed from the reference's step 1 (Qwen2 version): instruction, question label, options label,
# and the assistant's answer for gold (C), exactly as the reference writes them (glued phrases, Arabic letter first).
GOLDEN = {
    "en": ("You are a medical doctor answering real-world medical exam questions. Select one correct answer from A to D.",
           "Question:", "Options:", "The correct answer is (C)."),
    "zh": ("您是一名医生，正在回答现实世界的医学考试问题。请从A到E中选择一个正确答案。", "问题:", "选项:", "正确答案是(C)."),
    "es": ("Usted es un médico que responde preguntas de exámenes médicos del mundo real. Elija una respuesta correcta "
           "de la A a la D.", "pregunta:", "Opciones:", "La respuesta correcta es (C)."),
    "fr": ("Vous êtes un médecin et répondez à des questions d'examen médical du monde réel. Veuillez choisir une bonne "
           "réponse de A à E.", "question:", "Possibilités:", "La bonne réponse est (C)."),
    "hi": ("आप एक डॉक्टर हैं जो वास्तविक दुनिया की मेडिकल परीक्षा के सवालों का जवाब दे रहे हैं। कृपया A से D तक सही उत्तर चुनें।",
           "सवाल:", "विकल्प:", "सही उत्तर है(C)."),
    "ar": ("أنت طبيب يجيب على أسئلة الفحص الطبي في العالم الحقيقي. الرجاء اختيار الإجابة الصحيحة من أ إلى د.",
           "سؤال:", "خيارات:", "(C)الإجابة الصحيحة هي."),
    "ru": ("Вы врач, отвечающий на реальные вопросы медицинского осмотра. Пожалуйста, выберите правильный ответ от "
           "\u0410 и B.", "вопрос:", "Параметры:", "Правильный ответ(C)."),
    "de": ("Sie sind ein Arzt, der Fragen zu medizinischen Untersuchungen aus der Praxis beantwortet. Bitte wählen Sie "
           "eine richtige Antwort von A bis D.", "Frage:", "Optionen:", "Die richtige Antwort ist(C)."),
    "pt": ("Você é um médico que responde a perguntas de exames médicos do mundo real. Escolha uma resposta correta "
           "de A a D.", "pergunta:", "Opções:", "A resposta correta é(C)."),
    "it": ("Sei un medico che risponde a domande sugli esami medici del mondo reale. Scegli una risposta corretta "
           "dalla A alla E.", "domanda:", "Opzioni:", "La risposta corretta è(C)."),
    "ko": ("당신은 실제 건강 검진 문제에 답하는 의사입니다. A부터 E까지 정답을 선택해주세요.", "질문:", "옵션:", "정답은(C)."),
    "ja": ("あなたは現実世界の健康診断の質問に答える医師です。 正しい答えを A ～ E から選択してください。", "質問:", "オプション:",
           "正しい答えは、(C)."),
}
# What the fixed style changes, per language: (the letter range as the paper writes it, as fixed writes it for a
# 5-option item A-E) and the answer as fixed writes it.
FIXED = {
    "en": ("from A to D.", "from A to E.", "The correct answer is (C)."),
    "zh": ("A到E", "A到E", "正确答案是(C)."),
    "es": ("de la A a la D.", "de la A a la E.", "La respuesta correcta es (C)."),
    "fr": ("de A à E.", "de A à E.", "La bonne réponse est (C)."),
    "hi": ("A से D तक", "A से E तक", "सही उत्तर है (C)."),
    "ar": ("من أ إلى د.", "من أ إلى ه.", "الإجابة الصحيحة هي (C)."),
    "ru": ("от \u0410 и B.", "от A и E.", "Правильный ответ (C)."),
    "de": ("von A bis D.", "von A bis E.", "Die richtige Antwort ist (C)."),
    "pt": ("de A a D.", "de A a E.", "A resposta correta é (C)."),
    "it": ("dalla A alla E.", "dalla A alla E.", "La risposta corretta è (C)."),
    "ko": ("A부터 E까지", "A부터 E까지", "정답은 (C)."),
    "ja": ("A ～ E", "A ～ E", "正しい答えは、(C)."),
}
OPTS5 = "\n".join(f"({L}) option {i} of Q?" for i, L in enumerate("ABCDE"))


def _paper(lang, options=OPTS5):
    instruction, ql, ol, answer = GOLDEN[lang]
    user = f"User:{instruction}\n{ql} Q?\n{ol}\n{options}\nAssistant:"
    return user + answer + "<|endoftext|>\n", user


@pytest.mark.parametrize("lang", major_languages())
def test_paper_prompt_equals_the_reference_golden_string(lang):
    it = _one(SOURCE_OF[lang], n=5, answer="(C)")
    b = PromptBuilder(RELEASE_FORMATS["qwen2"], "paper")
    shot, target = _paper(lang)
    assert b.shot(it) == shot
    assert b.target(it) == target
    assert b.prompt([it, it], it) == shot + shot + target
    # step 4's log-likelihood context is the prompt plus the text before "(" of a shot's answer
    assert GOLDEN[lang][3].startswith(b.answer_phrase(it) + "(")


@pytest.mark.parametrize("lang", major_languages())
def test_fixed_differs_from_paper_only_in_the_listed_places(lang):
    it = _one(SOURCE_OF[lang], n=5, answer="(C)")
    paper_shot, paper_target = _paper(lang)
    paper_range, fixed_range, fixed_answer = FIXED[lang]
    assert paper_shot.count(paper_range) == 1
    expect_shot = paper_shot.replace(paper_range, fixed_range).replace(GOLDEN[lang][3], fixed_answer)
    b = PromptBuilder(RELEASE_FORMATS["qwen2"])  # fixed is the default
    assert b.shot(it) == expect_shot
    assert b.target(it) == paper_target.replace(paper_range, fixed_range)
    assert fixed_answer.startswith(b.answer_phrase(it) + "(")


def test_fixed_letter_range_follows_the_items_options():
    b = PromptBuilder(RELEASE_FORMATS["qwen2"])
    assert "from A to B." in b.question_text(_one("medqa-usmle", n=2))
    assert "from A to H." in b.question_text(_one("medqa-usmle", n=8))
    assert "من أ إلى ب." in b.question_text(_one("mmlu-medical-ar", n=2))
    assert "A부터 C까지" in b.question_text(_one("KorMedMCQA", n=3))
    # the paper style keeps the reference's hard-coded range whatever the options
    assert "from A to D." in PromptBuilder(RELEASE_FORMATS["qwen2"], "paper").question_text(_one("medqa-usmle", n=2))


def test_minor_languages_use_the_english_template():
    it = _one("mmlu-medical-sw", n=4, answer="(C)")
    for style in ("paper", "fixed"):
        shot, _ = _paper("en", "\n".join(f"({L}) option {i} of Q?" for i, L in enumerate("ABCD")))
        assert PromptBuilder(RELEASE_FORMATS["qwen2"], style).shot(it) == shot


def test_english_pubmed_fallback_template():
    """pubmedqa (and any major source the reference does not map): its own template, trailing spaces included."""
    import tempfile
    from pathlib import Path
    (it,), _ = load_bench(write(Path(tempfile.mkdtemp()), "b.json",
                                [item("Does it work?", "pubmedqa", n=3, answer="(A)", context="We studied 40.")]))
    opts = "(A) option 0 of Does it work?\n(B) option 1 of Does it work?\n(C) option 2 of Does it work?"
    body = f"Context: We studied 40. \nQuestion: Does it work?\nOptions:\n{opts}\nAssistant:"
    head = "User:You are a medical doctor answering real-world medical exam questions."
    shot = f"{head} \n{body}The correct answer is (A).<|endoftext|>\n"
    for style in ("paper", "fixed"):
        b = PromptBuilder(RELEASE_FORMATS["qwen2"], style)
        assert b.shot(it) == shot and b.target(it) == f"{head}\n{body}"


def test_question_and_context_are_pasted_as_written(tmp_path):
    """The reference formats the raw fields, so a question or context with surrounding whitespace keeps it in the
    prompt (both styles); the item's id and the duplicate-shot check use the stripped text."""
    padded = {"question": "  Does it work? \n", "options": "(A) yes\n(B) no", "answer": "(A)", "source": "pubmedqa",
              "context": " We studied 40.  "}
    (it, twin), _ = load_bench(write(tmp_path, "b.json", [padded, {**padded, "question": "Does it work?"}]))
    assert it.question == "Does it work?" and it.raw_question == "  Does it work? \n"
    body = "Context:  We studied 40.   \nQuestion:   Does it work? \n\nOptions:\n(A) yes\n(B) no\nAssistant:"
    for style in ("paper", "fixed"):
        target = PromptBuilder(RELEASE_FORMATS["qwen2"], style).target(it)
        assert target == f"User:You are a medical doctor answering real-world medical exam questions.\n{body}"
    assert candidate_shots(it, [it, twin], 1, 0, False) == []  # the same question once stripped: never a shot


def test_other_chat_formats_wrap_the_same_text():
    it = _one("IgakuQA", n=5, answer="(C)")
    fmt = RELEASE_FORMATS["gemma2"]
    instruction, ql, ol, answer = GOLDEN["ja"]
    user = f"{instruction}\n{ql} Q?\n{ol}\n{OPTS5}"
    b = PromptBuilder(fmt, "paper")
    assert b.prompt([it], it) == f"<bos>User:{user}\nAssistant:{answer}<eos>\nUser:{user}\nAssistant:"


def test_paper_character_rule(tmp_path, smollm2_dir):
    """Each shot, in draw order, is kept when prompt so far + shot + item < 4,096 characters (so a later, shorter
    one can still fit); an item over 4,096 characters with no shot is rejected and reported."""
    short = lambda q: {"question": q, "options": "(A) yes\n(B) no", "answer": "(A)", "source": "headqa"}  # noqa: E731
    pool, _ = load_bench(write(tmp_path, "p.json", [short("1" * 1300), short("2" * 1300), short("3" * 1300),
                                                    short("small"), short("target")]))
    b = PromptBuilder(RELEASE_FORMATS["qwen2"], "paper")
    kept, text = b.fit_characters(pool[:4], pool[4])
    assert [s.question[:1] for s in kept] == ["1", "2", "s"]  # the third long shot would pass 4,096
    assert text == b.prompt(kept, pool[4]) and len(text) < 4096
    assert len(b.prompt(pool[:3], pool[4])) > 4096

    out, rows, report = run_step1(tmp_path, smollm2_dir, [short("fits"), short("t" * 4100)], None,
                                  "--prompt-style", "paper")
    assert [r["question"] for r in rows["test"]] == ["fits"]
    assert report["prompt_style"] == "paper" and report["test"]["over_budget"] == 1
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").open()]
    assert any("reference's limit of 4096" in x["reason"] for x in rejects)
    with pytest.raises(UsageError, match="--prompt-style: no test item fits the reference's limit of 4096 characters"):
        run_step1(tmp_path / "all_long", smollm2_dir, [short("t" * 4100)], None, "--prompt-style", "paper")


def test_shots_never_the_item_and_seeded(tmp_path):
    items, _ = load_bench(write(tmp_path, "b.json", [item(f"q{i}") for i in range(30)]))
    for it in items:
        shots = candidate_shots(it, items, 3, seed=1, fixed=False)
        assert len(shots) == 3 and it not in shots and len({s.id for s in shots}) == 3
    a = [[s.id for s in candidate_shots(it, items, 3, 1, False)] for it in items]
    assert a == [[s.id for s in candidate_shots(it, items, 3, 1, False)] for it in items]
    assert a != [[s.id for s in candidate_shots(it, items, 3, 2, False)] for it in items]
    fixed = {tuple(s.id for s in candidate_shots(it, items, 3, 1, True)) for it in items}
    assert len(fixed) <= 4  # one shared set, plus variants for the few items that are in it


def test_duplicate_question_is_never_a_shot(tmp_path):
    items, _ = load_bench(write(tmp_path, "b.json", [item("same"), item("same", answer="(C)"), item("other")]))
    shots = candidate_shots(items[0], items, 3, 0, False)
    assert [s.question for s in shots] == ["other"]


def run_step1(tmp_path, tokenizer_dir, test_items, dev_items=None, *extra):
    out = tmp_path / "out"
    args = ["--bench", str(write(tmp_path, "test.json", test_items)), "--model", str(tokenizer_dir), "--out", str(out)]
    if dev_items is not None:
        args += ["--dev", str(write(tmp_path, "dev.json", dev_items))]
    assert bench_prompts.main(args + list(extra)) == 0
    rows = {split: [json.loads(line) for line in (out / f"{split}.jsonl").open(encoding="utf-8")]
            for split in ("test", "dev")}
    return out, rows, json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_step1_outputs_contract_and_dev_pool(tmp_path, smollm2_dir):
    test = [item(f"test question {i}") for i in range(8)] + [item(f"usmle {i}", "medqa-usmle") for i in range(5)]
    dev = [item(f"dev question {i}", answer="(A)") for i in range(5)]
    out, rows, report = run_step1(tmp_path, smollm2_dir, test, dev)
    dev_ids = {r["id"] for r in rows["dev"]}
    assert not dev_ids & {r["id"] for r in rows["test"]}  # dev is not a subset of test
    for r in rows["test"]:
        assert set(r) >= {"id", "source", "language", "prompt", "answer", "letters", "shots", "question", "options"}
        assert r["answer"] == "B" and r["letters"] == ["A", "B", "C", "D"] and len(r["shots"]) == 3
        if r["source"] == "headqa":
            assert set(r["shots"]) <= dev_ids  # shots from the dev pool of the same source
        else:
            assert r["id"] not in r["shots"]  # no dev items for this source: other test items
        assert r["prompt"].count("La respuesta correcta es (A).") == (3 if r["source"] == "headqa" else 0)
        assert r["prompt"].endswith("<|im_start|>assistant\n")
    assert report["sources_without_dev_items"] == ["medqa-usmle"]
    assert report["dev_file"].endswith("dev.json") and report["dev"]["read"] == 5  # both kept (once one key)
    assert report["test"]["read"] == report["test"]["written"] == 13


def test_token_budget_drops_shots_then_reports(tmp_path, smollm2_dir):
    long_q = "The patient " + "has a very long history " * 60
    test = [item(f"short {i}") for i in range(6)] + [item(long_q)]
    out, rows, report = run_step1(tmp_path, smollm2_dir, test, None, "--max-tokens", "350")
    assert all(r["prompt_tokens"] <= 350 for r in rows["test"])
    assert any(len(r["shots"]) < 3 for r in rows["test"])  # shots dropped to fit
    assert report["test"]["over_budget"] == 1 and report["test"]["written"] == 6
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").open()]
    assert len(rejects) == 1 and "over the budget of 350" in rejects[0]["reason"]
    assert report["dev_is_subset_of_test"] is True


def test_step1_is_byte_deterministic(tmp_path, smollm2_dir):
    test = [item(f"q{i}", answer="(ABCD"[1 + i % 4] + ")") for i in range(12)]
    a, _, _ = run_step1(tmp_path / "a", smollm2_dir, test, test[:4])
    b, _, _ = run_step1(tmp_path / "b", smollm2_dir, test, test[:4])
    for name in ("test.jsonl", "dev.jsonl", "rejects.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    strip = lambda p: re.sub(r'"(bench|dev|dev_file)": "[^"]*"', "", p.read_text())  # noqa: E731 (paths differ)
    assert strip(a / "report.json") == strip(b / "report.json")


def test_embedded_sample_meets_its_contract():
    """The shipped sample: >= 12 languages, >= 4 families, >= 10 test items each, 2-5 options, valid items."""
    from collections import Counter

    from src.common.languages import family_id
    from tests.conftest import SAMPLE

    test, _ = load_bench(SAMPLE / "bench_test.json")
    dev, _ = load_bench(SAMPLE / "bench_dev.json")
    per_lang = Counter(it.language for it in test)
    assert len(per_lang) >= 12 and min(per_lang.values()) >= 10
    assert len({family_id(lang) for lang in per_lang}) >= 4
    assert {it.language for it in dev} == set(per_lang)
    assert all(2 <= len(it.options) <= 5 for it in test + dev)
    assert not {it.question for it in test} & {it.question for it in dev}


def test_real_bench_every_item_accounted_for(shared_data, smollm2_dir, tmp_path):
    out = tmp_path / "real"
    assert bench_prompts.main(["--bench", str(shared_data / "bench_test.json"), "--dev", str(shared_data / "bench_dev.json"),
                          "--model", str(smollm2_dir), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    raw = json.loads((shared_data / "bench_test.json").read_text())
    t = report["test"]
    assert t["read"] == len(raw) and t["written"] + t["over_budget"] == t["read"]
    assert report["rejected_malformed"] == 0
    assert set(t["by_language"]) == {"en", "zh", "es", "fr", "ar", "hi", "ko"}
    assert sum(t["by_language"].values()) == t["written"]
