"""The one registry of chat formats: how a conversation becomes a string for a given model.

Every stage that turns turns into text (step 1 prompts, step 2 training rows, step 4 stopping, the chat demo) uses a
``ChatFormat`` from here, so prompts and training data always agree for a model.

A conversation with turns q1, a1, q2, a2 is rendered as::

    prefix + user + q1 + assistant + a1 + end + sep + user + q2 + assistant + a2 + end

``prefix`` holds what a document starts with (a BOS token, a default system block), ``end`` is what the model learns to
emit after an answer (its last special token is the generation stop), ``sep`` separates turns.

The release formats of ApolloMoE/Apollo2 (docs/reference.md, "Prompts") are registered by name and chosen from the
model type.
Models without a release format use their tokenizer's chat template, from which the same five pieces are derived by
rendering a probe conversation, so one code path serves every family.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ChatFormat:
    name: str
    prefix: str  # once at the start of every document (BOS, system block)
    user: str  # before each user message
    assistant: str  # between a user message and the assistant's reply
    end: str  # after each assistant reply; generation stops on its special token
    sep: str  # between a reply's end and the next user turn

    def render(self, turns: list[str], open_last: bool = False) -> str:
        """Render alternating user/assistant turns. With ``open_last`` the text ends after the last assistant prefix
        (a prompt to complete); ``turns`` then has an odd length."""
        if open_last != (len(turns) % 2 == 1):
            raise ValueError("open_last needs an odd number of turns, a closed conversation an even number")
        parts = [self.prefix]
        for i in range(0, len(turns), 2):
            if i:
                parts.append(self.sep)
            parts += [self.user, turns[i], self.assistant]
            if i + 1 < len(turns):
                parts += [turns[i + 1], self.end]
        return "".join(parts)

    def exchange(self, question: str, answer: str | None = None) -> str:
        """One user turn and (optionally) its answer, without prefix or separator: the unit prompts are built from."""
        text = self.user + question + self.assistant
        return text if answer is None else text + answer + self.end

    def stop_token(self, tokenizer) -> int | None:
        """Id of the special token that ends an answer (the last special token in ``end``), else the tokenizer's EOS."""
        for tok in sorted(tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()), key=len, reverse=True):
            if tok and self.end.rstrip().endswith(tok):
                return tokenizer.convert_tokens_to_ids(tok)
        return tokenizer.eos_token_id

    def to_dict(self) -> dict:
        return asdict(self)


# The release formats (docs/reference.md, "Prompts"). Phi-3's assistant tag is spelled correctly here (the reference's prompts
# say "<|assisitant|>"). Gemma and Llama-3 documents start with BOS in both training and evaluation (the reference
# trained without it and evaluated with it).
RELEASE_FORMATS: dict[str, ChatFormat] = {
    "qwen2": ChatFormat("qwen2", "", "User:", "\nAssistant:", "<|endoftext|>", "\n"),
    "gemma2": ChatFormat("gemma2", "<bos>", "User:", "\nAssistant:", "<eos>", "\n"),
    "llama3": ChatFormat("llama3", "<|begin_of_text|>", "User:", "\nAssistant:", "<|end_of_text|>", "\n"),
    "phi3": ChatFormat("phi3", "<s>", "<|user|>\n", "<|end|>\n<|assistant|>\n", "<|end|>", "\n"),
}
FORMAT_NAMES = [*RELEASE_FORMATS, "release", "template", "raw"]

# A config field naming the chat format a checkpoint was made for, where its model type would select another one
# (the stock Qwen2MoeForCausalLM export of a SmolLM2- or Llama-based Post-MoE model: src/models/moe_export.py).
RECORDED_FORMAT = "apollo_chat_format"
# model_type -> release format. Llama-3 is told apart from other Llama-architecture models by its BOS token.
_BY_MODEL_TYPE = {"qwen2": "qwen2", "qwen2_moe": "qwen2", "gemma": "gemma2", "gemma2": "gemma2", "phi3": "phi3"}


