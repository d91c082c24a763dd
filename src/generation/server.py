"""The ``openai`` backend: generation on any OpenAI-compatible server (vLLM on a GPU node, ``transformers serve``, a
hosted API) through the project's one client (src/common/openai_client.py: retries, backoff, timeouts, the key only
from the environment).

A prompt with ``text`` goes to ``POST /v1/completions`` unchanged (``server_text``: a server that adds the tokenizer's
BOS gets the text without it, so it computes exactly the in-process prompt tokens); a prompt with ``messages`` goes
to ``/v1/chat/completions`` (the server renders its own chat template: a hosted model). ``stream`` streams a chat reply.

``stop_at_line`` on a completions request: the in-process engine stops a row once its first non-empty line is
complete; a server's plain ``stop: ["\\n"]`` would also stop on a *leading* newline and lose the answer after it. So
the request stops on a newline, and when the reply is only newlines (the one case where the stop fired before a
non-empty line) the prompt is asked again without a stop string and the full decode is cut here at the end of its
first non-empty line. Both give the greedy decode's first non-empty line, hence the same letter.

What each server is sent (the server is recognised from the routes it publishes, ``OpenAIClient.engine``):

* vLLM: ``temperature``, ``min_tokens``, ``stop_token_ids`` (the stop set, as in-process),
  ``include_stop_str_in_output``, ``add_special_tokens: false``, its own ``repetition_penalty``;
* transformers serve (it rejects unknown fields and follows sampling settings only from a full generation config): a
  ``generation_config`` with ``do_sample``, ``min_new_tokens``, the stop ids and the sampling values;
* any other server: the standard fields only (``temperature``, ``top_p``, ``max_tokens``, ``stop``, ``seed``).
"""
from __future__ import annotations

import json
import time
from typing import Callable, Iterator

from src.common.openai_client import OpenAIClient, run_concurrently
from src.generation.stops import cut_first_line
from src.generation.types import Generation, GenerationConfig, Prompt


def needs_full_decode(text: str, finish_reason: str | None) -> bool:
    """A reply stopped on a newline before any other character: the answer may follow that newline."""
    return finish_reason == "stop" and text != "" and text.strip("\n") == ""


def server_text(tokenizer, prompt: str, engine: str) -> str:
    """The text to send so that the server tokenizes it into exactly the in-process prompt tokens.

    vLLM is told not to add special tokens; other servers add the tokenizer's own (a BOS), which step 1's prompts
    already start with, so that BOS text is taken off. Anything else that cannot be matched is an error."""
    if engine == "vllm" or tokenizer is None:
        return prompt
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    if not added:
        return prompt
    want = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    head = tokenizer.decode(added)
    text = prompt[len(head):] if prompt.startswith(head) else prompt
    if tokenizer(text, add_special_tokens=True)["input_ids"] != want:
        raise ValueError(f"this tokenizer adds {head!r} to every text and the prompt does not start with it: a "
                         f"server that adds special tokens would not see the in-process prompt tokens")
    return text


def request_params(engine: str, config: GenerationConfig, pad_id: int | None = None, stop: list | None = None) -> dict:
    """The request fields for ``config`` on a server of kind ``engine`` (see the module docstring)."""
    s, stops = config.sampling, list(config.stop_ids)
    if engine == "transformers":
        gen = {"do_sample": not s.greedy, "max_new_tokens": config.max_new_tokens}
        if config.min_new_tokens:
            gen["min_new_tokens"] = config.min_new_tokens
        if s.repetition_penalty != 1.0:
            gen["repetition_penalty"] = s.repetition_penalty
        if stops:
            gen["eos_token_id"] = stops
        if pad_id is not None:
            gen["pad_token_id"] = pad_id
        if not s.greedy:
            gen.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0)
        params = {"max_tokens": config.max_new_tokens, "generation_config": json.dumps(gen)}
    else:
        params = {"temperature": 0 if s.greedy else s.temperature, "max_tokens": config.max_new_tokens}
        if not s.greedy:
            params["top_p"] = s.top_p
        if engine == "vllm":
            params.update(min_tokens=config.min_new_tokens, stop_token_ids=stops, skip_special_tokens=True)
            if s.repetition_penalty != 1.0:
                params["repetition_penalty"] = s.repetition_penalty
    if stop is not None:
        params["stop"] = stop
    if s.seed is not None and not s.greedy:
        params["seed"] = s.seed
    return params


