"""The typed step configs (src/prepare/config.py, src/download/config.py, src/train/config.py) and the command-line
layer around them: every entry module builds its parser with ``build_parser()``, its config from a bare command line,
refuses bad values with the same one-line errors as before, and ends through ``cli.run``."""
from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE
from src.common import cli
from src.common.defaults import DEFAULT_MODEL
from src.common.errors import DataError, UsageError
from src.download.config import DownloadConfig
from src.prepare.config import (
    DECONTAMINATED_SAMPLE,
    SAMPLE_BENCH,
    SAMPLE_DEV,
    SAMPLE_TRAIN,
    DecontaminateConfig,
    MakeQAConfig,
    PromptConfig,
    TrainDataConfig,
)
from src.train.config import TrainConfig

TRAIN_FLAGS = {"model": "m", "train": "t", "out": "o"}
# entry module: (its config or None, the fewest flags it parses)
ENTRY_MODULES = {
    "src.download.download_data": (DownloadConfig, {}),
    "src.prepare.bench_prompts": (PromptConfig, {}),
    "src.prepare.train_data": (TrainDataConfig, {}),
    "src.prepare.make_qa": (MakeQAConfig, {}),
    "src.prepare.decontaminate": (DecontaminateConfig, {}),
    "src.train.train": (TrainConfig, TRAIN_FLAGS),
    "src.train.launch": (None, ["train.py"]),
    "util.average_checkpoints": (None, ["--ckpt", "a", "--out", "o"]),
    "util.collect_results": (None, ["results/run"]),
    "util.compare_predictions": (None, ["a.jsonl", "b.jsonl"]),
    "util.export_lm_eval": (None, ["--input", "test.jsonl", "--out", "o"]),
    "util.import_apollo_moe": (None, ["--src", "s", "--out", "o"]),
    "util.judge": (None, ["--baseline", "b", "--model", "m"]),
    "util.merge_lora": (None, ["--adapter", "a", "--out", "o"]),
    "util.moe_export": (None, ["--model", "m", "--out", "o"]),
    "util.routing_analysis": (None, ["--model", "m", "--input", "i", "--out", "o"]),
    "util.upcycle_moe": (None, ["--model", "m", "--out", "o"]),
}


