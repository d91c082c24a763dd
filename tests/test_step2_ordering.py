"""Step 2 ordering: the exponential-key permutation against the reference's torch.multinomial, entries, the table."""
import json

import numpy as np
import pytest
import torch

from src.prepare import mixture as mx

TRIALS = 20000


def _ours(weights, trials=TRIALS):
    return np.stack([mx.exponential_order(np.asarray(weights, dtype=np.float64), seed) for seed in range(trials)])


def _reference(weights, trials=TRIALS):
    """The reference's sampler (docs/reference.md, "Priority sampling"): torch.multinomial without replacement, one draw per row."""
    g = torch.Generator().manual_seed(3407)
    w = torch.tensor(weights, dtype=torch.float64).expand(trials, -1)
    return torch.multinomial(w, len(weights), replacement=False, generator=g).numpy()


def _ranks(perms):
    """ranks[t, i] = position of entry i in permutation t."""
    ranks = np.empty_like(perms)
    np.put_along_axis(ranks, perms, np.arange(perms.shape[1])[None, :].repeat(len(perms), 0), axis=1)
    return ranks


def test_first_position_matches_sequential_weighted_sampling():
    weights = [16, 16, 16, 2, 2, 2, 2, 1]
    p = np.array(weights) / sum(weights)
    for perms in (_ours(weights), _reference(weights)):
        freq = np.bincount(perms[:, 0], minlength=len(weights)) / len(perms)
        sigma = np.sqrt(p * (1 - p) / len(perms))
        assert np.all(np.abs(freq - p) < 5 * sigma), (freq, p)


def test_mean_rank_per_priority_class_matches_torch_multinomial():
    weights = [16] * 4 + [2] * 8
    ours, ref = _ranks(_ours(weights)), _ranks(_reference(weights))
    for cls in (slice(0, 4), slice(4, 12)):
        a, b = ours[:, cls].mean(axis=1), ref[:, cls].mean(axis=1)
        bound = 5 * np.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < bound, (cls, a.mean(), b.mean())
    # the soft curriculum: high-priority entries come first on average
    assert ours[:, :4].mean() < 3.0 < ours[:, 4:].mean()
    # P(a given SFT entry precedes a given QA entry) = 2 / 18 (docs/reference.md, "Priority sampling")
    before = (ours[:, 4] < ours[:, 0]).mean()
    assert abs(before - 2 / 18) < 5 * np.sqrt((2 / 18) * (16 / 18) / TRIALS)


def test_second_position_conditional_on_first():
    # sequential sampling without replacement: after entry 0 (w=16) came first, entry 1 (w=4) is next w.p. 4/(4+4+2)
    weights = [16, 4, 4, 2]
    perms = _ours(weights)
    second = perms[perms[:, 0] == 0, 1]
    freq = np.bincount(second, minlength=4) / len(second)
    expected = np.array([0, 0.4, 0.4, 0.2])
    assert np.all(np.abs(freq - expected) < 5 * np.sqrt(expected * (1 - expected) / len(second)) + 1e-12)


def test_equal_priorities_give_a_uniform_shuffle():
    n = 6
    ranks = _ranks(_ours([2.0] * n))
    sigma = np.sqrt((n * n - 1) / 12 / TRIALS)  # std of the mean of a uniform rank
    assert np.all(np.abs(ranks.mean(axis=0) - (n - 1) / 2) < 5 * sigma)
    counts = np.stack([np.bincount(ranks[:, i], minlength=n) for i in range(n)])  # entry x position
    expected = TRIALS / n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 25 * 3, chi2  # df = 25; mean 25, far below a 5-sigma excursion


def test_order_is_seeded_and_deterministic():
    w = np.array([16.0] * 50 + [2.0] * 50)
    a, b, c = mx.exponential_order(w, 42), mx.exponential_order(w, 42), mx.exponential_order(w, 43)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a.tolist()) == list(range(100))


