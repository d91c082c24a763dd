"""The terminal chat and the web chat work on every kind of checkpoint the project makes: dense, Post-MoE, a LoRA
adapter folder, the merged adapter, the stock Qwen2-MoE export, an average of checkpoints and a proxy-tuned trio. Each
is opened through the one loader (src/models/loading.py) by ``open_chat`` and answers through the generation interface;
the terminal chat's ``reply`` and the web page's ``replies`` stream the same greedy text as the checkpoint's own
greedy decode."""
from __future__ import annotations

import io

import pytest
import torch

from src.evaluate.chat_core import ChatSettings, open_chat
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUESTION = "What causes iron-deficiency anaemia?"
GREEDY = ChatSettings(greedy=True, repetition_penalty=1.0, max_new_tokens=6)


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, smollm2_tokenizer) -> dict:
    """One folder (or, for proxy-tuning, three) of every kind, all with SmolLM2's tokenizer."""
    from peft import LoraConfig, get_peft_model

    from src.models import moe, moe_export
    from src.models.loading import load_model, load_tokenizer
    from util.average_checkpoints import save_average
    from util.merge_lora import merge

    root = tmp_path_factory.mktemp("kinds")
    dense = make_tiny_llama(smollm2_tokenizer, root / "dense", seed=1)
    other = make_tiny_llama(smollm2_tokenizer, root / "other", seed=2)
    tok = load_tokenizer(dense)
    upcycled = moe.upcycle(load_model(dense), num_experts=3, top_k=2, moe_layers=1)
    post_moe = moe.save_moe(upcycled, tok, root / "post_moe")
    moe_export.export_qwen2_moe(upcycled, root / "stock", tok)
    torch.manual_seed(3)
    lora = get_peft_model(load_model(dense), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    lora.save_pretrained(root / "adapter")
    tok.save_pretrained(root / "adapter")
    merge(root / "adapter", root / "merged")
    save_average([dense, other], root / "average")
    return {"dense": (dense,), "post_moe": (post_moe,), "adapter": (root / "adapter",), "merged": (root / "merged",),
            "stock_export": (root / "stock",), "average": (root / "average",), "proxy_tuned": (dense, other, dense)}


def _open(paths) -> object:
    if len(paths) == 3:
        return open_chat(str(paths[0]), proxy_tuned=str(paths[1]), proxy_raw=str(paths[2]), max_new_tokens=6)
    return open_chat(str(paths[0]), max_new_tokens=6)


@pytest.mark.parametrize("kind", ["dense", "post_moe", "adapter", "merged", "stock_export", "average",
                                  "proxy_tuned"])
def test_every_checkpoint_kind_chats_in_the_terminal_and_on_the_web_page(kinds, kind):
    from src.evaluate import web_demo
    from src.evaluate.cli_demo import reply

    chat = _open(kinds[kind])
    assert chat.fmt.name == "template"  # SmolLM2's chat template, also for the stock export (its recorded format)
    prompt = chat.prompt([], QUESTION)
    want = _greedy_tokens(chat, prompt.ids)
    text, finish, n = chat.reply(QUESTION, GREEDY)
    assert n == len(want) and text == chat.tokenizer.decode(want, skip_special_tokens=True).strip()
    assert finish == ("length" if n == GREEDY.max_new_tokens else "stop")
    out = io.StringIO()
    assert reply(chat, [], QUESTION, GREEDY, out=out) == text
    shown = list(web_demo.replies(chat, QUESTION, [], GREEDY))
    assert shown and shown[-1].strip() == text


def test_the_proxy_trio_decodes_base_plus_offset(kinds):
    """Proxy-tuning is not the dense model: with base == raw the offset is the tuned model's, so the chat follows
    the tuned model's greedy text."""
    dense, other, _ = kinds["proxy_tuned"]
    proxy = _open((dense, other, dense)).reply(QUESTION, GREEDY)
    tuned = _open((other,)).reply(QUESTION, GREEDY)
    assert proxy == tuned


@torch.no_grad()
def _greedy_tokens(chat, ids: list[int]) -> list[int]:
    """The checkpoint's own greedy decode (full forward each step, no cache), stopped by the chat's stop tokens."""
    model = chat.backend.model
    seq, out = torch.tensor([ids]), []
    for _ in range(GREEDY.max_new_tokens):
        token = int(model(input_ids=seq).logits[0, -1].argmax())
        if token in chat.stop_ids:
            break
        out.append(token)
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return out
