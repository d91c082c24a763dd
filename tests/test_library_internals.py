"""Pins on the library internals the project leans on (docs/stack.md, "Library internals"). Each test fails loudly
when an upgrade of a pinned version changes the behaviour the code relies on, instead of the pipeline going wrong
quietly."""
import torch


def test_attention_dispatches_on_the_config_field_each_call(tiny_model_dir):
    """src/evaluate/attention.py flips ``config._attn_implementation`` around one call: the model must read it per
    forward and route to the registered function."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from src.evaluate import attention

    calls = []

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS.register("pin_counting", counting)
    ALL_MASK_ATTENTION_FUNCTIONS.register("pin_counting", sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = model(ids).logits
        assert attention._attn_impl(model.config) == "sdpa"
        attention._set_attn_impl(model.config, "pin_counting")
        got = model(ids).logits
        attention._set_attn_impl(model.config, "sdpa")
        model(ids)
    assert len(calls) == model.config.num_hidden_layers  # one call per layer, only while switched
    torch.testing.assert_close(got, want)


def test_cache_base_class_replicates_our_layer_lazily():
    """kvcache.SlotCache relies on ``Cache(layer_class_to_replicate=...)`` creating one layer per model layer on the
    first update."""
    from src.evaluate.kvcache import SlotCache, SlotLayer

    cache = SlotCache(reserve=4)
    k = torch.zeros(1, 2, 3, 8)
    for layer in range(3):
        cache.update(k, k, layer)
    assert len(cache.layers) == 3 and all(type(x) is SlotLayer for x in cache.layers)
    assert cache.get_seq_length() == 3


def test_deepspeed_config_weakref_can_be_unset_and_restored():
    """train.no_zero3_init builds a model unpartitioned inside a ZeRO-3 run by clearing transformers' global
    DeepSpeed config reference and letting accelerate's plugin set it again."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1},
                             zero3_init_flag=True)
    plugin.set_deepspeed_weakref()
    assert is_deepspeed_zero3_enabled()
    unset_hf_deepspeed_config()
    assert not is_deepspeed_zero3_enabled()
    plugin.set_deepspeed_weakref()
    assert is_deepspeed_zero3_enabled()
    unset_hf_deepspeed_config()


def test_accelerator_sync_gradients_is_settable():
    """The trainer marks the last micro-batch of a (possibly short) optimizer step itself through
    ``accelerator.sync_gradients``; accelerate must keep that flag in its gradient state, where DeepSpeed's
    boundary check reads it."""
    from accelerate import Accelerator
    from accelerate.state import GradientState

    prop = Accelerator.sync_gradients
    assert isinstance(prop, property) and prop.fset is not None

    class Holder:  # the property's own code on a stand-in, so no global accelerate state is created here
        gradient_state = GradientState()

    holder = Holder()
    try:
        prop.fset(holder, False)
        assert holder.gradient_state.sync_gradients is False and prop.fget(holder) is False
    finally:
        prop.fset(holder, True)


def test_graph_task_id_tells_a_checkpoint_recompute_from_the_forward():
    """moe._in_backward asks torch whether autograd is running a backward pass (a gradient-checkpointed layer being
    recomputed), as torch.utils.checkpoint itself does, so routing statistics are not counted twice."""
    from torch.utils.checkpoint import checkpoint

    from src.models.moe import _in_backward

    seen = []

    def layer(x):
        seen.append(_in_backward())
        return x * x  # the backward needs x: the checkpoint recomputes the layer

    x = torch.ones(3, requires_grad=True)
    checkpoint(layer, x, use_reentrant=False).sum().backward()
    assert seen == [False, True]  # the forward, then the recompute during backward
    assert not _in_backward()


def test_the_output_projection_receives_the_final_hidden_states(tiny_model_dir):
    """loss.final_hidden takes the hidden states at the input of ``get_output_embeddings()`` and projects an empty
    slice instead (transformers 5.23 causal LMs: ``lm_head(norm(last layer))``): they must be the model's final
    hidden states, and the projection of them its logits."""
    from transformers import AutoModelForCausalLM

    from src.train.loss import final_hidden

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = model(ids, output_hidden_states=True)
        with final_hidden(model) as seen:
            out = model(ids)
    assert out.logits.shape == (1, 0, model.config.vocab_size)  # no logits computed
    torch.testing.assert_close(seen.hidden, want.hidden_states[-1])
    torch.testing.assert_close(seen.head(seen.hidden), want.logits)


def test_torch_varlen_attention_signature_and_causal_rule():
    """attention.varlen_kernel calls torch 2.13's varlen_attn with keyword scale/window_size/enable_gqa and asks for
    causal attention with window_size=(-1, 0), the one value the function turns into is_causal (CUDA only, so the
    rule is read from its source here)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    assert list(params)[:7] == ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"]
    for name in ("scale", "window_size", "enable_gqa"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert "is_causal = window_size == (-1, 0)" in inspect.getsource(varlen_attn)
