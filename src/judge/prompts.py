"""What the judge is sent: LLMZoo's message layout with an instruction from a prompt file.

The user message lists the question, each answer between ``[Assistant i]`` and ``[End of Assistant i]``, and the
instruction after ``[System]``; the system message asks for a precise reviewer (the sentence Vicuna's and LLMZoo's
judges use). The instructions come from a JSON file in the layout of LLMZoo's ``prompt_all.json`` (``{key: {"role",
"prompt"}}``, ``{num}``/``{num_str}`` filled in), so its own file can be given unchanged with ``--prompt-file``;
ours (``prompts.json``, written for this project) has a ``score`` and an ``order`` entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from src.common.defaults import repo_relative
from src.common.errors import DataError
from src.common.io import read_json

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.json")
SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}


@dataclass(frozen=True)
class JudgePrompt:
    role: str  # what the answers are called: "Assistant"
    template: str  # the instruction, with {num} and {num_str}
    source: str  # "FILE: KEY", for the report

    def instruction(self, n: int) -> str:
        return self.template.format(num=n, num_str=NUMBER_WORDS[n])

    def messages(self, question: str, answers: list[str]) -> list[dict]:
        """The chat messages for one judgment of ``answers`` (in the order shown) to ``question``."""
        shown = "\n\n".join(f"[{self.role} {i}]\n{answer}\n\n[End of {self.role} {i}]"
                            for i, answer in enumerate(answers, 1))
        content = f"[Question]\n{question}\n\n{shown}\n\n[System]\n{self.instruction(len(answers))}\n\n"
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def load_prompt(path: Path, key: str) -> JudgePrompt:
    """The entry ``key`` of a prompt file, checked: a missing key or field is an error naming the file and entry."""
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise DataError(path, "(top level)", None, "expected an object of prompt entries ({key: {role, prompt}})")
    if key not in doc:
        entries = ", ".join(k for k in doc if not k.startswith("_"))
        raise DataError(path, key, None, f"no such prompt entry (the file has: {entries}); choose with --prompt-key")
    entry = doc[key]
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise DataError(path, key, "prompt", "missing or not a non-empty string")
    role = entry.get("role", "Assistant")
    if not isinstance(role, str) or not role.strip():
        raise DataError(path, key, "role", f"must be a non-empty string, got {role!r}")
    prompt = JudgePrompt(role, entry["prompt"], f"{repo_relative(path)}: {key}")
    try:
        prompt.instruction(2)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(path, key, "prompt", f"only {{num}} and {{num_str}} may be filled in ({e!r}); "
                                             f"write a literal brace as {{{{ or }}}}") from None
    return prompt