def test_sft_entries_appear_exactly_twice_and_qa_once():
    record_source = np.array([0, 1, 0, 1, 1, 2])  # sources: 0 = *_qa (1 epoch), 1 = SFT (2), 2 = SFT (2)
    entries = mx.build_entries(record_source, [1, 2, 2])
    counts = np.bincount(entries, minlength=6)
    assert counts.tolist() == [1, 2, 1, 2, 2, 2]
    assert entries.dtype == np.int32


def test_fractional_and_zero_epochs_follow_the_reference_rule():
    # int(n * epochs) entries per source, entry j = record j mod n; 0 epochs leaves the source out
    entries = mx.build_entries(np.array([0, 0, 0, 0, 1, 1]), [1.5, 0])
    assert entries.tolist() == [0, 1, 2, 3, 0, 1]
    assert mx.entries_per_source(100, 0.29) == 29  # 100 * 0.29 = 28.999999999999996 in floating point


def test_default_table_is_the_papers():
    table = mx.PriorityTable.load()
    qa = ["medicalBook_en_qa", "medicalGuideline_de_qa", "medicalPaper_zh_qa", "medicalWeb_ja_qa", "medicalWiki_hi_qa"]
    sft = ["medicalExam_ko", "medicalPatient_ar", "general_fr", "code_en", "math_zh", "general_ckb", "medicalExam_sw"]
    for s in qa:
        r = table.match(s)
        assert (r.priority, r.epochs) == (16, 1), s
    for s in sft:
        r = table.match(s)
        assert (r.priority, r.epochs) == (2, 2), s


def test_unmatched_sources_are_an_error_listing_all_of_them():
    table = mx.PriorityTable.load()
    with pytest.raises(ValueError) as e:
        table.resolve(["general_en", "medicalBook_en", "textbook_fr"])
    assert "2 training source(s)" in str(e.value)
    assert "medicalBook_en" in str(e.value) and "textbook_fr" in str(e.value)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_override_file_goes_first_and_can_drop_the_defaults(tmp_path, suffix):
    rules = {"rules": [{"pattern": "general_en", "priority": 5, "epochs": 3},
                       {"pattern": "medicalBook_*", "priority": 8, "epochs": 0.5}]}
    path = tmp_path / f"p{suffix}"
    path.write_text(json.dumps(rules), encoding="utf-8")  # JSON is valid YAML too
    table = mx.PriorityTable.load(path)
    assert (table.match("general_en").priority, table.match("general_en").epochs) == (5, 3)
    assert table.match("general_fr").priority == 2  # the defaults still apply after the file's rules
    assert table.match("medicalBook_en").epochs == 0.5
    path.write_text(json.dumps({**rules, "inherit_defaults": False}), encoding="utf-8")
    table = mx.PriorityTable.load(path)
    assert table.match("general_fr") is None and table.match("general_en").priority == 5
    assert table.unused(["general_en"]) == ["medicalBook_*"]


@pytest.mark.parametrize("bad,msg", [
    ({"rules": [{"pattern": "x_*", "priority": 0, "epochs": 1}]}, "priority must be a number > 0"),
    ({"rules": [{"pattern": "x_*", "priority": 2, "epochs": -1}]}, "epochs must be a number >= 0"),
    ({"rules": [{"pattern": "x_*", "priority": 2}]}, "expected exactly the keys"),
    ({"rules": []}, "non-empty list of rules"),
    ({"rule": []}, "unknown keys rule"),
])
def test_bad_priority_files_are_reported(tmp_path, bad, msg):
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ValueError, match=msg):
        mx.PriorityTable.load(path)


def test_curriculum_shares():
    curr = mx.curriculum(np.array([10, 10, 10, 10]), np.array([1, 1, 0, 0]), bins=2)
    assert curr["qa_token_share"] == [1.0, 0.0] and curr["sft_token_share"] == [0.0, 1.0]
