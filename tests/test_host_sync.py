"""Host synchronisations (src/common/host_sync.py): what the counter counts, none per Post-MoE layer (routing, expert
dispatch, routing statistics), and at most one per decoding step of step 4's engine. Tiny models, CPU: the counter
counts what would make a GPU's host wait, whatever the device."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_moe import batch, tiny, tiny_moe  # noqa: E402

from src.common.host_sync import HostSyncCounter  # noqa: E402
from src.models import moe  # noqa: E402


def count(fn) -> HostSyncCounter:
    with HostSyncCounter() as c:
        fn()
    return c


def test_counter_counts_what_makes_the_host_wait():
    x = torch.arange(6.0)
    assert count(lambda: x.sum().item()).by_kind == {"item": 1}
    assert count(lambda: bool(x.any())).by_kind == {"item": 1}
    assert count(lambda: x.tolist()).by_kind == {"to_host": 1}
    assert count(lambda: x[x > 2]).by_kind == {"shape": 1}  # boolean mask: the size depends on the data
    assert count(lambda: torch.bincount(x.long())).by_kind == {"shape": 1}
    assert count(lambda: torch.tensor([1, 2], device="cpu")).by_kind == {"to_device": 1}
    assert count(lambda: torch.tensor([1, 2]).to("cpu")).by_kind == {"to_device": 1}
    # host data read on the host, a copy that does not wait, and device-side work are free
    assert count(lambda: torch.tensor([1, 2]).tolist()).syncs == 0
    assert count(lambda: torch.tensor([1, 2]).to("cpu", non_blocking=True)).syncs == 0
    c = count(lambda: (x * 2).argsort().cumsum(0).repeat_interleave(2))
    assert c.syncs == 0 and c.ops >= 4


@pytest.mark.parametrize("training", [False, True])
def test_post_moe_layers_cost_no_host_sync(training):
    """The upcycled model's forward waits exactly as often as its dense model's (what transformers itself does
    around the layers): routing, expert dispatch (grouped GEMM with offsets on the device) and the routing
    statistics add none, with and without language ids."""
    input_ids, language_ids = batch(shape=(2, 12))
    mask = (language_ids >= 0).long()
    dense = tiny("qwen2").train(training)
    model = tiny_moe("qwen2", moe_layers=2).train(training)
    assert len(moe.sparse_blocks(model)) == 2

    def forward(m, **kw):
        return lambda: m(input_ids=input_ids, attention_mask=mask, **kw)

    baseline = count(forward(dense)).syncs
    assert count(forward(model)).syncs == baseline
    with moe.RoutingStats(model) as stats:
        assert count(forward(model, language_ids=language_ids)).syncs == baseline
        assert count(forward(model)).syncs == baseline
    counts = stats.counts  # read back once, here
    for layer in moe.moe_settings(model).moe_layers:
        per_language = {lang: int(c.sum()) for lang, c in counts[layer].items()}
        # real tokens x k selections: row 0 (language 0) has 12 tokens, row 1 (language 1) 9, and the forward
        # without ids counts the 21 real tokens of the attention mask under None
        assert per_language == {0: 24, 1: 18, None: 42}


def test_routing_stats_refuse_ids_beyond_their_table():
    model = tiny_moe("qwen2")
    input_ids, language_ids = batch()
    with moe.RoutingStats(model, max_language_ids=1) as stats:
        model(input_ids=input_ids, language_ids=language_ids)
    with pytest.raises(ValueError, match="max_language_ids=1"):
        _ = stats.counts
