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


def test_split_by_class_streams_and_names_bad_records(tmp_path):
    import json

    import pytest

    from src.common.errors import DataError

    src = tmp_path / "all.json"
    records = [{"class": c, "text": "é" * n} for n, c in enumerate(["major", "minor", "major"] * 50)]
    src.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    counts = download_data.split_by_class(src, tmp_path / "part")
    assert counts == {"major": 100, "minor": 50}
    major = json.loads((tmp_path / "part_major.json").read_text(encoding="utf-8"))
    assert major == [r for r in records if r["class"] == "major"]
    src.write_text(json.dumps([{"class": "major"}, {"source": "x"}]))
    with pytest.raises(DataError, match="all.json: record 1, field 'class'"):
        download_data.split_by_class(src, tmp_path / "bad")
    assert not (tmp_path / "bad_major.json").exists()  # nothing half-written is left behind


def test_iter_json_array_across_chunk_boundaries(tmp_path):
    import json

    import pytest

    from src.common.errors import DataError
    from src.common.io import iter_json_array

    values = [{"a": i, "s": "x" * (i % 7)} for i in range(200)] + [12345, "tail", [1, 2], None, 1.5e3]
    path = tmp_path / "v.json"
    path.write_text(json.dumps(values))
    assert list(iter_json_array(path, chunk_chars=5)) == values
    path.write_text("[]")
    assert list(iter_json_array(path)) == []
    path.write_text('{"general_en": []}')
    with pytest.raises(DataError, match="expected a JSON list"):
        list(iter_json_array(path))
    path.write_text('[{"a": 1} {"b": 2}]')
    with pytest.raises(DataError, match="expected one of ',' ']'"):
        list(iter_json_array(path, chunk_chars=4))
    path.write_text('[{"a": 1}, {"b": ')
    with pytest.raises(DataError, match="invalid JSON"):
        list(iter_json_array(path, chunk_chars=4))


def test_hub_mode_downloads_and_splits(tmp_path, monkeypatch):
    """--hub with the hub calls replaced by local files: data and bench are split into major/minor parts."""
    import json

    import huggingface_hub

    files = {
        "ApolloMoEDataset.json": [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                                   "source": s, "class": c} for s, c in
                                  (("general_en", "major"), ("general_sw", "minor"), ("medicalWiki_de_qa", "major"))],
        "ApolloMoEBench.json": [{"question": "q", "options": "(A) x\n(B) y", "answer": "(A)", "source": s, "class": c}
                                for s, c in (("headqa", "major"), ("mmlu-medical-sw", "minor"))],
    }
    calls = []

    def fake_file(repo_id, filename, repo_type, local_dir):
        calls.append((repo_id, filename, repo_type))
        path = tmp_path / "dl" / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(files[filename]))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, local_dir: calls.append(repo_id))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    report = download_data.download_hub(tmp_path / "raw", tmp_path / "models", "Qwen/Qwen2-0.5B",
                                        "ApolloMoEDataset.json", "ApolloMoEBench.json")
    assert ("FreedomIntelligence/ApolloMoEDataset", "ApolloMoEDataset.json", "dataset") in calls
    assert ("FreedomIntelligence/ApolloMoEBench", "ApolloMoEBench.json", "dataset") in calls
    assert "Qwen/Qwen2-0.5B" in calls
    assert report["train"]["major"] == 2 and report["train"]["minor"] == 1 and report["bench"]["minor"] == 1
    minor = json.loads((tmp_path / "raw" / "hub" / "bench_minor.json").read_text())
    assert [it["source"] for it in minor] == ["mmlu-medical-sw"]


def test_hub_mode_refuses_offline(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE"):
        download_data.download_hub(tmp_path, tmp_path, "Qwen/Qwen2-0.5B", "a.json", "b.json")
