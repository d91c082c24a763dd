"""Post-MoE folders as first-class checkpoints: stock transformers refuses them with a message naming our loader
(never a silent dense model), old folders still load, and the export to stock Qwen2MoeForCausalLM is exact for
Qwen2- and Llama-shaped models (logits and greedy generations through AutoModelForCausalLM) or refused, naming
the setting. Tiny random models, CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from test_moe import VOCAB, batch, tiny_moe  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from src.common.errors import UsageError  # noqa: E402
from src.models import loading, moe, moe_export  # noqa: E402
from util import moe_export as export_cli  # noqa: E402
from src.models.loading import load_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the zero-width shared expert


def _with_shared_expert_output(model):
    """Give the shared expert a non-zero output so that the export has to carry it."""
    with torch.no_grad():
        for block in moe.sparse_blocks(model):
            block.shared_expert.down_proj.weight.normal_(0.0, 0.1)
            block.shared_expert_gate.weight.normal_(0.0, 0.5)
    return model


def test_stock_transformers_refuses_our_folder_with_a_helpful_error(tmp_path):
    out = moe.save_moe(tiny_moe("llama"), None, tmp_path / "moe")
    for load in (AutoModelForCausalLM.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError) as error:
            load(out)
        assert "src.models.loading.load_model" in str(error.value)
        assert "python -m util.moe_export" in str(error.value)
    # Our loaders read it; load_config gives the base config, with the MoE settings.
    config = loading.load_config(out)
    assert config.model_type == "llama" and config.post_moe["num_experts"] == 4
    assert moe.is_moe(loading.load_model(out))


def test_folder_written_before_the_model_type_change_still_loads(tmp_path):
    """The earlier format: the base model_type with the post_moe field (and no routing fields)."""
    model = tiny_moe("qwen2")
    out = moe.save_moe(model, None, tmp_path / "old")
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = config.pop(moe.BASE_TYPE_KEY)
    config["architectures"] = config.pop(moe.BASE_ARCHITECTURES_KEY)
    for key in ("routing", "router_language_loss_coef"):
        del config["post_moe"][key]
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_model(out)
    assert moe.moe_settings(loaded).routing == "hybrid"
    input_ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_unknown_settings_are_refused_naming_the_field(tmp_path):
    out = moe.save_moe(tiny_moe("qwen2"), None, tmp_path / "moe")
    config = json.loads((out / "config.json").read_text())
    config["post_moe"]["routing"] = "telepathic"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: field post_moe: routing rule 'telepathic'"):
        load_model(out)
    config["post_moe"]["routing"] = "hybrid"
    config["post_moe"]["capacity_factor"] = 1.25
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"field post_moe.capacity_factor is not known"):
        load_model(out)


def _llama3_rope_model():
    """A Llama-3-shaped tiny model: llama3 rope scaling, explicit head_dim, untied embeddings."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         initializer_range=0.1, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32},
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("shape", ["qwen2", "llama", "llama3", "qwen2-shared-all"])
def test_export_is_exact_through_stock_auto_class(tmp_path, shape):
    if shape == "llama3":
        model = moe.upcycle(_llama3_rope_model(), num_experts=4)
        torch.manual_seed(1)
        with torch.no_grad():
            for block in moe.sparse_blocks(model):
                block.experts.gate_up_proj.add_(0.1 * torch.randn_like(block.experts.gate_up_proj))
                block.gate.weight.normal_(0.0, 0.5)
    elif shape == "qwen2-shared-all":
        model = _with_shared_expert_output(tiny_moe("qwen2", shared_expert=True, moe_layers="all"))
    else:
        model = tiny_moe(shape)  # llama: tied embeddings
    out = moe_export.export_qwen2_moe(model, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(exported).__name__ == "Qwen2MoeForCausalLM"
    assert exported.config.num_experts == 4
    assert exported.config.mlp_only_layers == ([] if shape == "qwen2-shared-all" else [0])
    input_ids, language_ids = batch(shape=(2, 40))  # past llama3's original 32 positions
    attention_mask = (language_ids >= 0).long()
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask).logits
        got = exported(input_ids=input_ids, attention_mask=attention_mask).logits
    assert (got - want).abs().max().item() < 1e-4
    generate = {"attention_mask": attention_mask, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(exported.generate(input_ids, **generate), model.generate(input_ids, **generate))


def test_export_refuses_what_it_cannot_represent(tmp_path):
    biased = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias=True"):
        moe_export.export_qwen2_moe(moe.upcycle(LlamaForCausalLM(biased)), tmp_path / "biased")
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="model_type='mistral'"):
        moe_export.export_qwen2_moe(moe.upcycle(MistralForCausalLM(mistral)), tmp_path / "mistral")
    assert not (tmp_path / "biased").exists() and not (tmp_path / "mistral").exists()


def test_export_cli_reads_our_folder_and_refuses_to_overwrite(tmp_path, capsys):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                        unk_token="t3", pad_token="t0", eos_token="t2")
    source = moe.save_moe(tiny_moe("llama"), tokenizer, tmp_path / "moe")
    assert export_cli.main(["--model", str(source), "--out", str(tmp_path / "hf")]) == 0
    assert "Qwen2MoeForCausalLM" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config.model_type == "qwen2_moe"
    with pytest.raises(UsageError, match="is not empty"):  # never overwrites without --overwrite
        export_cli.main(["--model", str(source), "--out", str(tmp_path / "hf")])
    with pytest.raises(SystemExit):
        export_cli.main(["--model", str(tmp_path / "hf"), "--out", str(tmp_path / "again")])  # not ours


def test_compare_predictions(tmp_path, capsys):
    from util.compare_predictions import main

    def write(name, letters):
        path = tmp_path / name
        path.write_text("".join(json.dumps({"id": f"q{i}", "letter": x}) + "\n" for i, x in enumerate(letters)))
        return str(path)

    a, same, other, shorter = write("a", "ABCD"), write("b", "ABCD"), write("c", "ABDD"), write("d", "ABC")
    assert main([a, same]) == 0 and capsys.readouterr().out.splitlines()[-1].startswith("OK: 4 identical")
    assert main([a, other]) == 1 and "q2: 'C' vs 'D'" in capsys.readouterr().out
    assert main([a, shorter]) == 1 and "1 unmatched ids" in capsys.readouterr().out
