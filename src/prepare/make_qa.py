"""Rewrite medical text into QA pairs or doctor-patient dialogues (``scripts/make_qa.sh``; docs/make_qa.md).

The Apollo paper's data creation: pretraining text is cut at its semantic units into blocks of a size that depends on
the language (src/prepare/blocks.py); for each block a model first writes a question the block answers, then answers
it with the block as hidden reference text (``--mode qa``), or writes doctor-patient dialogues from it
(``--mode dialogue``). Prompts: src/prepare/rewrite_prompts.json (src/prepare/rewrite.py).

Backends: ``--model M`` generates in-process with transformers' sampling, seeded per block (the same inputs and seed
give the same records, whatever the order blocks are done in); ``--api-base URL`` sends the prompts to the chat
endpoint of any OpenAI-compatible server (vLLM, transformers serve, a hosted API) with ``--concurrency`` requests in
flight, retries with backoff and ``--timeout``; the key comes from OPENAI_API_KEY and is never written anywhere.

Writes into --out: ``blocks.jsonl`` (one line per finished block: its key, where it came from and the raw generations;
appended as blocks finish, so ``--resume`` skips them), ``records.json`` (the accepted pairs or dialogues in the
release format, in input order; step 2 reads it unchanged), ``rejects.jsonl`` (every generation left out, with its
reason) and ``report.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from src.common.defaults import DEFAULT_MODEL, ROOT, repo_relative
from src.common.errors import DataError, UsageError
from src.common.io import JsonArrayWriter, JsonLinesWriter, dumps, iter_json_array, iter_jsonl, not_utf8, write_json
from src.common.languages import canonical, is_major
from src.prepare import rewrite
from src.prepare.blocks import UNITS, Block, block_size, cut_document, token_measure
from src.prepare.config import (
    MAX_NEW_TOKENS,
    MAX_QUESTION_TOKENS,
    QA_SAMPLE_OUT,
    SAMPLE_MAX_NEW_TOKENS,
    SAMPLE_MAX_QUESTION_TOKENS,
    SAMPLE_TEXT,
    MakeQAConfig,
)

DEFAULT_CATEGORY = "medicalText"  # for input files whose name does not say <category>_<lang>_text
DONE, RECORDS, REJECTS, REPORT = "blocks.jsonl", "records.json", "rejects.jsonl", "report.json"
OUTPUTS = (DONE, RECORDS, REJECTS, REPORT)
_NAME = re.compile(r"^(?P<category>[A-Za-z0-9]+)_(?P<lang>[a-z]{2,3})(?:_(?:text|qa))?$")
INPUT_SUFFIXES = (".json", ".jsonl", ".txt")


# ------------------------------------------------------------------------------------------------ inputs
def input_files(paths: list[Path]) -> list[Path]:
    files = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in INPUT_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{p}: no .json, .jsonl or .txt files in this folder")
            files += found
        elif p.is_file():
            if p.suffix not in INPUT_SUFFIXES:
                raise UsageError("--input", f"{p}: expected a .json (release text list), .jsonl or .txt file")
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: file not found")
    return files


def file_language_category(path: Path, language: str | None, category: str | None) -> tuple[str, str]:
    """(language, category) of an input file: the flags win, else the release name ``<category>_<lang>_text``."""
    m = _NAME.match(path.stem)
    lang = language or (m["lang"] if m else None)
    if not lang:
        raise UsageError("--language", f"{path}: the file name does not name a language (expected "
                                       f"<category>_<lang>_text{path.suffix}, e.g. medicalBook_en_text.json); "
                                       f"pass --language CODE")
    try:
        lang = canonical(lang)
    except ValueError as e:
        raise UsageError("--language", f"{path}: {e}") from None
    cat = category or (m["category"] if m else DEFAULT_CATEGORY)
    if not re.fullmatch(r"[A-Za-z0-9]+", cat):
        raise UsageError("--category", f"{cat!r}: letters and digits only (it becomes <category>_<lang>_qa)")
    return lang, cat


def documents(path: Path, text_field: str):
    """(document id, text) of every document of an input file: each string of a JSON list (or the text field of
    each object), each JSON Lines record's text field, or a whole .txt file."""
    if path.suffix == ".txt":
        try:
            yield "", path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise not_utf8(path) from None
        return
    items = iter_jsonl(path) if path.suffix == ".jsonl" else iter_json_array(path)
    for i, item in enumerate(items):
        if isinstance(item, str) and path.suffix == ".json":
            yield str(i), item
            continue
        if not isinstance(item, dict):
            raise DataError(path, i, None, f"expected a string or an object with a {text_field!r} field, "
                                           f"got {type(item).__name__}")
        text = item.get(text_field)
        if not isinstance(text, str):
            raise DataError(path, i, text_field, "missing or not a string (choose the field with --text-field)")
        yield str(i), text


