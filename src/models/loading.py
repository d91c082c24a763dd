"""One way to load any checkpoint the project handles: a dense HF model (local folder or hub id), a Post-MoE
checkpoint written by ``src.models.moe``, its stock export (``src.models.moe_export``), a LoRA adapter folder
(``src.models.adapter``), a merged or averaged checkpoint. Every stage (steps 1-4, training, the chats, the server
launcher, the tools) reads configs, tokenizers and weights through here:

* ``load_config``: the transformers config (our Post-MoE folders: the base config with its post_moe field; an adapter
  folder: its base's);
* ``load_tokenizer``: the tokenizer, with a pad token (an adapter folder without one: its base's);
* ``load_tokenizer_and_format``: the tokenizer and the chat format resolved for the model (steps 1 and 2, the chats,
  the serving backend);
* ``load_model``: the weights (safetensors only, checked whole first: integrity.py), in the one dtype policy.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from src.models import integrity


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (bf16 is ~17x slower on CPUs without bf16 hardware, see docs/stack.md)."""
    device = torch.device(device) if device is not None else None
    return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32


def _moe_config_kwargs(name_or_path) -> dict:
    """{"config": base config} for one of our MoE folders: transformers cannot read their config.json (by design,
    see src.models.moe.MOE_MODEL_TYPE) and would otherwise warn while looking for the tokenizer class."""
    from src.models import moe

    if Path(str(name_or_path)).is_dir() and moe.is_moe_checkpoint(name_or_path):
        return {"config": moe.base_config(name_or_path)}
    return {}


def load_config(name_or_path):
    """The model's transformers config; for our MoE folders the base model's config (with its post_moe field), for an
    adapter folder its base's."""
    from transformers import AutoConfig

    from src.models import adapter

    if adapter.is_adapter_dir(name_or_path):
        return load_config(adapter.adapter_base(name_or_path))
    return _moe_config_kwargs(name_or_path).get("config") or AutoConfig.from_pretrained(name_or_path)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_model_source(name_or_path, *, weights: bool, flag: str = "--model") -> None:
    """One-line errors instead of transformers' ("Repo id must be in the form ...", "Couldn't instantiate the backend
    tokenizer") for a model that cannot load: a missing folder, a folder that holds no model (a data or results
    folder), a hub id while offline and not cached, or (``weights``) a folder without safetensors weights (pickled
    weights, pytorch_model.bin, are never loaded, since unpickling can run code), with a truncated weight file, or
    whose weight files differ from the digests its checkpoint recorded (integrity.py)."""
    from src.common.errors import UsageError

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        require_model_folder(path, flag, weights=weights)
        if weights:
            require_safetensors(path, flag)
            integrity.check_weights(path)
        return
    if path.exists():
        raise UsageError(flag, f"{name}: not a folder (a model is an HF folder or a hub id ORG/NAME)")
    parts = name.split("/")
    if name.startswith(("/", ".", "~")) or len(parts) != 2 or Path(parts[0]).is_dir():
        raise UsageError(flag, f"no such model folder: {name}")
    if _offline() and not _in_hub_cache(name):
        raise UsageError(flag, f"{name}: not a local folder, and the hub is offline (HF_HUB_OFFLINE=1) with no "
                               f"cached copy of it")


MODEL_FILES = ("config.json", "adapter_config.json")  # a model folder, or a LoRA adapter folder
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # enough where only the tokenizer is read


def require_model_folder(path: Path, flag: str = "--model", *, weights: bool = True) -> None:
    """A folder given as a model must hold one (a data or results folder fails here, not deep in transformers)."""
    from src.common.errors import UsageError

    wanted = MODEL_FILES + (() if weights else TOKENIZER_FILES)
    if not any((path / name).is_file() for name in wanted):
        raise UsageError(flag, f"not a model folder: no config.json / {'weights' if weights else 'tokenizer'} in "
                               f"{path}")


def require_safetensors(path: Path, flag: str = "--model") -> None:
    from src.common.errors import UsageError

    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    found = (f": it has {', '.join(pickles)}, pickled weights, which are never loaded (unpickling can run code); "
             f"convert them to safetensors first") if pickles else ""
    raise UsageError(flag, f"{path}: no safetensors weights{found}")


def _offline() -> bool:
    import os

    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache counts as no cache
        return False


