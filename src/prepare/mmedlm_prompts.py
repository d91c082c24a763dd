"""MMedLM's zero-shot MMedBench prompt and training target, in two styles (docs/mmedbench.md).

MMedLM writes every item as an Alpaca prompt::

    Below is an instruction that describes a task, paired with an input that provides further context. Write a
    response that appropriately completes the request.\\n\\n### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}
    \\n\\n### Response:

and trains the model to continue it with ``###Rationale: {rationale}\\n###Answer: OPTION {answer} IS CORRECT.`` (the
with-rationale instruction) or ``###Answer: OPTION {answer} IS CORRECT.`` (the answer-only one).

* ``mmedlm``: its strings byte for byte, as its inference and fine-tuning scripts write them: the suffix "Which of the
  following is the best treatment for this patient?" after every question, the options on one line as
  ``A. text B. text `` (a space after each), and two spaces after "step-by-step." at inference where training has
  one.
* ``fixed``: the same wording with three fixes: no suffix (most questions ask something else, and it is English
  after a question in any language), one option per line, and one space after "step-by-step." everywhere, so the
  model is tested on the prompt it was trained on.

The prompt is the user message of the model's chat format, or the whole text with ``--format raw`` (MMedLM's way:
the Alpaca text alone, after BOS where the tokenizer adds one; the answer follows ``### Response:`` directly).
"""
from __future__ import annotations

from src.prepare.mmedbench import MMedItem

STYLES = ("fixed", "mmedlm")
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
# The with-rationale instruction, with {gap} between its second and third sentences: one space in MMedLM's
# training, two at its inference. "Let’s" has a typographic apostrophe, "You're" and "patient's" a straight one.
WITH_RATIONALE = ("You're a {lang} doctor, kindly address the medical queries according to the patient's account in "
                  "{lang}. Let’s solve this step-by-step.{gap}You should first give the reason in {lang} for your "
                  "choice. Then you should give the right answer index of the question.")
ANSWER_ONLY = ("You're a {lang} doctor, kindly address the medical queries according to the patient's account. "
               "Answer with the best option directly.")
SUFFIX = "Which of the following is the best treatment for this patient?"  # MMedLM appends it to every question
RATIONALE_MARK = "###Rationale: "
ANSWER_MARK = "###Answer: OPTION "
ANSWER_END = " IS CORRECT."


def _check(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown MMedBench prompt style {style!r}; choose from {', '.join(STYLES)}")


def instruction(item: MMedItem, with_rationale: bool, style: str, training: bool = False) -> str:
    _check(style)
    if not with_rationale:
        return ANSWER_ONLY.format(lang=item.language_name)
    gap = "  " if style == "mmedlm" and not training else " "
    return WITH_RATIONALE.format(lang=item.language_name, gap=gap)


def input_text(item: MMedItem, style: str) -> str:
    """The question and its options."""
    _check(style)
    if style == "mmedlm":
        options = "".join(f"{letter}. {text} " for letter, text in item.options)
        return f"###Question: {item.question} {SUFFIX} ###Options: {options}"
    options = "\n".join(f"{letter}. {text}" for letter, text in item.options)
    return f"###Question: {item.question}\n###Options:\n{options}"


def alpaca_prompt(item: MMedItem, with_rationale: bool, style: str, training: bool = False) -> str:
    """The Alpaca text of an item (without chat format). ``str.format`` inserts the values as they are, so braces in
    a question are kept, as with MMedLM's ``format_map``."""
    return ALPACA.format(instruction=instruction(item, with_rationale, style, training),
                         input=input_text(item, style))


def gold_string(item: MMedItem, style: str) -> str:
    """The answer as a target writes it: MMedLM's ``answer_idx`` string unchanged, or the letters joined by ","."""
    return item.answer_idx if style == "mmedlm" else item.answer


def target(item: MMedItem, with_rationale: bool, style: str) -> str:
    """What the model is trained to write after ``### Response:`` (the end token is added by the chat format)."""
    answer = f"{ANSWER_MARK}{gold_string(item, style)}{ANSWER_END}"
    return f"{RATIONALE_MARK}{item.rationale}\n{answer}" if with_rationale else answer


def training_pairs(item: MMedItem, style: str) -> list[tuple[str, str, str]]:
    """MMedLM's two training examples of an item: (variant, prompt, target) with rationale, then answer only. An
    item with an empty rationale gives only the answer-only one (callers report the other as left out)."""
    pairs = [("answer_only", alpaca_prompt(item, False, style, training=True), target(item, False, style))]
    if item.rationale.strip():
        pairs.insert(0, ("rationale", alpaca_prompt(item, True, style, training=True), target(item, True, style)))
    return pairs