def iter_blocks(config: MakeQAConfig, measure, inputs: list[dict] | None = None, sizes: dict | None = None):
    """Every block of the inputs, in input order, streamed (files are read document by document). ``inputs`` and
    ``sizes`` (when given) are filled with the documents and blocks per file and the block size per language."""
    files = input_files(config.input)
    resolved = [(p, *file_language_category(p, config.language, config.category)) for p in files]  # errors first
    n = 0
    for path, lang, cat in resolved:
        size = block_size(lang, config.block_size)
        if sizes is not None:
            sizes.setdefault(lang, size)
        entry = {"file": str(path), "language": lang, "category": cat, "documents": 0, "blocks": 0}
        if inputs is not None:
            inputs.append(entry)
        for doc, text in documents(path, config.text_field):
            entry["documents"] += 1
            for i, b in enumerate(cut_document(text, size, measure, merge=not config.no_merge)):
                if config.limit and n >= config.limit:
                    return
                entry["blocks"] += 1
                n += 1
                yield Block(b, lang, cat, str(path), doc, i)


# ------------------------------------------------------------------------------------------------ backends
class HFBackend:
    """In-process generation (the generation interface's ``hf`` backend: transformers' ``generate``), one prompt at a
    time, sampling seeded per request from the block's key, so a block's text does not depend on which blocks ran
    before it or beside it."""

    kind = "model"

    def __init__(self, model_path: str, device: str | None = None):
        import torch

        from src.generation.backends import open_backend
        from src.generation.stops import stop_token_ids
        from src.models.loading import load_model, load_tokenizer_and_format

        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, self.fmt = load_tokenizer_and_format(model_path)
        model = load_model(model_path, device=dev).eval()
        self.stops = tuple(stop_token_ids(self.tokenizer, self.fmt, model))
        self.backend = open_backend("hf", model, self.tokenizer, batch_size=1)
        self.identity = {"backend": "model", "model": repo_relative(model_path)}

    def chat(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float, seed: int) -> dict:
        from src.generation.types import GenerationConfig, Prompt

        text = self.fmt.render([prompt], open_last=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        config = GenerationConfig(max_new_tokens=max_tokens, stop_ids=self.stops, sampling=_sampling(temperature,
                                                                                                      top_p, seed))
        g = self.backend.generate([Prompt(ids)], config)[0]
        new, finish = (g.ids[:-1], "stop") if g.stop == "eos" else (g.ids, "length")
        return {"text": self.tokenizer.decode(new, skip_special_tokens=True), "finish_reason": finish,
                "prompt_tokens": len(ids), "completion_tokens": len(g.ids)}

    def close(self) -> None:
        pass


class APIBackend:
    """The chat endpoint of an OpenAI-compatible server (the generation interface's ``openai`` backend:
    src/common/openai_client.py's retries, backoff and timeout)."""

    kind = "api"

    def __init__(self, base: str, model: str | None, timeout: float, retries: int):
        from src.generation.backends import open_served

        self.backend = open_served(base, model, timeout=timeout, retries=retries)
        client = self.backend.client
        self.identity = {"backend": "api", "api_base": client.base, "api_model": client.model}

    def chat(self, prompt: str, *, max_tokens: int, temperature: float, top_p: float, seed: int) -> dict:
        from src.generation.types import GenerationConfig, Prompt

        config = GenerationConfig(max_new_tokens=max_tokens, sampling=_sampling(temperature, top_p, seed))
        g = self.backend.generate([Prompt(messages=[{"role": "user", "content": prompt}])], config)[0]
        return {"text": g.text, "finish_reason": "length" if g.stop == "max_tokens" else "stop",
                "prompt_tokens": g.prompt_tokens, "completion_tokens": g.new_tokens}

    def close(self) -> None:
        self.backend.client.close()


def _sampling(temperature: float, top_p: float, seed: int):
    """Seeded sampling at ``temperature`` (0: greedy), top-k off (the paper's settings name none)."""
    from src.generation.types import Sampling

    return Sampling(greedy=temperature <= 0, temperature=temperature, top_p=top_p, seed=seed)


# ------------------------------------------------------------------------------------------------ one block
@dataclass
class Settings:
    mode: str
    temperature: float
    top_p: float
    seed: int
    max_question_tokens: int
    max_new_tokens: int

    def generation(self) -> dict:
        return dict(self.__dict__)


def block_key(block: Block, settings: Settings, identity: dict) -> str:
    """Content hash of what decides a block's generations: its text and language, the prompts of that language,
    the generation settings and the backend (model path, or server and model name)."""
    payload = {"text": block.text, "language": block.language, "prompts": rewrite.wording(block.language),
               "settings": settings.generation(), "backend": identity}
    return hashlib.sha256(dumps(payload).encode("utf-8")).hexdigest()[:32]


def _seed(key: str, step: str) -> int:
    """The sampling seed of one request: from the block's key and the step, 31 bits (what every server accepts)."""
    return int(hashlib.sha256(f"{key}:{step}".encode()).hexdigest(), 16) % 2**31


def generate_block(backend, block: Block, key: str, s: Settings) -> dict:
    """The generations for one block (raw, cleaned of echoed tags): question and answer, or the dialogue reply."""
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    finish = []

    def ask(prompt: str, max_tokens: int, step: str) -> str:
        out = backend.chat(prompt, max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p,
                           seed=_seed(key, step))
        usage["prompt_tokens"] += out["prompt_tokens"]
        usage["completion_tokens"] += out["completion_tokens"]
        finish.append(out["finish_reason"])
        return out["text"]

    row = {"key": key, "where": block.where, "language": block.language, "category": block.category,
           "mode": s.mode, "block": block.text}
    w = rewrite.wording(block.language)
    if s.mode == "qa":
        q = rewrite.clean_reply(ask(rewrite.question_prompt(block.language, block.text), s.max_question_tokens,
                                    "question"), w["question"])
        a = rewrite.clean_reply(ask(rewrite.answer_prompt(block.language, q, block.text), s.max_new_tokens,
                                    "answer"), w["answer"]) if q else ""
        row |= {"question": q, "answer": a}
    else:
        row["reply"] = ask(rewrite.dialogue_prompt(block.language, block.text), s.max_new_tokens, "dialogue")
    return row | {"finish": finish, "usage": usage}


# ------------------------------------------------------------------------------------------------ checks
@dataclass
class Checks:
    min_question_chars: int = 8
    min_answer_chars: int = 32  # the paper's filter
    min_script_share: float = 0.5
    copy_share: float = 0.6


def judge(row: dict, block: Block, checks: Checks, seen: set) -> tuple[list[str] | None, str | None, str]:
    """(turns, None, "") for an accepted generation, or (None, reason, detail) for a rejected one. ``seen`` holds
    the normalised questions (first patient turns) already accepted: a repeat is a duplicate."""
    if row["mode"] == "qa":
        q, a = row.get("question") or "", row.get("answer") or ""
        if not q.strip() or not a.strip():
            return None, "empty", "no question" if not q.strip() else "no answer"
        turns = [q, a]
        first, answers = q, [a]
    else:
        reply = row.get("reply") or ""
        if not reply.strip():
            return None, "empty", "no reply"
        parsed, dropped, problem = rewrite.dialogue_turns(reply, block.language)
        if problem:
            return None, "unparsed_dialogue", problem
        row["_dropped_turns"] = dropped  # read back by _assemble for the report (row is a copy read from disk)
        turns = [t for _, t in parsed]
        first, answers = turns[0], turns[1::2]
    if len(first.strip()) < checks.min_question_chars:
        return None, "too_short", f"question of {len(first.strip())} characters (< {checks.min_question_chars})"
    short = min(len(x.strip()) for x in answers)
    if short < checks.min_answer_chars:
        return None, "too_short", f"answer of {short} characters (< {checks.min_answer_chars})"
    for name, text, prompt in (("question", first, "question" if row["mode"] == "qa" else "dialogue"),
                               ("answer", "\n".join(answers), "answer" if row["mode"] == "qa" else "dialogue")):
        echo = rewrite.echoed_instruction(text, block.language, prompt)
        if echo:
            return None, "echoed_prompt", f"the {name} repeats the prompt ({echo!r})"
    for name, text in (("question", first), ("answer", "\n".join(answers))):
        problem = rewrite.language_problem(text, block.text, block.language, checks.min_script_share)
        if problem:
            return None, "not_in_language", f"{name}: {problem}"
    if rewrite.copied_from(first, block.text, checks.copy_share):
        return None, "copied_question", "the question is a piece of the block"
    norm = rewrite.normalise(first)
    if norm in seen:
        return None, "duplicate", "the same question as an earlier block's"
    seen.add(norm)
    return turns, None, ""


def record_source(block: Block, mode: str) -> str:
    """``<category>_<lang>_qa`` for QA pairs (pretrain-derived, as in the release), ``medicalPatient_<lang>`` for
    dialogues (the release's doctor-patient SFT source)."""
    return f"{block.category}_{block.language}_qa" if mode == "qa" else f"medicalPatient_{block.language}"


def release_record(turns: list[str], block: Block, mode: str) -> dict:
    source = record_source(block, mode)
    roles = ("human", "gpt")
    return {"conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)], "source": source,
            "class": "major" if is_major(block.language) else "minor"}


# ------------------------------------------------------------------------------------------------ the run
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/make_qa.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, action="append", default=None,
                   help="text files or folders (repeatable): release <category>_<lang>_text.json lists of strings, "
                        ".jsonl with a text field, .txt; default: the embedded sample in data/raw/sample/text/")
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default: {QA_SAMPLE_OUT.relative_to(ROOT)})")
    p.add_argument("--mode", choices=rewrite.MODES, default="qa", help="qa (default) or dialogue (doctor-patient)")
    p.add_argument("--language", default=None, help="language code of every input (default: from each file name)")
    p.add_argument("--category", default=None,
                   help=f"category of the output source <category>_<lang>_qa (default: from the file name, else "
                        f"{DEFAULT_CATEGORY})")
    p.add_argument("--text-field", default="text", help="text field of JSON Lines records (default: %(default)s)")
    p.add_argument("--block-unit", choices=UNITS, default="chars", help="what block sizes count (default: chars)")
    p.add_argument("--block-size", type=int, default=None,
                   help="one block size for every language (default: per language, the paper's 2048 en/es/fr/hi, "
                        "256 zh, 128 ar; 256 ja; 2048 others)")
    p.add_argument("--no-merge", action="store_true", help="never merge short adjacent paragraphs into one block")
    p.add_argument("--tokenizer", default=None, help="tokenizer for --block-unit tokens (default: --model's)")
    p.add_argument("--model", default=None, help=f"generate in-process with this model (default when no "
                                                  f"--api-base: {DEFAULT_MODEL.relative_to(ROOT)})")
    p.add_argument("--device", default=None, help="in-process device (default: cuda when available, else cpu)")
    p.add_argument("--api-base", default=None, help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-model", default=None, help="model name on the server (default: the one it lists)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight with --api-base (default: 8)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--retries", type=int, default=4, help="retries of a failed request, with backoff (default: 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="seeds every block's sampling (default: %(default)s)")
    p.add_argument("--max-question-tokens", type=int, default=None,
                   help=f"new tokens of a question (default: {MAX_QUESTION_TOKENS}; {SAMPLE_MAX_QUESTION_TOKENS} on "
                        f"the embedded sample)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"new tokens of an answer or dialogue (default: {MAX_NEW_TOKENS}; {SAMPLE_MAX_NEW_TOKENS} on "
                        f"the embedded sample)")
    p.add_argument("--min-answer-chars", type=int, default=32,
                   help="shorter answers (any doctor turn) are rejected (default: %(default)s, the paper's)")
    p.add_argument("--min-question-chars", type=int, default=8, help="shorter questions are rejected (default: 8)")
    p.add_argument("--min-script-share", type=float, default=0.5,
                   help="share of a reply's letters that must be in the block's script (default: %(default)s)")
    p.add_argument("--copy-share", type=float, default=0.6,
                   help="a question sharing a run of this share of its characters with the block is a copy "
                        "(default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N blocks")
    p.add_argument("--resume", action="store_true", help="continue a run in --out: skip the blocks already done")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    present = [n for n in OUTPUTS if (out / n).exists()]
    if present and overwrite:
        for n in present:
            (out / n).unlink()
    elif present and not resume:
        raise FileExistsError(f"{out} already holds the outputs of a run ({', '.join(present)}); pass --resume to "
                              f"continue it, --overwrite to replace it, or another --out")


def _row_key(line: bytes) -> str | None:
    """The key of a complete blocks.jsonl line, None for a line cut short (or otherwise unreadable)."""
    if not line.endswith(b"\n"):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("key") if isinstance(row, dict) and isinstance(row.get("key"), str) else None


class DoneFile:
    """``blocks.jsonl``: the finished blocks, appended one line each as they finish, indexed by key -> byte offset
    (only the index is kept in memory; rows are read back one at a time). A last line cut short by a crash is cut off
    on opening, so its block is generated again and appending goes on from a clean line."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets: dict[str, int] = {}
        self.f = path.open("a+b")
        self.f.seek(0)
        offset = 0
        for line in iter(self.f.readline, b""):
            key = _row_key(line)
            if key is None:
                if self.f.readline():  # more lines follow: not what a crash leaves
                    raise DataError(path, f"at byte {offset}", None, "not a finished block's line (only the last "
                                                                      "line may be cut short); use --overwrite")
                self.f.truncate(offset)
                break
            self.offsets[key] = offset
            offset += len(line)
        self.f.seek(0, os.SEEK_END)

    def __contains__(self, key: str) -> bool:
        return key in self.offsets

    def append(self, row: dict) -> None:
        self.f.seek(0, os.SEEK_END)
        self.offsets[row["key"]] = self.f.tell()
        self.f.write((dumps(row) + "\n").encode("utf-8"))
        self.f.flush()

    def get(self, key: str) -> dict:
        self.f.seek(self.offsets[key])
        row = json.loads(self.f.readline())
        self.f.seek(0, os.SEEK_END)
        return row

    def close(self) -> None:
        self.f.close()


def run(config: MakeQAConfig) -> dict:
    t0 = time.time()
    if config.sample and not SAMPLE_TEXT.is_dir():
        raise FileNotFoundError(f"{SAMPLE_TEXT}: the embedded sample is not there yet; run ./0.download_data.sh "
                                f"first or pass --input")
    out = config.out
    settings = Settings(config.mode, config.temperature, config.top_p, config.seed, config.max_question_tokens,
                        config.max_new_tokens)
    checks = Checks(config.min_question_chars, config.min_answer_chars, config.min_script_share, config.copy_share)
    measure = _measure(config)
    next(iter_blocks(config, measure), None)  # bad inputs (names, formats) fail here, before a model is loaded
    if not config.api_base:  # and a bad model folder, before --out is created
        from src.models.loading import check_model_source

        check_model_source(config.model, weights=True)

    from src.common.locks import hold, release

    out.mkdir(parents=True, exist_ok=True)
    hold(out, "make_qa")
    try:
        _prepare_out(out, config.resume, config.overwrite)
        done, backend = DoneFile(out / DONE), None
        try:
            t_load = time.time()
            backend = _open_backend(config)
            t_load = time.time() - t_load
            t_gen = time.time()
            counts, now = _generate_all(config, backend, done, settings, measure)
            t_gen = time.time() - t_gen
            if not counts["read"]:
                raise DataError(config.input[0], "(all)", None, "no text: the inputs hold no non-empty paragraph")
            report = _assemble(config, measure, done, checks, settings, backend.identity, counts, now)
        finally:
            done.close()
            if backend is not None:
                backend.close()
    finally:
        release(out)
    _print_summary(report, out, {"load": t_load, "generate": t_gen, "total": time.time() - t0})
    return report


def _measure(config: MakeQAConfig):
    """How a block's size is counted: characters (the paper's unit), or tokens of --tokenizer / --model."""
    if config.block_unit != "tokens":
        return len
    name = config.tokenizer or config.model
    from src.models.loading import load_tokenizer

    return token_measure(load_tokenizer(name))


def _open_backend(config: MakeQAConfig):
    if config.api_base:
        return APIBackend(config.api_base, config.api_model, config.timeout, config.retries)
    from src.models.loading import check_model_source

    check_model_source(config.model, weights=True)
    return HFBackend(config.model, config.device)


def _generate_all(config: MakeQAConfig, backend, done: DoneFile, settings, measure) -> tuple[dict, dict]:
    """Generate every block not already in the done file (a block whose text repeats an earlier one is generated
    once); returns the block counts and the tokens used now."""
    from tqdm import tqdm

    counts = {"read": 0, "resumed": 0, "generated": 0, "repeated": 0}
    now = {"prompt_tokens": 0, "completion_tokens": 0}
    keys: set[str] = set()
    bar = tqdm(desc=f"make_qa ({config.mode})", unit="block", disable=True if config.no_progress else None,
               dynamic_ncols=True)

    def todo():
        for b in iter_blocks(config, measure):
            k = block_key(b, settings, backend.identity)
            counts["read"] += 1
            if k in keys:  # the same text as an earlier block: generated once (then judged a duplicate)
                counts["repeated"] += 1
            elif k in done:
                keys.add(k)
                counts["resumed"] += 1
            else:
                keys.add(k)
                yield b, k
                continue
            bar.update(1)

    def finished(row: dict) -> None:
        done.append(row)
        counts["generated"] += 1
        for k in now:
            now[k] += row["usage"][k]
        bar.update(1)

    with bar:
        if backend.kind == "api":
            from src.common.openai_client import run_concurrently

            for _, row in run_concurrently(lambda bk: generate_block(backend, bk[0], bk[1], settings), todo(),
                                           config.concurrency):
                finished(row)
        else:
            for b, k in todo():
                finished(generate_block(backend, b, k, settings))
    return counts, now


def _assemble(config: MakeQAConfig, measure, done: DoneFile, checks, settings, identity, counts, now) -> dict:
    """Judge every block's generations in input order and write records.json, rejects.jsonl and report.json."""
    out = config.out
    rejected = {r: 0 for r in rewrite.REASONS}
    by_source: dict[str, dict] = {}
    seen: set = set()
    inputs: list[dict] = []
    sizes: dict[str, int] = {}
    total = {"prompt_tokens": 0, "completion_tokens": 0}
    dropped_turns = 0  # dialogues: a doctor turn before the first patient turn, an unanswered last patient turn
    writer = JsonArrayWriter(out / RECORDS)
    rejects = JsonLinesWriter(out / REJECTS)
    try:
        for b in iter_blocks(config, measure, inputs, sizes):
            k = block_key(b, settings, identity)
            row = done.get(k)
            for t in total:
                total[t] += row["usage"][t]
            turns, reason, detail = judge(row, b, checks, seen)
            s = by_source.setdefault(record_source(b, settings.mode), {"blocks": 0, "written": 0, "rejected": 0})
            s["blocks"] += 1
            if reason:
                rejected[reason] += 1
                s["rejected"] += 1
                gen = {n: row[n] for n in ("question", "answer", "reply") if n in row}
                rejects.write({"where": b.where, "key": k, "reason": reason, "detail": detail, **gen})
                continue
            writer.write(release_record(turns, b, settings.mode))
            s["written"] += 1
            dropped_turns += row.get("_dropped_turns", 0)
    except BaseException:
        writer.abort()
        rejects.abort()
        raise
    writer.close()
    rejects.close()
    report = {
        "format_version": 1,
        "mode": settings.mode,
        "settings": {
            **identity, **settings.generation(), "block_unit": config.block_unit, "block_sizes": sizes,
            "merge_paragraphs": not config.no_merge, "min_question_chars": checks.min_question_chars,
            "min_answer_chars": checks.min_answer_chars, "min_script_share": checks.min_script_share,
            "copy_share": checks.copy_share, "embedded_sample": config.sample, "limit": config.limit,
        },
        "inputs": inputs,
        "blocks": {"read": counts["read"], "generated_now": counts["generated"], "resumed": counts["resumed"],
                   "repeated": counts["repeated"]},
        ("pairs_written" if settings.mode == "qa" else "dialogues_written"): writer.count,
        "rejected": rejected,
        "rejected_total": sum(rejected.values()),
        "by_source": dict(sorted(by_source.items())),
        **({"dialogue_turns_dropped": dropped_turns} if settings.mode == "dialogue" else {}),
        "tokens": {"prompt": total["prompt_tokens"], "completion": total["completion_tokens"]},
        "tokens_this_run": {"prompt": now["prompt_tokens"], "completion": now["completion_tokens"]},
        "files": {"records": RECORDS, "rejects": REJECTS, "done": DONE},
    }
    write_json(out / REPORT, report)
    return report


def _print_summary(report: dict, out: Path, t: dict) -> None:
    s, b = report["settings"], report["blocks"]
    who = s.get("model") or f"{s.get('api_model')} at {s.get('api_base')}"
    written = report.get("pairs_written", report.get("dialogues_written"))
    what = "QA pairs" if report["mode"] == "qa" else "dialogues"
    print(f"[make_qa] {b['read']} blocks from {len(report['inputs'])} file(s), mode {report['mode']}, {who} -> {out}")
    print(f"  generated {b['generated_now']} blocks now, {b['resumed']} resumed, {b['repeated']} repeating an "
          f"earlier block's text; wrote {written} {what} to {out / RECORDS}")
    reasons = {k: v for k, v in report["rejected"].items() if v}
    print(f"  rejected {report['rejected_total']}" + (f" ({', '.join(f'{k} {v}' for k, v in reasons.items())}; "
                                                      f"see {REJECTS})" if reasons else ""))
    tok, now = report["tokens"], report["tokens_this_run"]
    print(f"  tokens: prompt {tok['prompt']}, completion {tok['completion']} (this run: {now['prompt']} / "
          f"{now['completion']})")
    print(f"  time: load {t['load']:.1f}s, generate {t['generate']:.1f}s; done in {t['total']:.1f}s")
    print(f"  next: 2.data_process_train.sh --data {out / RECORDS} [--data ...]")


def main(argv: list[str] | None = None) -> int:
    from src.common import cli
    from src.common.openai_client import ApiError

    try:
        run(MakeQAConfig.from_args(build_parser().parse_args(argv)))
    except ApiError as e:  # the server failed for good (after retries): say so on one line, exit 2
        return cli.report(UsageError("--api-base", str(e)))
    except (DataError, ValueError, FileNotFoundError, FileExistsError) as e:
        return cli.report(e)
    return 0


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
