"""One client for OpenAI-compatible servers (vLLM's `vllm serve`, `transformers serve`, SGLang, hosted APIs).

Step 4's serving backend, the chat demos and the QA rewriting of the data-creation stage all talk to a server through
this module, so retries, timeouts, concurrency and the API key are handled in one place:

* ``OpenAIClient.completion``: ``POST /v1/completions`` with a raw prompt (step 4 sends step 1's prompt text unchanged);
* ``OpenAIClient.chat`` / ``chat_stream``: ``POST /v1/chat/completions`` (the demos, QA rewriting);
* ``OpenAIClient.models`` / ``default_model``: ``GET /v1/models`` (the one model a server lists);
* ``OpenAIClient.server_paths`` / ``engine``: which server this is (vLLM, transformers serve, another), from the
  routes it publishes, so callers send only the fields that server accepts;
* ``run_concurrently``: at most N requests in flight, results as they finish.

``model=""`` (``SERVER_DEFAULT``) sends no model field: a server pinned to one model (``transformers serve FOLDER``)
answers with that model, which it does not list under ``/v1/models`` on an offline machine.

Transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with exponential backoff; any other
HTTP error is raised at once as ``ApiError`` with the server's own message. The key comes from ``OPENAI_API_KEY`` when it
is set (or the ``api_key`` argument); it is sent as a bearer token and never logged, printed or saved.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Iterable, Iterator

import httpx

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
SERVER_DEFAULT = ""  # as ``model``: send no model field (the server's own one model)


class ApiError(RuntimeError):
    """A request that failed for good (after retries, or at once for a client error). ``status`` is None when the
    server could not be reached at all."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def normalise_base(url: str) -> str:
    """'http://host:8000', 'http://host:8000/' and 'http://host:8000/v1' all mean the same server."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class OpenAIClient:
    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None,
                 timeout: float = 300.0, retries: int = 4, backoff: float = 1.0):
        self.base = normalise_base(base_url)
        self.model = model
        self.retries, self.backoff = retries, backoff
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), headers=headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # no headers: the key must never end up in a log
        return f"OpenAIClient({self.base!r}, model={self.model!r})"

    # -- plumbing ---------------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        url = f"{self.base}{path}"
        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, url, json=body)
            except httpx.TransportError as e:  # connection refused/reset, timeouts
                if attempt == self.retries:
                    raise ApiError(f"{url}: {type(e).__name__}: {e or 'no answer'}") from None
            else:
                if r.status_code < 400:
                    return r.json()
                if r.status_code not in RETRY_STATUS or attempt == self.retries:
                    raise ApiError(f"{url}: HTTP {r.status_code}: {_server_message(r)}", r.status_code)
            time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("unreachable")

    def _with_model(self, body: dict) -> dict:
        fields = {k: v for k, v in body.items() if v is not None and k != "model"}
        if self.model == SERVER_DEFAULT and not body.get("model"):
            return fields
        return {"model": body.get("model") or self.model or self.default_model(), **fields}

    def server_paths(self) -> set[str]:
        """The routes the server publishes in its OpenAPI schema (FastAPI servers: vLLM, transformers serve,
        SGLang); empty when it publishes none. One try, no retries: a probe, not a request that must succeed."""
        root = self.base[:-len("/v1")]
        try:
            r = self._http.get(f"{root}/openapi.json")
            return set(r.json().get("paths", {})) if r.status_code == 200 else set()
        except (httpx.HTTPError, ValueError):
            return set()

    def engine(self) -> str:
        """'vllm', 'transformers' (``transformers serve``) or 'openai' (any other server: only standard fields)."""
        paths = self.server_paths()
        if "/tokenize" in paths and "/version" in paths:
            return "vllm"
        if "/v1/systemone" in paths or "/load_model" in paths:
            return "transformers"
        return "openai"

    # -- endpoints --------------------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/models").get("data", [])]

    def default_model(self) -> str:
        """The one model the server lists (cached); an error when it lists none or several."""
        if self.model:
            return self.model
        try:
            names = self.models()
        except ApiError as e:
            raise ApiError(f"could not list the server's models ({e}); name the model explicitly") from None
        if len(names) != 1:
            raise ApiError(f"{self.base}/models lists {len(names)} models ({', '.join(names) or 'none'}); "
                           "name the one to use explicitly")
        self.model = names[0]
        return self.model

    def completion(self, prompt: str, **params) -> dict:
        """The first choice of ``POST /v1/completions``: {"text", "finish_reason", "logprobs"?} plus "usage".
        ``params`` are the endpoint's fields (max_tokens, temperature, stop, seed, logprobs, echo, ...); None values
        are not sent."""
        out = self._request("POST", "/completions", self._with_model({"prompt": prompt, **params}))
        choice = out["choices"][0]
        return {**choice, "usage": out.get("usage") or {}}

    def chat(self, messages: list[dict], **params) -> dict:
        """The first choice of ``POST /v1/chat/completions``: {"text", "finish_reason"} plus "usage"."""
        out = self._request("POST", "/chat/completions", self._with_model({"messages": messages, **params}))
        choice = out["choices"][0]
        return {"text": choice["message"].get("content") or "", "finish_reason": choice.get("finish_reason"),
                "usage": out.get("usage") or {}}

    def chat_stream(self, messages: list[dict], **params) -> Iterator[str]:
        """Text pieces of a streamed chat reply as the server sends them (server-sent events). A connection that
        fails before the first piece is retried like any request; one that fails mid-reply raises ApiError."""
        body = self._with_model({"messages": messages, "stream": True, **params})
        url = f"{self.base}/chat/completions"
        for attempt in range(self.retries + 1):
            try:
                with self._http.stream("POST", url, json=body) as r:
                    if r.status_code >= 400:
                        r.read()
                        if r.status_code in RETRY_STATUS and attempt < self.retries:
                            time.sleep(self.backoff * 2 ** attempt)
                            continue
                        raise ApiError(f"{url}: HTTP {r.status_code}: {_server_message(r)}", r.status_code)
                    yield from _sse_text(r.iter_lines())
                    return
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise ApiError(f"{url}: {type(e).__name__}: {e or 'no answer'}") from None
                time.sleep(self.backoff * 2 ** attempt)


def _server_message(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300] or r.reason_phrase
    err = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(err, dict):
        return str(err.get("message") or err)[:300]
    return str(err)[:300]


def _sse_text(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                yield piece


def run_concurrently(fn: Callable, items: Iterable, concurrency: int) -> Iterator[tuple[int, object]]:
    """Call ``fn(item)`` for every item with at most ``concurrency`` calls in flight; yield (index, result) as each
    call finishes. The first exception stops new calls and is raised after the running ones have finished, so the
    results yielded before it (e.g. predictions already appended to a file) stay valid."""
    it = iter(enumerate(items))
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        running: dict = {}

        def submit_next() -> bool:
            try:
                index, item = next(it)
            except StopIteration:
                return False
            running[pool.submit(fn, item)] = index
            return True

        for _ in range(max(1, concurrency)):
            if not submit_next():
                break
        error = None
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                index = running.pop(fut)
                if fut.exception() is not None:
                    error = error or fut.exception()
                    continue
                yield index, fut.result()
                if error is None:
                    submit_next()
        if error is not None:
            raise error
