"""Shared fixtures. Every test runs offline; tests on the real data in ../shared skip when it is absent."""
from __future__ import annotations

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "xmedbench"
SAMPLE = ROOT / "assets" / "sample"


def free_port() -> int:
    """A free local TCP port (for a server or a rendezvous the test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model_dir: Path, log_dir: Path, timeout: float = 240):
    """Yield a real `transformers serve` (scripts/serve.sh) of ``model_dir`` on a free local port, one thread (two
    wait for each other on a shared CPU); stopped, and checked stopped, when the fixture using it ends."""
    from src.serving.launch import ROOT_SCRIPT, ServerProcess

    port = free_port()
    log = Path(log_dir) / "serve.log"
    proc = ServerProcess(["bash", str(ROOT_SCRIPT), "--model", str(model_dir), "--port", str(port), "--engine",
                          "transformers"], "127.0.0.1", port, log=log, env={"OMP_NUM_THREADS": "1"})
    try:
        proc.start(timeout=timeout)
    except RuntimeError as e:
        pytest.fail(f"{e}:\n{log.read_text()[-2000:]}")
    yield proc
    proc.stop()
    assert proc.proc.poll() is not None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real XMedBench slice beside the checkout (absent on a user's machine: the test is skipped)."""
    if not (SHARED / "bench_test.json").is_file():
        pytest.skip("../shared/data/xmedbench is not present")
    return SHARED


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model as an HF folder (converted from the GGUF file once, as step 0 does)."""
    from src.common.defaults import DEFAULT_MODEL_NAME
    from src.download.embedded import convert_gguf

    path = ROOT / "models" / DEFAULT_MODEL_NAME
    convert_gguf(path)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def make_tiny_llama(tokenizer, out_dir: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """A tiny random Llama-architecture model with a real tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer: fast enough for any CPU test."""
    return make_tiny_llama(smollm2_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on a
    shared 2-core machine every parallel op otherwise waits for a free core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def rows(tmp_path_factory) -> Path:
    """16 packed rows drawn from a 30-token vocabulary (step 3 runs of the fault tests: a tiny model learns them)."""
    import random

    import datasets

    rng = random.Random(1)
    vocab = [rng.randrange(200, 4000) for _ in range(30)]
    out = []
    for _ in range(16):
        doc = [rng.choice(vocab) for _ in range(rng.randint(10, 20))]
        out.append({"input_ids": doc, "labels": [-100] * 2 + doc[2:], "position_ids": list(range(len(doc)))})
    path = tmp_path_factory.mktemp("rows") / "train"
    datasets.Dataset.from_list(out).save_to_disk(str(path))
    return path
