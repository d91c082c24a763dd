"""MMedBench prompts (src/prepare/mmedlm_prompts.py, step 1 --prompt-style mmedlm|fixed) and training records.

The expected strings below are what MMedLM's own code writes for items of the embedded sample (written for this
project, assets/sample/mmedbench/): its inference/inference.py ``read_jsonl`` + ``prepare_data`` (the prompt and its
gold ``output``) and its finetune/train.py ``jsonl_load`` (source = PROMPT_DICT["prompt_input"].format_map(example),
target = example["output"]; shuffling off), run once on those files outside this repository, their values pasted
here. Note the two spaces after "step-by-step." at inference and the one in training, "Let’s" with a typographic
apostrophe, the English suffix after every question and the options on one line with a trailing space.
"""
from __future__ import annotations

import json

import pytest

from src.prepare import mmedbench, mmedlm_prompts
from tests.conftest import SAMPLE

MMED = SAMPLE / "mmedbench"

MMEDLM_CASES = [
    # English test item 1, with rationale: (prompt, gold)
    ('Test', 'English', 0, True, (
        'Below is an instruction that describes a task, paired with an input that provides further context. Write a'
        ' response that appropriately completes the request.\n'
        '\n'
        '### Instruction:\n'
        "You're a English doctor, kindly address the medical queries according to the patient's account in English."
        ' Let’s solve this step-by-step.  You should first give the reason in English for your choice. Then you sho'
        'uld give the right answer index of the question.\n'
        '\n'
        '### Input:\n'
        '###Question: A 28-year-old woman has had fever, right flank pain and burning on urination for two days. He'
        'r temperature is 39.2°C and there is right costovertebral angle tenderness. Urinalysis shows pyuria and wh'
        'ite blood cell casts. Which of the following is the most likely diagnosis? Which of the following is the b'
        'est treatment for this patient? ###Options: A. Acute cystitis B. Acute pyelonephritis C. Nephrolithiasis D'
        '. Acute appendicitis E. Pelvic inflammatory disease \n'
        '\n'
        '### Response:'
    ), 'B'),
    # Japanese test item 2, without rationale: (prompt, gold)
    ('Test', 'Japanese', 1, False, (
        'Below is an instruction that describes a task, paired with an input that provides further context. Write a'
        ' response that appropriately completes the request.\n'
        '\n'
        '### Instruction:\n'
        "You're a Japanese doctor, kindly address the medical queries according to the patient's account. Answer wi"
        'th the best option directly.\n'
        '\n'
        '### Input:\n'
        '###Question: ループ利尿薬の副作用として正しいのはどれか。2つ選べ。 Which of the following is the best trea'
        'tment for this patient? ###Options: A. 低カリウム血症 B. 高カリウム血症 C. 聴覚障害 D. 低尿酸血症 E. 低血'
        '糖 \n'
        '\n'
        '### Response:'
    ), 'A,C'),
    # Russian test item 1, with rationale: (prompt, gold)
    ('Test', 'Russian', 0, True, (
        'Below is an instruction that describes a task, paired with an input that provides further context. Write a'
        ' response that appropriately completes the request.\n'
        '\n'
        '### Instruction:\n'
        "You're a Russian doctor, kindly address the medical queries according to the patient's account in Russian."
        ' Let’s solve this step-by-step.  You should first give the reason in Russian for your choice. Then you sho'
        'uld give the right answer index of the question.\n'
        '\n'
        '### Input:\n'
        '###Question: Инсулин вырабатывается бета-клетками островков Лангерганса поджелудочной железы. Вырабатывает'
        'ся ли инсулин в печени? Which of the following is the best treatment for this patient? ###Options: A. Да B'
        '. Нет \n'
        '\n'
        '### Response:'
    ), 'B'),
    # French train item 2, with rationale: (source, target)
    ('Train', 'French', 1, True, (
        'Below is an instruction that describes a task, paired with an input that provides further context. Write a'
        ' response that appropriately completes the request.\n'
        '\n'
        '### Instruction:\n'
        "You're a French doctor, kindly address the medical queries according to the patient's account in French. L"
        'et’s solve this step-by-step. You should first give the reason in French for your choice. Then you should '
        'give the right answer index of the question.\n'
        '\n'
        '### Input:\n'
        '###Question: Parmi les effets indésirables suivants, lesquels sont ceux des anti-inflammatoires non stéroï'
        'diens ? Which of the following is the best treatment for this patient? ###Options: A. Ulcère gastroduodéna'
        'l B. Hypoglycémie C. Insuffisance rénale aiguë D. Bradycardie E. Alopécie \n'
        '\n'
        '### Response:'
    ), (
        '###Rationale: En inhibant la synthèse des prostaglandines, les AINS fragilisent la muqueuse gastrique et r'
        "éduisent la perfusion rénale, d'où ulcères et insuffisance rénale aiguë.\n"
        '###Answer: OPTION A,C IS CORRECT.'
    )),
    # French train item 2, without rationale: (source, target)
    ('Train', 'French', 1, False, (
        'Below is an instruction that describes a task, paired with an input that provides further context. Write a'
        ' response that appropriately completes the request.\n'
        '\n'
        '### Instruction:\n'
        "You're a French doctor, kindly address the medical queries according to the patient's account. Answer with"
        ' the best option directly.\n'
        '\n'
        '### Input:\n'
        '###Question: Parmi les effets indésirables suivants, lesquels sont ceux des anti-inflammatoires non stéroï'
        'diens ? Which of the following is the best treatment for this patient? ###Options: A. Ulcère gastroduodéna'
        'l B. Hypoglycémie C. Insuffisance rénale aiguë D. Bradycardie E. Alopécie \n'
        '\n'
        '### Response:'
    ), (
        '###Answer: OPTION A,C IS CORRECT.'
    )),
]