def load_tokenizer(name_or_path, padding_side: str = "left"):
    """The model's tokenizer with a pad token (EOS when it has none) and the requested padding side."""
    from transformers import AutoTokenizer

    from src.models import adapter

    check_model_source(name_or_path, weights=False)
    if adapter.is_adapter_dir(name_or_path) and not adapter.has_tokenizer(name_or_path):
        name_or_path = adapter.adapter_base(name_or_path)  # a bare peft adapter: its base's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **_moe_config_kwargs(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer_and_format(name_or_path, fmt_name: str | None = None):
    """(tokenizer, chat format) of a model folder or hub id, without its weights: the format named by ``fmt_name``,
    else the one recorded in the config or derived from the model type and tokenizer (``resolve_format``). A
    tokenizer-only folder gets its format from the tokenizer alone."""
    from src.common.chat_formats import resolve_format

    tokenizer = load_tokenizer(name_or_path)
    try:
        config = load_config(name_or_path)
    except (OSError, ValueError):  # a tokenizer-only folder
        config = None
    return tokenizer, resolve_format(tokenizer, config, fmt_name)


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenizer's ids mean: a sha256 of its vocabulary (every token with its id, added tokens included)
    and of its BOS, EOS and unknown-token ids. Step 2 records it in mixture.json, step 3 compares it with its
    --model's: rows of another vocabulary would train on ids that mean other tokens. (The pad token is left out:
    ``load_tokenizer`` sets one where the tokenizer has none, without changing any id.)"""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    special = [getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk")]
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode("utf-8")).hexdigest()


def load_model(name_or_path, torch_dtype: torch.dtype | str | None = None, device=None, **kwargs):
    """Load a causal LM for inference or training, in the dtype ``resolve_dtype`` gives; MoE checkpoints of ours are
    detected from their config, LoRA adapter folders from their adapter_config.json (loaded on their base and merged,
    ``load_adapter``). ``kwargs`` go to transformers' ``from_pretrained`` for a dense model (QLoRA's
    ``quantization_config`` and ``device_map``)."""
    check_model_source(name_or_path, weights=True)
    dtype = resolve_dtype(torch_dtype, name_or_path, device)
    try:
        model = _load(name_or_path, dtype, **kwargs)
    except SafetensorError as e:  # a hub id's cached file (local folders were checked file by file above)
        from src.common.errors import BadFile

        raise BadFile(name_or_path, f"damaged safetensors weights ({e}): download or copy the model again") from None
    return model.to(device) if device is not None else model


def _load(name_or_path, dtype: torch.dtype, **kwargs):
    from src.models import adapter, moe

    if adapter.is_adapter_dir(name_or_path):
        return load_adapter(name_or_path, torch_dtype=dtype)
    if Path(str(name_or_path)).is_dir() and moe.is_moe_checkpoint(name_or_path):
        if kwargs:
            raise ValueError(f"{name_or_path}: a Post-MoE checkpoint is loaded whole (no {', '.join(kwargs)})")
        return moe.load_moe(name_or_path, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, use_safetensors=True, **kwargs)


def load_adapter(path, torch_dtype: torch.dtype | None = None, merge: bool = True):
    """A LoRA adapter folder: its base (through ``load_model``, so Post-MoE bases work) with the adapter applied;
    merged into plain weights by default (no LoRA cost at inference, and the result is an ordinary transformers
    model)."""
    from peft import PeftModel

    from src.models import adapter

    if not (Path(path) / adapter.ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: no {adapter.ADAPTER_WEIGHTS} beside {adapter.ADAPTER_CONFIG}")
    base = load_model(adapter.adapter_base(path), torch_dtype=torch_dtype)
    model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model


def load_gguf(file: Path):
    """(model, tokenizer) from a GGUF file (the embedded default's, step 0): transformers dequantises it to float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = Path(file)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
    return model, tokenizer


def resolve_dtype(requested: torch.dtype | str | None, name_or_path, device=None) -> torch.dtype:
    """The one dtype policy of every loader: a dtype (or its name, "bfloat16") is used as given; "auto" is the
    checkpoint's own (``checkpoint_dtype``); None is the device's default (``default_dtype``)."""
    if requested is None:
        return default_dtype(device)
    if requested == "auto":
        return checkpoint_dtype(name_or_path)
    return _named_dtype(requested, "torch_dtype") if isinstance(requested, str) else requested


def checkpoint_dtype(name_or_path) -> torch.dtype:
    """The dtype a checkpoint's config.json names (an adapter folder: its base's), float32 when it names none."""
    from src.models import adapter

    if adapter.is_adapter_dir(name_or_path):
        name_or_path = adapter.adapter_base(name_or_path)
    config_file = Path(str(name_or_path)) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
    else:  # a hub id
        from transformers import AutoConfig

        config, config_file = AutoConfig.from_pretrained(name_or_path).to_dict(), f"{name_or_path}: config.json"
    name = config.get("dtype") or config.get("torch_dtype")
    return _named_dtype(name, f"{config_file}: field dtype") if name else torch.float32


def _named_dtype(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{where}: {name!r} is not a torch dtype")
    return dtype
