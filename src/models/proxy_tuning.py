"""Proxy-tuning: decode a large base model with the logit offset of a small tuned/untuned pair.

At every step ``logits = base + (tuned - raw)`` (Liu et al., 2024; the Apollo paper's decoding-time transfer), so a
big model inherits what fine-tuning taught the small one without being trained itself.

``ProxyTuned`` is called like a causal LM (``__call__(input_ids, attention_mask, position_ids, past_key_values,
use_cache)`` returning an object with ``.logits`` and ``.past_key_values``), so decoding loops written against that
protocol (step 4's engine, the chat demo) use it unchanged. Its cache is the tuple of the three models' caches.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch


def check_same_tokenizer(tokenizers: dict[str, object]) -> None:
    """The three models must share one vocabulary, or the logit arithmetic mixes unrelated tokens."""
    names = list(tokenizers)
    ref_name, ref = names[0], tokenizers[names[0]]
    ref_vocab = ref.get_vocab()
    for name in names[1:]:
        tok = tokenizers[name]
        vocab = tok.get_vocab()
        if vocab != ref_vocab:
            only = sorted(set(vocab.items()) ^ set(ref_vocab.items()))[:5]
            raise ValueError(
                f"proxy-tuning needs identical tokenizers, but {name!r} and {ref_name!r} differ "
                f"({len(vocab)} vs {len(ref_vocab)} entries; e.g. {only})")
        for attr in ("bos_token_id", "eos_token_id"):
            if getattr(tok, attr) != getattr(ref, attr):
                raise ValueError(f"proxy-tuning: {attr} differs between {name!r} and {ref_name!r}")


class ProxyTuned(torch.nn.Module):
    def __init__(self, base, tuned, raw):
        super().__init__()
        self.base, self.tuned, self.raw = base, tuned, raw
        # Models of one family can pad their embedding matrices to different sizes (Qwen2-0.5B: 151,936 rows,
        # Qwen2-7B: 152,064); the shared tokenizer only uses the common leading rows.
        self.vocab_size = min(m.get_output_embeddings().weight.shape[0] for m in (base, tuned, raw))

    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                **kwargs):
        caches = past_key_values if past_key_values is not None else (None, None, None)
        outs = []
        for model, cache in zip((self.base, self.tuned, self.raw), caches):
            # The small models may live on another device than the base model.
            dev = model.device
            outs.append(model(input_ids=input_ids.to(dev),
                              attention_mask=None if attention_mask is None else attention_mask.to(dev),
                              position_ids=None if position_ids is None else position_ids.to(dev),
                              past_key_values=cache, use_cache=use_cache, **kwargs))
        v = self.vocab_size
        base, tuned, raw = (o.logits[..., :v].float().to(self.device) for o in outs)
        logits = base + (tuned - raw)
        return SimpleNamespace(logits=logits,
                               past_key_values=tuple(o.past_key_values for o in outs) if use_cache else None)

    def forward_step(self, input_ids, attention_mask, position_ids, past_key_values, logits_to_keep=1):
        """The custom engine's ``StepModel`` protocol (src/generation/engine.py): last positions' logits and cache."""
        out = self(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=past_key_values, use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits, out.past_key_values


def load_proxy_tuned(base_path, tuned_path, raw_path, torch_dtype=None, device=None):
    """Load the three models and their tokenizers; returns (ProxyTuned, the base tokenizer)."""
    from src.models.loading import load_model, load_tokenizer

    paths = {"base": base_path, "tuned": tuned_path, "raw": raw_path}
    tokenizers = {name: load_tokenizer(p) for name, p in paths.items()}
    check_same_tokenizer(tokenizers)
    models = [load_model(p, torch_dtype=torch_dtype, device=device).eval() for p in paths.values()]
    return ProxyTuned(*models).eval(), tokenizers["base"]