def _item(split: str, language: str, index: int) -> mmedbench.MMedItem:
    return mmedbench.read_file(MMED / split / f"{language}.jsonl")[0][index]


@pytest.mark.parametrize("split,language,index,with_rationale,prompt,gold", MMEDLM_CASES)
def test_mmedlm_style_is_byte_identical(split, language, index, with_rationale, prompt, gold):
    item = _item(split, language, index)
    training = split == "Train"
    assert mmedlm_prompts.alpaca_prompt(item, with_rationale, "mmedlm", training=training) == prompt
    if training:
        assert mmedlm_prompts.target(item, with_rationale, "mmedlm") == gold
        pairs = mmedlm_prompts.training_pairs(item, "mmedlm")
        assert [v for v, _, _ in pairs] == ["rationale", "answer_only"]
        assert pairs[0 if with_rationale else 1][1:] == (prompt, gold)
    else:
        assert mmedlm_prompts.gold_string(item, "mmedlm") == gold


def test_fixed_style_differs_only_by_its_three_fixes():
    item = _item("Test", "Japanese", 1)
    ref = mmedlm_prompts.alpaca_prompt(item, True, "mmedlm")
    fixed = mmedlm_prompts.alpaca_prompt(item, True, "fixed")
    assert mmedlm_prompts.SUFFIX in ref and mmedlm_prompts.SUFFIX not in fixed
    assert "step-by-step.  You" in ref and "step-by-step. You" in fixed
    assert "###Options: A. 低カリウム血症 B. 高カリウム血症 C. 聴覚障害 D. 低尿酸血症 E. 低血糖 \n" in ref
    assert fixed.endswith("###Question: ループ利尿薬の副作用として正しいのはどれか。2つ選べ。\n###Options:\nA. 低カリウム血症\n"
                          "B. 高カリウム血症\nC. 聴覚障害\nD. 低尿酸血症\nE. 低血糖\n\n### Response:")
    # the same instruction in training and at test time
    assert mmedlm_prompts.alpaca_prompt(item, True, "fixed", training=True) == fixed
    assert ref.replace(f" {mmedlm_prompts.SUFFIX}", "").replace("step-by-step.  ", "step-by-step. ") \
        .replace("###Options: A. 低カリウム血症 B. 高カリウム血症 C. 聴覚障害 D. 低尿酸血症 E. 低血糖 ",
                 "###Options:\nA. 低カリウム血症\nB. 高カリウム血症\nC. 聴覚障害\nD. 低尿酸血症\nE. 低血糖") \
        .replace("###Question: ループ利尿薬の副作用として正しいのはどれか。2つ選べ。 ", "###Question: ループ利尿薬の副作用として正しいのはどれか。2つ選べ。\n") \
        == fixed


