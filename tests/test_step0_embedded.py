"""Step 0: the embedded default installs idempotently and the converted SmolLM2 is a working HF model."""
import torch

from src.download import download_data
from src.download.embedded import convert_gguf


def test_converted_model_generates(smollm2_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    assert convert_gguf(smollm2_dir) is False  # already converted: nothing to do
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) > 100e6
    ids = smollm2_tokenizer("The heart pumps", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    text = smollm2_tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert text.strip(), "the converted model produced no text"


def test_install_sample_is_idempotent(tmp_path, smollm2_dir):
    first = download_data.install_sample(tmp_path / "raw", smollm2_dir.parent)
    assert sorted(first["files_copied"]) == sorted(download_data.SAMPLE_FILES)
    again = download_data.install_sample(tmp_path / "raw", smollm2_dir.parent)
    assert again["files_copied"] == [] and again["model_converted"] is False


def test_split_by_class_names_bad_records(tmp_path):
    import pytest

    from src.common.errors import DataError

    parts = download_data.split_by_class([{"class": "major"}, {"class": "minor"}, {"class": "major"}], "f.json")
    assert len(parts["major"]) == 2 and len(parts["minor"]) == 1
    with pytest.raises(DataError, match="f.json: record 1, field 'class'"):
        download_data.split_by_class([{"class": "major"}, {"source": "x"}], "f.json")
