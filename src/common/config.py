"""Typed step configs: every entry point turns its command line into one dataclass, checked once when it is built,
and passes that object (never the argparse ``Namespace``) to the code below it.

    @dataclass
    class PromptConfig(StepConfig):
        bench: Path = setting(SAMPLE / "bench_test.json", rerun=True)
        shots: int = setting(3, rerun=True, at_least=0)
        overwrite: bool = False

        def __post_init__(self):
            super().__post_init__()          # the at_least/choices checks declared on the fields
            ...                              # checks that need several fields, derived defaults

    config = PromptConfig.from_args(build_parser().parse_args(argv))

* The parser (``build_parser()`` in every entry module) stays the one place where flags, defaults and help are
  written; ``from_args`` maps each flag's ``dest`` to the field of the same name and refuses a parser that has a flag
  the config lacks (a programming error, caught by the tests that build every parser).
* A field's metadata says what the run's outputs depend on: ``rerun=True`` fields make ``settings()``, the dict a
  step records in its report and compares on a rerun (steps 1 and 2: ``src/common/rerun.py``), in declaration
  order; ``resume=True`` fields make ``resume_settings()`` (step 4: the settings a resumed run must share with the
  predictions already made). Nothing else keeps a second list of them.
* Bad values are a ``UsageError`` naming the flag (``--shots: must be at least 0, got -1``), raised while the config
  is built, before any file is read or written.

torchtitan's ``JobConfig`` and torchtune's recipe configs are the models: plain dataclasses, validated once, handed
down whole.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from src.common.errors import UsageError


def setting(default: Any = MISSING, *, rerun: bool = False, resume: bool = False, at_least: float | None = None,
            choices: tuple | None = None, default_factory: Any = MISSING):
    """A config field with what the run depends on (``rerun``/``resume``) and the simple checks of its value."""
    meta = {"rerun": rerun, "resume": resume, "at_least": at_least, "choices": choices}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """The command-line flag of a field: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + name.replace("_", "-")


@dataclass
class StepConfig:
    """Base of the step configs: ``from_args``, the field checks, ``settings()`` and ``resume_settings()``."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            least, choices = f.metadata.get("at_least"), f.metadata.get("choices")
            if least is not None and value is not None and value < least:
                raise UsageError(flag(f.name), f"must be at least {least}, got {value}")
            if choices is not None and value is not None and value not in choices:
                raise UsageError(flag(f.name), f"must be one of {', '.join(map(str, choices))}, got {value!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **extra):
        """The config of a parsed command line (``extra``: fields that are not flags, e.g. the arguments after
        ``--``). Every parsed flag must be a field."""
        names = {f.name for f in fields(cls) if f.init}
        given = {**vars(args), **extra}
        unknown = sorted(set(given) - names)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field for {', '.join(unknown)}: add them to the config")
        return cls(**given)

    def settings(self) -> dict:
        """The fields marked ``rerun``, in declaration order: what decides the step's outputs besides its inputs."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("rerun")}

    @classmethod
    def resume_keys(cls) -> tuple[str, ...]:
        """The names of the fields marked ``resume``, in declaration order (to compare recorded settings)."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("resume"))

    def resume_settings(self) -> dict:
        """The fields marked ``resume``: what a resumed run must share with the results already in its folder."""
        return {name: getattr(self, name) for name in self.resume_keys()}

    def require(self, ok: bool, name: str, message: str) -> None:
        """A UsageError on the field's flag unless ``ok`` (checks that involve several fields)."""
        if not ok:
            raise UsageError(flag(name), message)