def test_fixed_target_normalises_the_gold_string():
    item = mmedbench.parse_item({"question": "Q", "options": {"A": "x", "B": "y", "C": "z"}, "answer_idx": "A, C",
                                 "rationale": "R"}, "English.jsonl", 1, "English")
    assert mmedlm_prompts.target(item, False, "mmedlm") == "###Answer: OPTION A, C IS CORRECT."  # as MMedLM would
    assert mmedlm_prompts.target(item, True, "fixed") == "###Rationale: R\n###Answer: OPTION A,C IS CORRECT."
    empty = mmedbench.parse_item({"question": "Q", "options": {"A": "x", "B": "y"}, "answer_idx": "A",
                                  "rationale": " "}, "English.jsonl", 1, "English")
    assert [v for v, _, _ in mmedlm_prompts.training_pairs(empty, "fixed")] == ["answer_only"]


def _step1(tmp_path, model, *flags):
    from src.prepare import bench_prompts

    out = tmp_path / "s1"
    assert bench_prompts.main(["--bench", str(MMED), "--model", str(model), "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in (out / "test.jsonl").read_text(encoding="utf-8").splitlines()], out


def test_step1_records_in_chat_format_and_raw(tmp_path, tiny_model_dir, smollm2_tokenizer):
    from src.common.chat_formats import resolve_format
    from src.evaluate.records import check_record

    recs, out = _step1(tmp_path, tiny_model_dir, "--prompt-style", "mmedlm")
    assert len(recs) == 30 and not (out / "dev.jsonl").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["test"]["by_language"] == {c: 5 for c in mmedbench.LANGUAGES.values()}
    assert (report["test"]["several_answers"], report["test"]["human_check_passed"]) == (3, 18)
    fmt = resolve_format(smollm2_tokenizer)
    en = recs[0]
    assert en["prompt"] == fmt.prefix + fmt.exchange(MMEDLM_CASES[0][4])  # MMedLM's text as the user message
    ja = next(r for r in recs if r["language"] == "ja" and len(r["answers"]) > 1)
    assert (ja["answer"], ja["answers"], ja["answer_idx"], ja["task"]) == ("A,C", ["A", "C"], "A,C", "mmedbench")
    assert en["with_rationale"] is True and en["human_check_passed"] is True and en["rationale"].startswith("Fever")
    assert all(check_record(r, "test.jsonl", n) is r for n, r in enumerate(recs, 1))
    assert en["prompt_tokens"] == len(smollm2_tokenizer(en["prompt"], add_special_tokens=False).input_ids)

    raw, _ = _step1(tmp_path / "raw", tiny_model_dir, "--prompt-style", "mmedlm", "--format", "raw",
                    "--rationale", "without")
    # SmolLM2's tokenizer adds no BOS: the prompt is MMedLM's text alone
    ja_raw = next(r for r in raw if r["id"] == ja["id"])
    assert ja_raw["prompt"] == MMEDLM_CASES[1][4] and ja_raw["with_rationale"] is False


def test_step1_mmedbench_flag_errors(tmp_path, tiny_model_dir):
    from src.common.errors import UsageError
    from src.prepare import bench_prompts

    base = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "o")]
    with pytest.raises(UsageError, match="--shots: MMedBench prompts are zero-shot"):
        bench_prompts.main(["--bench", str(MMED), "--shots", "3", *base])
    with pytest.raises(UsageError, match="--prompt-style: 'paper' is XMedBench's reference style"):
        bench_prompts.main(["--bench", str(MMED), "--prompt-style", "paper", *base])
    with pytest.raises(UsageError, match="--prompt-style: 'mmedlm' is for MMedBench"):
        bench_prompts.main(["--bench", str(SAMPLE / "bench_test.json"), "--prompt-style", "mmedlm", *base])
    with pytest.raises(UsageError, match="--format: 'raw' is for MMedBench"):
        bench_prompts.main(["--bench", str(SAMPLE / "bench_test.json"), "--format", "raw", *base])
    with pytest.raises(UsageError, match="--max-tokens: no test item fits in 50 tokens"):
        bench_prompts.main(["--bench", str(MMED), "--max-tokens", "50", *base])
