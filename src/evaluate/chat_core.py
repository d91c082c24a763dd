"""The chat core shared by the terminal chat (``cli_demo.py``), the web chat (``web_demo.py``) and the judge's answers
(src/judge/answer.py).

A chat runs on a backend of the generation interface (src/generation): *local* (any checkpoint the project makes,
loaded by src/models/loading.py: dense, Post-MoE, a LoRA adapter folder, merged, averaged, a stock export, or a
proxy-tuned trio; decoded token by token in its chat format) or *served* (an OpenAI-compatible server,
``scripts/serve.sh``, streamed from ``/v1/chat/completions``). Either way the chat offers the same calls:

* ``fit(history, message)``: the history kept within the context budget (oldest exchanges dropped first) and how many
  exchanges were dropped; ``ValueError`` when the message alone does not fit;
* ``stream(history, message, settings)``: the reply text so far, growing piece by piece;
* ``reply(message, settings, seed)``: one whole reply with why it ended and its length (the judge's answers).

The budget is counted with the checkpoint's tokenizer in its chat format (for a server, the ``--model`` folder names
that tokenizer; the server renders the messages with its own chat template, the same layout for our checkpoints).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from src.generation.types import GenerationConfig, Prompt, Sampling

NOTICE = ("This is a research model: it makes mistakes and is NOT medical advice; follow your doctor's advice.")
EXAMPLES = [
    "What are the first symptoms of type 2 diabetes?",
    "¿Cuáles son las causas más frecuentes de anemia?",
    "Quels sont les signes d'une appendicite ?",
    "高血压患者在饮食上应该注意什么？",
    "ما هي أعراض نقص فيتامين د؟",
    "बच्चों में निर्जलीकरण के लक्षण क्या हैं?",
]
CLEAR, QUIT = {"clear", "/clear"}, {"quit", "exit", "stop", "/quit", "/exit"}


@dataclass
class ChatSettings:
    """A reply's settings, as the chats' controls set them; Apollo's demo defaults: temperature 0.3, top-p 0.7,
    repetition penalty 1.1."""
    greedy: bool = False
    temperature: float = 0.3
    top_p: float = 0.7
    repetition_penalty: float = 1.1
    max_new_tokens: int = 512

    def generation(self, stop_ids=(), seed: int | None = None) -> GenerationConfig:
        sampling = Sampling(greedy=self.greedy, temperature=self.temperature, top_p=self.top_p,
                            repetition_penalty=self.repetition_penalty, seed=seed)
        return GenerationConfig(max_new_tokens=self.max_new_tokens, stop_ids=tuple(stop_ids), sampling=sampling)


def fit_history(fmt, tokenizer, history: list[tuple[str, str]], question: str, budget: int) -> tuple[str, int]:
    """Render history + question as a prompt of at most ``budget`` tokens, dropping the oldest exchanges first.

    Returns (prompt, number of exchanges dropped). Raises ValueError when the question alone does not fit."""
    for dropped in range(len(history) + 1):
        turns = [t for pair in history[dropped:] for t in pair] + [question]
        prompt = fmt.render(turns, open_last=True)
        if len(tokenizer(prompt, add_special_tokens=False).input_ids) <= budget:
            return prompt, dropped
    raise ValueError(f"the message alone is longer than the context budget of {budget} tokens")


class Chat:
    """One checkpoint to chat with, on ``backend`` (in process, or a server when ``served``). ``tokenizer`` and
    ``fmt`` count the context budget (a server renders the messages with its own chat template, the same layout for
    our checkpoints); ``stop_ids`` end a reply (src/generation/stops.py, the one stop rule)."""

    def __init__(self, name: str, backend, tokenizer, fmt, stop_ids, context: int, max_new_tokens: int):
        self.name, self.backend, self.tokenizer, self.fmt = name, backend, tokenizer, fmt
        self.stop_ids, self.context = tuple(stop_ids), context
        self.served = backend.name == "openai"
        self.budget = context - max_new_tokens
        if self.budget <= 0:
            raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room in a context of {context} tokens")

    def fit(self, history: list[tuple[str, str]], message: str) -> tuple[list[tuple[str, str]], int]:
        _, dropped = fit_history(self.fmt, self.tokenizer, history, message, self.budget)
        return history[dropped:], dropped

    def prompt(self, history: list[tuple[str, str]], message: str) -> Prompt:
        """The conversation as chat messages (a server) or as the token ids of its rendering (in process)."""
        if self.served:
            messages = []
            for q, a in history:
                messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            return Prompt(messages=messages + [{"role": "user", "content": message}])
        text = self.fmt.render([t for pair in history for t in pair] + [message], open_last=True)
        return Prompt(self.tokenizer(text, add_special_tokens=False).input_ids, text=text)

    def stream(self, history, message: str, settings: ChatSettings, seed: int | None = None) -> Iterator[str]:
        yield from self.backend.stream(self.prompt(history, message), settings.generation(self.stop_ids, seed))

    def reply(self, message: str, settings: ChatSettings, seed: int | None = None) -> tuple[str, str | None, int]:
        """One reply to ``message`` alone: (text, "stop" or "length", new tokens)."""
        config = settings.generation(self.stop_ids, seed)
        prompt = self.prompt([], message)
        if self.served:
            g = self.backend.generate([prompt], config)[0]
            return g.text.strip(), "length" if g.stop == "max_tokens" else "stop", g.new_tokens
        tokens = list(self.backend.stream_ids(prompt, config))
        finish = "length" if len(tokens) >= config.max_new_tokens else "stop"
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), finish, len(tokens)


def open_chat(model: str, api_base: str | None = None, api_model: str | None = None, proxy_tuned: str | None = None,
              proxy_raw: str | None = None, fmt_name: str | None = None, max_context: int | None = None,
              max_new_tokens: int = 512) -> Chat:
    """A chat with ``model`` (with proxy models if given) in this process, or with the server at ``api_base``
    (``model`` then names the tokenizer and chat format used for the context budget and the stop tokens)."""
    import torch

    from src.generation.backends import open_backend, open_served
    from src.generation.stops import folder_stop_token_ids, stop_token_ids
    from src.models.loading import load_config, load_model, load_tokenizer_and_format

    tokenizer, fmt = load_tokenizer_and_format(model, fmt_name)
    config = load_config(model)
    context = max_context or min(getattr(config, "max_position_embeddings", 4096) or 4096, 8192)
    if api_base:
        backend = open_served(api_base, api_model, tokenizer)
        name = f"{backend.client.model or model} at {backend.client.base}"
        return Chat(name, backend, tokenizer, fmt, folder_stop_token_ids(model, tokenizer, fmt), context,
                    max_new_tokens)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if proxy_tuned:
        from src.models.proxy_tuning import load_proxy_tuned

        net, tokenizer = load_proxy_tuned(model, proxy_tuned, proxy_raw, device=device)
    else:
        net = load_model(model, device=device).eval()
    backend = open_backend("custom", net, tokenizer)  # the chat only streams: the token loop (src/generation/stream.py)
    return Chat(model, backend, tokenizer, fmt, stop_token_ids(tokenizer, fmt, net), context, max_new_tokens)