def argv_of(flags) -> list[str]:
    if isinstance(flags, list):
        return flags
    return [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def config_of(config_cls, module: str, argv: list[str]):
    return config_cls.from_args(importlib.import_module(module).build_parser().parse_args(argv))


# --------------------------------------------------------------------------------------- every entry module
@pytest.mark.parametrize("module", [m for m, (c, _) in ENTRY_MODULES.items() if c is not None])
def test_a_bare_command_line_gives_the_configs_own_defaults(module):
    """The parser and the config agree on every default: the config built from the fewest flags equals the one built
    in code from the same values."""
    config_cls, flags = ENTRY_MODULES[module]
    assert config_of(config_cls, module, argv_of(flags)) == config_cls(**flags)


@pytest.mark.parametrize("module", list(ENTRY_MODULES))
def test_every_entry_module_has_one_parser_style_and_ends_through_cli_run(module, capsys):
    mod = importlib.import_module(module)
    _, flags = ENTRY_MODULES[module]
    mod.build_parser().parse_args(argv_of(flags))
    tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert "parse_args" not in functions  # no helper that parses: build_parser() + main(argv)
    assert not [n for n in ast.walk(functions["main"]) if isinstance(n, ast.Attribute) and n.attr == "ArgumentParser"]
    guard = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    assert "sys.exit(cli.run(main))" in ast.unparse(guard)
    # a wrong flag is one line and exit code 2, before anything is read (the launcher's flags come before the script:
    # what follows it is the script's)
    bad = ["--no-such-flag", *argv_of(flags)] if module == "src.train.launch" else [*argv_of(flags), "--no-such-flag"]
    assert cli.run(mod.main, bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--no-such-flag" in err[0], err


def test_nothing_under_src_models_imports_the_command_line_layer():
    for path in (ROOT / "src" / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                names = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
                assert "src.common.cli" not in names, path


# ------------------------------------------------------------------------- bad flags of steps 1, 2 and make_qa
MMED = str(SAMPLE / "mmedbench")


@pytest.mark.parametrize("module, config_cls, argv, message", [
    ("src.prepare.bench_prompts", PromptConfig, ["--shots", "-1"], "--shots: must be at least 0, got -1"),
    ("src.prepare.bench_prompts", PromptConfig, ["--max-tokens", "0"], "--max-tokens: must be at least 1, got 0"),
    ("src.prepare.bench_prompts", PromptConfig, ["--dev-fraction", "1.5"],
     "--dev-fraction: must be between 0 and 1, got 1.5"),
    ("src.prepare.bench_prompts", PromptConfig, ["--rationale", "with"], "--rationale: is for MMedBench prompts only"),
    ("src.prepare.bench_prompts", PromptConfig, ["--prompt-style", "mmedlm"],
     "--prompt-style: 'mmedlm' is for MMedBench"),
    ("src.prepare.bench_prompts", PromptConfig, ["--bench", MMED, "--dev", "d.json"],
     "--dev: MMedBench has no dev split"),
    ("src.prepare.train_data", TrainDataConfig, ["--max-seq-len", "8"], "--max-seq-len must be at least 16, got 8"),
    ("src.prepare.train_data", TrainDataConfig, ["--num-proc", "0"], "--num-proc must be at least 1"),
    ("src.prepare.train_data", TrainDataConfig, ["--text", "medicalExam_en=x.txt"],
     "--text medicalExam_en=x.txt: the source of raw text must end in _text"),
    ("src.prepare.make_qa", MakeQAConfig, ["--concurrency", "0"], "--concurrency: must be at least 1, got 0"),
    ("src.prepare.make_qa", MakeQAConfig, ["--top-p", "0"], "--top-p: must be in (0, 1], got 0.0"),
    ("src.prepare.make_qa", MakeQAConfig, ["--model", "m", "--api-base", "u"],
     "--api-base: give either --model (in-process) or --api-base"),
    ("src.prepare.make_qa", MakeQAConfig, ["--resume", "--overwrite"], "--resume: --resume continues a run"),
    ("src.prepare.make_qa", MakeQAConfig, ["--api-base", "u", "--block-unit", "tokens"],
     "--tokenizer: --block-unit tokens with --api-base needs"),
])
def test_bad_flags_are_refused_while_the_config_is_built(module, config_cls, argv, message):
    """The same messages as before the configs (a UsageError, or the plain ValueError step 2 always raised)."""
    with pytest.raises(ValueError) as e:
        config_of(config_cls, module, argv)
    assert str(e.value).startswith(message)


# ------------------------------------------------------------------------------------------------ step 1
def test_step1_settings_are_the_rerun_fields_of_the_benchmark_in_the_recorded_order(tmp_path):
    xmed = config_of(PromptConfig, "src.prepare.bench_prompts", [])
    assert list(xmed.settings()) == ["bench", "dev", "model", "format", "prompt_style", "shots", "shot_mode", "seed",
                                     "max_tokens", "dev_fraction", "on_error"]
    assert (xmed.dev, xmed.shots, xmed.mmedbench) == (SAMPLE_DEV, 3, False)  # the sample's dev file, the paper's k
    assert xmed.out == ROOT / "data" / f"sample_{DEFAULT_MODEL.name}" and xmed.model == str(DEFAULT_MODEL)
    other = config_of(PromptConfig, "src.prepare.bench_prompts", ["--bench", str(tmp_path / "my_bench.json")])
    assert other.dev is None and other.out == ROOT / "data" / f"my_bench_{DEFAULT_MODEL.name}"
    mmed = config_of(PromptConfig, "src.prepare.bench_prompts", ["--bench", MMED])
    assert mmed.mmedbench and list(mmed.settings()) == ["bench", "model", "format", "prompt_style", "rationale",
                                                        "max_tokens", "on_error"]
    assert mmed.settings()["rationale"] == "with" and mmed.out == ROOT / "data" / f"mmedbench_{DEFAULT_MODEL.name}"


# ------------------------------------------------------------------------------------------------ step 2
def test_step2_settings_derive_inputs_and_max_seq_len_and_name_prompt_style_only_for_mmedbench(tmp_path):
    sample = config_of(TrainDataConfig, "src.prepare.train_data", [])
    assert list(sample.settings()) == ["inputs", "model", "format", "max_seq_len", "seed", "priorities",
                                       "language_ids", "on_error", "decontaminate_against", "leak_min_chars"]
    assert sample.settings()["inputs"] == [[str(SAMPLE_TRAIN), "records", None]]
    assert (sample.max_seq_len, sample.decontaminate_against) == (1024, [])
    data = tmp_path / "medicalBook_en_text.json"
    mine = config_of(TrainDataConfig, "src.prepare.train_data", ["--data", str(data), "--text", "notes.txt"])
    assert mine.settings()["inputs"] == [[str(data), "text", "medicalBook_en_text"], ["notes.txt", "text", None]]
    assert mine.max_seq_len == 4096 and mine.out == ROOT / "data" / f"medicalBook_en_text_{DEFAULT_MODEL.name}"
    mmed = config_of(TrainDataConfig, "src.prepare.train_data", ["--data", MMED])
    assert list(mmed.settings())[-1] == "prompt_style" and mmed.inputs[0].kind == "mmedbench"


# ------------------------------------------------------------------------ QA rewriting, decontamination, step 0
def test_make_qa_resolves_its_backend_and_sample_defaults():
    sample = config_of(MakeQAConfig, "src.prepare.make_qa", [])
    assert sample.sample and sample.model == str(DEFAULT_MODEL)
    assert (sample.max_question_tokens, sample.max_new_tokens) == (48, 96)  # small on the embedded sample
    served = config_of(MakeQAConfig, "src.prepare.make_qa", ["--api-base", "http://x/v1", "--input", "t.json"])
    assert served.model is None and (served.max_question_tokens, served.max_new_tokens) == (256, 1024)


def test_decontamination_and_step0_configs():
    dc = config_of(DecontaminateConfig, "src.prepare.decontaminate", [])
    assert dc.sample and dc.bench == [SAMPLE_BENCH, SAMPLE_DEV] and dc.data == [SAMPLE_TRAIN]
    assert dc.out == DECONTAMINATED_SAMPLE and [i.path for i in dc.inputs] == [SAMPLE_TRAIN]
    text_only = config_of(DecontaminateConfig, "src.prepare.decontaminate", ["--bench", "b.json", "--text", "t.txt"])
    assert not text_only.sample and text_only.data is None and [i.kind for i in text_only.inputs] == ["text"]
    with pytest.raises(ValueError, match="--num-proc must be at least 1"):
        config_of(DecontaminateConfig, "src.prepare.decontaminate", ["--num-proc", "0"])
    with pytest.raises(UsageError, match="--mmedbench: goes with --hub"):
        config_of(DownloadConfig, "src.download.download_data", ["--mmedbench"])
    assert config_of(DownloadConfig, "src.download.download_data", ["--hub", "--mmedbench"]).mmedbench


# ------------------------------------------------------------------------------------------------ step 3
@pytest.mark.parametrize("argv, line", [
    (["--batch-size", "0"], "error: --batch-size must be >= 1"),
    (["--max-steps", "0"], "error: --max-steps must be >= 1"),
    (["--lora-r", "4", "--lora-dropout", "1.5"], "error: --lora-dropout must be in [0, 1)"),
    (["--lora-targets", "q_proj"], "error: --lora-targets: only with --lora-r R (> 0)"),
])
def test_step3_refuses_bad_flags_with_one_line_before_anything_is_read(argv, line, capsys, tmp_path):
    from src.train.train import main

    out = tmp_path / "out"
    assert cli.run(main, ["--model", str(tmp_path / "none"), "--train", "t", "--out", str(out), *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not out.exists()


def test_step3_config_built_in_code_is_checked_too():
    with pytest.raises(UsageError, match="--compile: with --zero 1 or 2"):
        TrainConfig(**TRAIN_FLAGS, zero=3, compile=True)
    config = TrainConfig(**TRAIN_FLAGS, lora_r=8)
    from src.train import lora

    assert lora.settings(config) == {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": "all-linear",
                                     "router": "full", "experts": "frozen", "qlora": False}
    assert list(vars(config))[:3] == ["model", "train", "dev"]  # the trackers' hyperparameters, in flag order


def test_step3_dev_records_are_checked_as_step_4_checks_them(tmp_path):
    from src.train.dev_eval import load_dev

    good = {"id": "a", "source": "s", "prompt": "p", "answer": "A", "letters": ["A", "B"]}
    path = tmp_path / "dev.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", "answer": "C"}) + "\n")
    with pytest.raises(DataError, match=r"dev.jsonl: record 2, field 'answer'"):
        load_dev(path, None)
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError, match="duplicate id 'a'"):
        load_dev(path, None)


# ------------------------------------------------------------------------------------------ one bench reader
@pytest.mark.parametrize("raw, field", [
    ("not an item", None),
    ({"source": "medqa-usmle"}, "question"),
    ({"question": "  ", "source": "medqa-usmle"}, "question"),
    ({"question": "Q?"}, "source"),
])
def test_decontamination_reads_bench_items_with_step_1s_checks(raw, field, tmp_path):
    from src.prepare.bench_items import iter_questions, parse_item
    from src.prepare.decontaminate import bench_questions

    item = {"question": "What is it?", "options": "(A) a\n(B) b", "answer": "A", "source": "medqa-usmle"}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([item, raw if not isinstance(raw, dict) else {**raw, "options": "(A) a\n(B) b",
                                                                             "answer": "A"}]))
    with pytest.raises(DataError) as streamed:
        list(iter_questions(path))
    with pytest.raises(DataError) as whole:
        parse_item(json.loads(path.read_text())[1], path, 1)
    assert str(streamed.value) == str(whole.value) and streamed.value.field == field
    assert f"{path}: record 1" in str(streamed.value)
    path.write_text(json.dumps([item, {**item, "question": " What  is it? "}]))
    bench = bench_questions([path])
    assert (bench.items, bench.questions) == (2, ["What is it?"])  # the same question once, credited to the first


# ------------------------------------------------------------------------------------------------ Post-MoE
def test_a_post_moe_folder_naming_the_earlier_export_module_still_loads(tmp_path):
    from test_moe import tiny_moe

    from src.models import loading, moe

    out = moe.save_moe(tiny_moe("llama"), None, tmp_path / "moe")
    config = json.loads((out / "config.json").read_text())
    assert "python -m util.moe_export" in config["model_type"]
    config["model_type"] = moe.EARLIER_MOE_MODEL_TYPES[0]
    (out / "config.json").write_text(json.dumps(config))
    assert loading.load_config(out).post_moe["num_experts"] == 4 and moe.is_moe(loading.load_model(out))
