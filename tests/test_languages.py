import pytest

from src.common import languages as L


def test_fifty_languages_in_seven_families():
    langs = L.languages()
    assert len(langs) == 50
    assert len(L.major_languages()) == 12 and len(L.minor_languages()) == 38
    assert L.major_languages() == sorted(L.major_languages())  # the paper's column order ar..zh
    assert set(L.families()) == set(range(7))
    assert {e["family"] for e in langs.values()} == set(range(7))
    # spot checks against the original code's family table (docs/reference.md, "Post-MoE")
    assert L.family_id("zh") == 0 and L.family_id("ja") == 1 and L.family_id("vi") == 2
    assert L.family_id("ceb") == 3 and L.family_id("en") == 4 and L.family_id("he") == 5 and L.family_id("sw") == 6
    assert L.family_id("mn") == L.family_id("ne") == 1  # alias for the release's 'ne'


def test_per_language_ids_are_dense_and_major_first():
    ids = sorted(L.language_id(c) for c in L.languages())
    assert ids == list(range(50))
    assert [L.language_id(c) for c in L.major_languages()] == list(range(12))
    assert L.language_id("ckb") == 12  # first minor language in the reference's order


def test_every_reference_source_resolves():
    sources = L.known_sources()
    assert {L.source_language(s) for s in sources} == set(L.major_languages())
    assert L.source_language("MMLU_anatomy_pt") == "pt" and L.source_language("headqa") == "es"


def test_item_language_wins_and_minor_suffix():
    assert L.source_language("headqa", "fr") == "fr"
    assert L.source_language("mmlu-medical-sw") == "sw"
    assert L.source_language("mmlu-medical-ceb") == "ceb"


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="'my-bench'"):
        L.source_language("my-bench")
    with pytest.raises(ValueError, match="unknown language code 'xx'"):
        L.source_language("headqa", "xx")


def test_train_source_keys():
    assert L.parse_train_source("medicalWiki_de_qa") == ("medicalWiki", "de", True)
    assert L.parse_train_source("general_ckb") == ("general", "ckb", False)
    for bad in ("medicalWiki", "medical_Wiki_de", "general_xx"):
        with pytest.raises(ValueError):
            L.parse_train_source(bad)
