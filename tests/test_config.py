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
