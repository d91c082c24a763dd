"""Step 3 pieces in one process (no DeepSpeed): collator, data plan, optimizer groups, schedule, checkpoint files,
and packed rows == unpacked documents."""
from __future__ import annotations

import json
import math

import pytest
import torch

from src.train import checkpoint as ckpt
from src.train.data import BatchPlan, Collator, document_lengths
from src.train.optim import build_optimizer, build_scheduler, cosine_multiplier, no_decay_names, warmup_steps
from src.train.dev_eval import dev_metrics, load_dev
from src.train.steps import token_losses

PAD = 7


def _row(docs, lang=0, prompt=2):
    """A packed row from token-id lists: position ids restart per document, the first ``prompt`` tokens of each
    document carry no loss."""
    ids, labels, pos, langs = [], [], [], []
    for d in docs:
        ids += d
        labels += [-100] * prompt + d[prompt:]
        pos += list(range(len(d)))
        langs += [lang] * len(d)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "language_ids": langs}


def test_collator_pads_as_its_own_document():
    rows = [_row([[11, 12, 13, 14], [21, 22, 23]], lang=3), _row([[31, 32, 33]], lang=5)]
    b = Collator(PAD, with_language_ids=True)(rows)
    assert b["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23], [31, 32, 33, PAD, PAD, PAD, PAD]]
    # position ids restart for the padding, which is therefore a document of its own
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 0, 1, 2, 3]]
    assert b["labels"].tolist() == [[-100, -100, 13, 14, -100, -100, 23], [-100, -100, 33, -100, -100, -100, -100]]
    assert b["language_ids"].tolist() == [[3] * 7, [5, 5, 5, -1, -1, -1, -1]]
    assert b["num_tokens"] == 10
    assert b["doc_len_sq"] == 16 + 9 + 9


def test_collator_masks_labels_at_document_starts():
    # A document whose first token has a label (e.g. pretraining text): it cannot be predicted from inside its own
    # document, and with the causal shift it would be predicted from the previous packed document.
    rows = [_row([[11, 12, 13], [21, 22, 23]], prompt=0)]
    b = Collator(PAD)(rows)
    assert b["labels"].tolist() == [[-100, 12, 13, -100, 22, 23]]
    assert "language_ids" not in b


def test_collator_flatten_for_varlen_attention():
    rows = [_row([[11, 12, 13, 14], [21, 22]]), _row([[31, 32, 33]])]
    b = Collator(PAD, flatten=True, with_language_ids=True)(rows)
    assert b["input_ids"].shape == (1, 9)
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert b["cu_seq_lens_q"].tolist() == [0, 4, 6, 9] and b["cu_seq_lens_q"].dtype == torch.int32
    assert b["max_length_q"] == b["max_length_k"] == 4
    assert b["labels"][0, 6].item() == -100  # the second row's first token is not predicted across rows