class Served:
    """Generation through ``client``'s server; ``tokenizer`` (the checkpoint's, when known) matches completion prompts
    to the in-process tokens; at most ``concurrency`` requests in flight."""

    name = "openai"

    def __init__(self, client: OpenAIClient, tokenizer=None, *, pad_id: int | None = None, concurrency: int = 8):
        self.client, self.tokenizer, self.pad_id, self.concurrency = client, tokenizer, pad_id, concurrency
        self.engine = client.engine()

    def generate(self, prompts: list[Prompt], config: GenerationConfig,
                 on_result: Callable[[Generation], None] | None = None, progress: bool = False,
                 stats: dict | None = None, desc: str = "generate (server)") -> list[Generation]:
        from tqdm import tqdm

        counts = {"items": 0, "requests": 0, "full_decodes": 0, "new_tokens": 0, "prompt_tokens": 0, "stops": {}}
        out: list = [None] * len(prompts)
        t0 = time.time()
        with tqdm(total=len(prompts), desc=desc, unit="item", disable=not progress, dynamic_ncols=True) as bar:
            for i, (g, requests) in run_concurrently(lambda ip: self._one(ip[0], ip[1], config),
                                                     list(enumerate(prompts)), self.concurrency):
                out[i] = g
                counts["items"] += 1
                counts["requests"] += requests
                counts["full_decodes"] += requests - 1
                counts["new_tokens"] += g.new_tokens
                counts["prompt_tokens"] += g.prompt_tokens
                counts["stops"][g.stop] = counts["stops"].get(g.stop, 0) + 1
                if on_result is not None:
                    on_result(g)
                bar.update(1)
        if stats is not None:
            stats.update(counts, seconds=round(time.time() - t0, 3), engine=self.engine)
        return out

    def stream(self, prompt: Prompt, config: GenerationConfig) -> Iterator[str]:
        """The chat reply to ``prompt.messages`` so far, growing piece by piece."""
        text = ""
        for piece in self.client.chat_stream(prompt.messages, **request_params(self.engine, config, self.pad_id)):
            text += piece
            yield text
        yield text

    def _one(self, index: int, prompt: Prompt, config: GenerationConfig) -> tuple[Generation, int]:
        """One prompt's generation and the number of requests it took."""
        if prompt.messages is not None:
            out = self.client.chat(prompt.messages, **request_params(self.engine, config, self.pad_id))
            return self._generation(index, out, out["text"], False), 1
        text = server_text(self.tokenizer, prompt.text, self.engine)
        out = self.client.completion(text, **self._completion_params(config, config.stop_at_line))
        requests = 1
        if config.stop_at_line and needs_full_decode(out.get("text") or "", out.get("finish_reason")):
            out = self.client.completion(text, **self._completion_params(config, False))
            requests = 2
        reply = out.get("text") or ""
        raw, complete = cut_first_line(reply) if config.stop_at_line else (reply, False)
        return self._generation(index, out, raw, complete), requests

    def _completion_params(self, config: GenerationConfig, stop_on_newline: bool) -> dict:
        params = request_params(self.engine, config, self.pad_id, ["\n"] if stop_on_newline else None)
        if self.engine == "vllm":
            params.update(include_stop_str_in_output=True, add_special_tokens=False)
        return params

    @staticmethod
    def _generation(index: int, out: dict, text: str, line: bool) -> Generation:
        usage = out.get("usage") or {}
        stop = "line" if line else ("max_tokens" if out.get("finish_reason") == "length" else "eos")
        return Generation(index, [], text, stop, int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0))
