"""Serve a checkpoint through an OpenAI-compatible engine (``scripts/serve.sh``).

    scripts/serve.sh --model CKPT [--engine auto|vllm|transformers] [--host 127.0.0.1] [--port 8000] [-- ENGINE FLAGS]

``auto`` picks ``vllm serve`` when vLLM is importable and a GPU is present (tensor/data-parallel and any other flags
after ``--`` go to it unchanged), otherwise ``transformers serve``. A dense folder is served as it is. A Post-MoE
checkpoint of ours is exported to transformers' own classes first (``src/models/moe.py``; Qwen2-based checkpoints
become ``Qwen2MoeForCausalLM`` in ``CKPT-stock/``, reused while it is newer than the checkpoint); for other bases the
script refuses and says what to do. Prints the base URL once the server answers ``GET /health``; Ctrl-C (or SIGTERM)
stops the server and exits.

``ServerProcess`` is the same thing from Python (the tests and the benchmark start and stop servers with it).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from src.common.config import StepConfig, setting
from src.common.defaults import DEFAULT_MODEL, ROOT, repo_relative
from src.common.errors import UsageError

ENGINES = ("auto", "vllm", "transformers")
ROOT_SCRIPT = ROOT / "scripts" / "serve.sh"


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def choose_engine(engine: str) -> str:
    if engine != "auto":
        return engine
    return "vllm" if importlib.util.find_spec("vllm") is not None and has_gpu() else "transformers"


def stock_checkpoint(model: str) -> str:
    """A folder stock engines can load: ``model`` itself, or for a Post-MoE checkpoint its export to stock classes
    (made once). Raises SystemExit with the way out when there is no export for its base architecture."""
    path = Path(model)
    config = path / "config.json"
    if not config.is_file():
        return model  # a hub id or a folder the engine will judge itself
    from src.models import moe

    if not moe.is_moe_checkpoint(path):
        return model
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if model_type != "qwen2":
        raise SystemExit(f"[serve] {model} is a Post-MoE checkpoint on a {model_type!r} base; src/models/moe.py only "
                         f"exports Qwen2-based ones to stock classes (export_qwen2_moe), so no engine can load it. "
                         f"Score it in-process instead: 4.eval.sh --model {model}")
    out = path.parent / f"{path.name}-stock"
    if (out / "config.json").is_file() and (out / "config.json").stat().st_mtime >= config.stat().st_mtime:
        print(f"[serve] using the stock export {out}", flush=True)
        return str(out)
    from src.models.loading import load_model, load_tokenizer

    print(f"[serve] exporting the Post-MoE checkpoint to Qwen2MoeForCausalLM -> {out}", flush=True)
    moe.export_qwen2_moe(load_model(path, torch_dtype="auto"), out, load_tokenizer(path))
    return str(out)


def engine_command(engine: str, model: str, host: str, port: int, extra: list[str]) -> list[str]:
    if engine == "vllm":
        return ["vllm", "serve", model, "--host", host, "--port", str(port), *extra]
    exe = Path(sys.executable).parent / "transformers"
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", "transformers.cli.transformers"]
    return [*head, "serve", model, "--host", host, "--port", str(port), *extra]


class ServerProcess:
    """Start an engine's server, wait until ``GET /health`` answers, stop it (and everything it started).

    ``own_group`` puts the server in a process group of its own, stopped as a whole (tests, the benchmark); the
    command-line script keeps it in its own group so a terminal's Ctrl-C reaches both."""

    def __init__(self, command: list[str], host: str, port: int, log: Path | None = None, own_group: bool = True,
                 env: dict | None = None):
        self.command, self.host, self.port, self.own_group = command, host, port, own_group
        self.env = None if env is None else {**os.environ, **env}
        self.base_url = f"http://{host}:{port}/v1"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600.0) -> ServerProcess:
        out = open(self.log, "ab") if self.log else None  # None: the server writes to our terminal
        self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=self.own_group, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before it was ready"
                                   + (f" (log: {self.log})" if self.log else ""))
            try:
                if httpx.get(f"http://{self.host}:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()

    def _signal(self, sig) -> None:
        try:
            if self.own_group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class ServeConfig(StepConfig):
    """``scripts/serve.sh``'s flags, and the engine's own flags given after ``--`` (``extra``)."""
    model: str = str(DEFAULT_MODEL)
    engine: str = setting("auto", choices=ENGINES)
    host: str = "127.0.0.1"
    port: int = setting(8000, at_least=0)
    timeout: float = setting(900.0, at_least=1.0)
    extra: list = setting(default_factory=list)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/serve.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help=f"checkpoint folder or hub id (default: {repo_relative(DEFAULT_MODEL)})")
    p.add_argument("--engine", choices=ENGINES, default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the server (%(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = ServeConfig.from_args(build_parser().parse_args(argv), extra=extra)
    if Path(args.model).parts[:1] in (("models",), ("ckpts",)) and not Path(args.model).exists():
        raise UsageError("--model", f"model folder {args.model!r} not found (run 0.download_data.sh, or step 3)")
    from src.models.loading import check_model_source

    check_model_source(args.model, weights=True)  # a bad folder is one line here, not a server that never starts
    engine = choose_engine(args.engine)
    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UsageError("--engine", "vllm: vLLM is not installed (pip install vllm on a GPU node)")
    model = stock_checkpoint(args.model)
    server = ServerProcess(engine_command(engine, model, args.host, args.port, args.extra), args.host, args.port,
                           own_group=False)
    print(f"[serve] starting {engine} serve {model} on {args.host}:{args.port} ...", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.start(args.timeout)
        print(f"[serve] ready: {server.base_url} (model name: {model}); Ctrl-C stops it", flush=True)
        server.proc.wait()
        print(f"[serve] the server exited with code {server.proc.returncode}", flush=True)
        return server.proc.returncode or 0
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
        return 0
    except RuntimeError as e:
        print(f"[serve] {e}", file=sys.stderr)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    from src.common import cli

    sys.exit(cli.run(main))