def test_collator_without_position_ids_and_errors():
    b = Collator(PAD)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    assert b["position_ids"].tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="labels"):
        Collator(PAD)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="language_ids"):
        Collator(PAD, with_language_ids=True)([{"input_ids": [1, 2], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="pad token"):
        Collator(None)
    assert document_lengths(torch.tensor([0, 1, 2, 0, 1, 0])) == [3, 2, 1]


def test_batch_plan_order_sharding_and_resume():
    plan = BatchPlan(num_rows=23, world_size=2, batch_size=2, grad_accum=3)
    assert plan.rows_per_micro_step == 4 and plan.micro_steps_per_epoch == 5 and plan.dropped_rows_per_epoch == 3
    assert plan.steps_per_epoch == 2 and plan.micro_steps_in(0) == 3 and plan.micro_steps_in(1) == 2
    # global micro-batch m = rows [4m, 4m + 4) in the stored order, rank r takes its r-th slice
    assert plan.rows(0, 0) == [0, 1] and plan.rows(0, 1) == [2, 3] and plan.rows(4, 1) == [18, 19]
    seen = sorted(i for r in range(2) for b in plan.batches(r) for i in b)
    assert seen == list(range(20))
    # resuming at step 1 regenerates exactly the remaining batches
    assert plan.batches(1, 1) == plan.batches(1)[3:]
    with pytest.raises(ValueError, match="cannot fill"):
        BatchPlan(num_rows=3, world_size=2, batch_size=2, grad_accum=1)


def test_no_weight_decay_on_biases_and_norms(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = no_decay_names(model)
    assert names and all("norm" in n or n.endswith(".bias") for n in names)
    assert "model.norm.weight" in names and "model.layers.0.input_layernorm.weight" in names
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decays = sorted(g["weight_decay"] for g in opt.param_groups)
    assert decays == [0.0, 0.1]
    n_no_decay = sum(p.numel() for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"])
    assert n_no_decay == sum(p.numel() for n, p in model.named_parameters() if n in names)


def test_cosine_schedule_warms_up_and_ends_at_zero():
    total = 100
    w = warmup_steps(total, 0.03)
    assert w == 3
    mult = [cosine_multiplier(s, total, w) for s in range(total + 1)]
    assert mult[0] > 0  # no update at lr 0
    assert mult[:w + 1] == sorted(mult[:w + 1]) and mult[w] == 1.0
    assert all(a >= b for a, b in zip(mult[w:], mult[w + 1:]))
    assert 0 < mult[total - 1] < 1e-3 and mult[total] == 0.0  # decays to 0 at the real end, no hidden extra epoch
    assert math.isclose(mult[w + (total - w) // 2], 0.5, abs_tol=0.02)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-5)
    sched = build_scheduler(opt, total, 0.03)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(1e-5) and sched.get_last_lr()[0] == 0.0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_unpacked_per_document_loss(tiny_model_dir, attn):
    """Documents packed in one row (position ids, no attention mask, no cache) get exactly the loss they get alone:
    transformers builds the block-diagonal document mask from the position ids. Padding too is its own document."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(100, 4000, (n,), generator=g).tolist() for n in (9, 14, 6, 11)]
    rows = [_row(docs[:3]), _row(docs[3:])]  # the second row is padded to the first's length
    batch = Collator(PAD)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    losses, shift = token_losses(logits, batch["labels"])
    packed, t = [], 0
    for r, row_docs in enumerate([docs[:3], docs[3:]]):
        t = 0
        for d in row_docs:
            packed.append(losses[r, t:t + len(d)][shift[r, t:t + len(d)] != -100])
            t += len(d)
    alone = []
    for d in docs:
        b = Collator(PAD)([_row([d])])
        with torch.no_grad():
            lg = model(input_ids=b["input_ids"], use_cache=False).logits
        lo, sh = token_losses(lg, b["labels"])
        alone.append(lo[0][sh[0] != -100])
    for p, a in zip(packed, alone):
        assert p.shape == a.shape and p.numel() > 0
        torch.testing.assert_close(p, a, atol=1e-5, rtol=1e-5)
    # the test has teeth: without the per-document position ids, the later documents see the earlier ones
    with torch.no_grad():
        naive = model(input_ids=batch["input_ids"][:1], use_cache=False).logits
    lo, sh = token_losses(naive, batch["labels"][:1])
    second = lo[0, 9:23][sh[0, 9:23] != -100]
    assert not torch.allclose(second, alone[1], atol=1e-3)


def test_checkpoint_listing_rotation_and_stale_folders(tmp_path):
    for step in (2, 4, 6, 10):
        d = tmp_path / f"checkpoint-{step}"
        (d / ckpt.STATE_DIR).mkdir(parents=True)
        (d / ckpt.STATE_FILE).write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint-12").mkdir()  # no trainer state: incomplete, never picked
    (tmp_path / ".tmp-checkpoint-14").mkdir()  # an interrupted save
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 6, 10]  # by step, not by name order
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert ckpt.resolve_resume("latest", tmp_path).name == "checkpoint-10"
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("latest", tmp_path / "empty") is None
    with pytest.raises(FileNotFoundError, match="not a complete"):
        ckpt.resolve_resume(str(tmp_path / "checkpoint-12"), tmp_path)
    removed = ckpt.rotate(tmp_path, 2)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-4"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 10]
    assert ckpt.rotate(tmp_path, 0) == []
    assert [p.name for p in ckpt.clean_stale(tmp_path)] == [".tmp-checkpoint-14"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_dev_subset_and_metrics(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "source": "s", "prompt": "p", "answer": "A", "letters": ["A", "B"],
                                        "language": "en" if i < 50 else "zh"}) + "\n" for i in range(100)))
    sub = load_dev(path, 4)
    assert [r["id"] for r in sub] == ["0", "25", "50", "75"] and {r["language"] for r in sub} == {"en", "zh"}
    assert len(load_dev(path, None)) == 100
    m = dev_metrics({"accuracy_items": 0.5, "major_average": {"accuracy": 0.4, "ci95": [0, 1]}, "minor_average": None,
                     "languages": {"en": {"accuracy": 0.25, "right": 1}, "zh": {"accuracy": 0.75}}})
    assert m == {"dev/accuracy": 0.5, "dev/major_average/accuracy": 0.4, "dev/language/en/accuracy": 0.25,
                 "dev/language/zh/accuracy": 0.75}