def release_layout(tokenizer) -> ChatFormat:
    """The release layout ``User:..\\nAssistant:..<eos>`` with this tokenizer's own EOS (for models with neither a
    registered release format nor a chat template)."""
    return ChatFormat("release", _bos_prefix(tokenizer), "User:", "\nAssistant:", tokenizer.eos_token, "\n")


def raw_layout(tokenizer) -> ChatFormat:
    """No chat markup (``--format raw``): BOS where the tokenizer adds one, the prompt as it is, the answer right
    after it and the tokenizer's EOS. For prompts that carry their own role markers, as MMedLM's Alpaca prompts do
    (``### Response:``): it is how MMedLM trains and evaluates them (docs/mmedbench.md)."""
    return ChatFormat("raw", _bos_prefix(tokenizer), "", "", tokenizer.eos_token, "")


def _bos_prefix(tokenizer) -> str:
    """The BOS text a document starts with (only where the tokenizer itself adds one); an EOS must exist to mark
    the end of an answer."""
    if not tokenizer.eos_token:
        raise ValueError("the tokenizer has no EOS token, so no answer end can be marked; pass --format")
    return (tokenizer.bos_token if adds_bos(tokenizer) else "") or ""


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts its BOS before plain text (Llama-3, Gemma: yes; Qwen2, SmolLM2: no)."""
    ids = tokenizer("a").input_ids
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def from_chat_template(tokenizer) -> ChatFormat:
    """Derive the five pieces from the tokenizer's chat template by rendering a probe conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    mark = "\x00{}\x00"
    msgs = [{"role": r, "content": mark.format(i)} for i, r in enumerate(["user", "assistant"] * 2)]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    pieces = text.split("\x00")  # [P, '0', X, '1', Y, '2', X, '3', Z]
    if len(pieces) != 9 or pieces[2] != pieces[6]:
        raise ValueError("the chat template does not render user/assistant turns in a regular way; pass --format")
    head, assistant, between, tail = pieces[0], pieces[2], pieces[4], pieces[8]
    # `between` = end + sep + user and `tail` = end + trailing text; `head` = prefix + user.
    if not between.startswith(tail):
        raise ValueError("cannot separate the answer end from the next user turn in the chat template")
    user = between[len(tail):]
    if not head.endswith(user):
        raise ValueError("the chat template's first user turn differs from later ones; pass --format")
    end, sep = tail, ""
    eos = tokenizer.eos_token
    if eos and eos in tail:  # split "<|im_end|>\n" into the end token and the separator after it
        cut = tail.index(eos) + len(eos)
        end, sep = tail[:cut], tail[cut:]
    gen = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    if gen != head + mark.format(0) + assistant:
        raise ValueError("the chat template's generation prompt differs from its rendered turns; pass --format")
    return ChatFormat("template", head[: len(head) - len(user)], user, assistant, end, sep)


def resolve_format(tokenizer, config=None, name: str | None = None) -> ChatFormat:
    """Pick the chat format: an explicit ``name`` wins; else the one the config records (``RECORDED_FORMAT``); else
    the release format for the model type; else the tokenizer's chat template; else the release layout with the
    tokenizer's EOS."""
    if name:
        if name in RELEASE_FORMATS:
            return RELEASE_FORMATS[name]
        if name == "release":
            return release_layout(tokenizer)
        if name == "template":
            return from_chat_template(tokenizer)
        if name == "raw":
            return raw_layout(tokenizer)
        raise ValueError(f"unknown chat format {name!r}; choose from {', '.join(FORMAT_NAMES)}")
    recorded = getattr(config, RECORDED_FORMAT, None)
    if recorded:  # a stock export of a Post-MoE model: its source's format, not its model type's
        return resolve_format(tokenizer, None, recorded)
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return RELEASE_FORMATS[_BY_MODEL_TYPE[model_type]]
    if tokenizer.bos_token == "<|begin_of_text|>":
        return RELEASE_FORMATS["llama3"]
    if getattr(tokenizer, "chat_template", None):
        return from_chat_template(tokenizer)
    return release_layout(tokenizer)

