"""The typed step configs' base (src/common/config.py): built from a parser, checked once, settings derived."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import pytest

from src.common.config import StepConfig, flag, setting
from src.common.errors import UsageError


@dataclass
class Demo(StepConfig):
    bench: Path = setting(Path("b.json"), rerun=True)
    shots: int = setting(3, rerun=True, resume=True, at_least=0)
    mode: str = setting("generate", resume=True, choices=("generate", "loglik"))
    tags: list = setting(default_factory=list, rerun=True)
    overwrite: bool = False

    def __post_init__(self):
        super().__post_init__()
        self.require(not (self.mode == "loglik" and self.shots == 0), "shots", "loglik needs shots")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--bench", type=Path, default=Path("b.json"))
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--mode", default="generate")
    p.add_argument("--tags", action="append", default=[])
    p.add_argument("--overwrite", action="store_true")
    return p


def test_a_config_is_its_parsed_flags_with_settings_in_declaration_order():
    cfg = Demo.from_args(parser().parse_args(["--shots", "5", "--tags", "x"]))
    assert cfg.shots == 5 and cfg.tags == ["x"] and cfg.overwrite is False
    assert list(cfg.settings()) == ["bench", "shots", "tags"]
    assert cfg.settings() == {"bench": Path("b.json"), "shots": 5, "tags": ["x"]}
    assert cfg.resume_settings() == {"shots": 5, "mode": "generate"}


@pytest.mark.parametrize("argv, message", [
    (["--shots", "-1"], "--shots: must be at least 0, got -1"),
    (["--mode", "beam"], "--mode: must be one of generate, loglik, got 'beam'"),
    (["--mode", "loglik", "--shots", "0"], "--shots: loglik needs shots"),
])
def test_bad_values_are_one_usage_error_naming_the_flag(argv, message):
    with pytest.raises(UsageError) as e:
        Demo.from_args(parser().parse_args(argv))
    assert str(e.value) == message


def test_a_flag_without_a_field_is_a_programming_error():
    p = parser()
    p.add_argument("--forgotten", default=1)
    with pytest.raises(TypeError, match="Demo has no field for forgotten"):
        Demo.from_args(p.parse_args([]))


def test_flag_names():
    assert flag("max_new_tokens") == "--max-new-tokens"


def test_the_evaluation_entry_points_build_their_configs_from_their_parsers():
    """Step 4, the two chats and the server launcher: each parser's flags map onto its typed config (a flag without
    a field would be a TypeError), the defaults pass the checks, and the default model is the absolute one."""
    from src.common.defaults import DEFAULT_MODEL
    from src.evaluate import cli_demo, eval, web_demo
    from src.evaluate.config import ChatConfig, EvalConfig
    from src.serving import launch

    step4 = EvalConfig.from_args(eval.build_parser().parse_args([]))
    assert step4.model == str(DEFAULT_MODEL) and step4.input.is_absolute()
    assert EvalConfig.resume_keys() == ("model", "mode", "max_new_tokens", "min_new_tokens", "format", "dtype",
                                        "proxy_tuned", "proxy_raw", "backend")
    assert EvalConfig.answer_settings() == ("mode", "max_new_tokens", "min_new_tokens", "format", "dtype")
    for module in (cli_demo, web_demo):
        assert ChatConfig.from_args(module.build_parser().parse_args([])).model == str(DEFAULT_MODEL)
    serve = launch.ServeConfig.from_args(launch.build_parser().parse_args([]), extra=["--dtype", "bfloat16"])
    assert serve.model == str(DEFAULT_MODEL) and serve.extra == ["--dtype", "bfloat16"]


@pytest.mark.parametrize("argv, message", [
    (["--proxy-tuned", "a"], "--proxy-raw: --proxy-tuned and --proxy-raw go together"),
    (["--engine", "hf", "--mode", "loglik"], "--engine: hf generates with a plain transformers model"),
    (["--backend", "openai"], "--backend: openai needs --api-base URL"),
    (["--limit", "0"], "--limit: must be at least 1, got 0"),
])
def test_step4_config_checks_are_one_line_naming_the_flag(argv, message):
    from src.evaluate import eval

    with pytest.raises(UsageError) as e:
        eval.parse_config(argv)
    assert str(e.value).startswith(message)
