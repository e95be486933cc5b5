"""The benchmarks run on the CPU at tiny sizes and write well-formed outputs.

Checked: result fields and units, no NaN/inf anywhere, tables and plots written, the headline-ratio
API, the OOM fallback of the end-to-end comparison, and the saved-tensor counter. Timings are never
asserted. PEFT parts are skipped when peft is not installed, plots when matplotlib is not, the
end-to-end suite when transformers is not.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

from lorafa_ext import bench
from lorafa_ext.bench import e2e as e2e_mod
from lorafa_ext.bench import stats
from lorafa_ext.bench.memory import SavedTensorCounter
from lorafa_ext.bench.report import compare_table_rows, e2e_table_rows, plot_e2e, sanitize, write_json
from lorafa_ext.bench.timing import Step, TimingConfig, measure
from lorafa_ext.bench.variants import VARIANTS, Case

HAS_PEFT = importlib.util.find_spec("peft") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_peft = pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")

PASS_FIELDS = [f"{p}_{u}" for p in ("fwd", "bwd", "fwdbwd") for u in ("us", "tflop_per_s", "gb_per_s")]
TINY_TIMING = TimingConfig(warmup=1, reps=3, max_reps=3, min_time_s=0.0, max_time_s=5.0)


def _strict_load(path):
    """json.load that fails on NaN / Infinity."""
    def bad(c):
        raise AssertionError(f"{path}: non-finite constant {c} in JSON")

    with open(path) as f:
        return json.load(f, parse_constant=bad)


def _walk_numbers(obj, path=""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk_numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = bench.build_parser().parse_args(["--preset", "quick", "--device", "cpu", "--out", str(out),
                                            "--no-progress"])
    results = bench.run(args)
    return out, results


def test_outputs_written(quick_run):
    out, results = quick_run
    assert (out / "results.json").is_file()
    assert (out / "results.md").is_file()
    data = _strict_load(out / "results.json")
    assert set(data) >= {"meta", "micro", "memory", "notes", "plots"}
    assert data["meta"]["device"] == "cpu"
    assert data["meta"]["units"]["*_us"].startswith("microseconds")
    for path, v in _walk_numbers(data):
        assert math.isfinite(v), path
    # results.json stores NaN/inf as null and says so in a note: there must be none
    assert not [n for n in data["notes"] if n.startswith("non-finite values written as null")], data["notes"]
    if HAS_MPL:
        assert data["plots"], "no plots written"
        for name in data["plots"]:
            assert name.endswith(".png")
            with open(out / name, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        names = " ".join(data["plots"])
        assert "speedup_vs_n" in names and "saved_memory_vs_seqlen" in names
        if HAS_TRANSFORMERS:
            assert "e2e.png" in data["plots"]


def test_micro_fields(quick_run):
    out, _ = quick_run
    data = _strict_load(out / "results.json")
    cases = data["micro"]["cases"]
    assert cases
    seen = {r["variant"] for r in cases}
    assert {"cublas", "lorafa", "lorafa_dropout", "lorafa_correction"} <= seen
    if HAS_PEFT:
        assert {"peft_lora", "peft_lorafa"} <= seen
    else:
        assert not seen & {"peft_lora", "peft_lorafa"}
        assert any("peft" in n for n in data["notes"])
    for r in cases:
        for k in ("case", "N", "in_features", "out_features", "r", "dtype", "variant", "samples", *PASS_FIELDS):
            assert k in r, k
        for k in PASS_FIELDS:
            assert isinstance(r[k], float) and r[k] > 0, (r["variant"], k, r[k])
        assert r["samples"] >= 1
        assert r["dtype"] == "fp32"
        if r["variant"] != "cublas":
            assert r["fwdbwd_vs_cublas"] > 0
    head = data["micro"]["headline"]
    assert set(head) == {"shape", "spread", "noisy", *bench.HEADLINE_KEYS}
    for k in ("fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen"):
        assert head[k] > 0
    if HAS_PEFT:
        assert head["speedup_vs_peft"] > 0
    assert head["speedup_vs_peft_compiled"] is None  # no torch.compile on the CPU by default


def test_memory_fields(quick_run):
    out, _ = quick_run
    data = _strict_load(out / "results.json")
    rows = data["memory"]["cases"]
    assert rows
    by = {}
    for r in rows:
        assert isinstance(r["saved_bytes"], int) and r["saved_bytes"] >= 0
        assert r["saved_mib"] == pytest.approx(r["saved_bytes"] / 2**20)
        assert r["peak_fwdbwd_bytes"] is None  # CUDA only
        by.setdefault(r["N"], {})[r["variant"]] = r
    for n, v in by.items():
        assert v["cublas"]["saved_bytes"] == 0  # W frozen: F.linear saves no activation
        # our layer saves z (N x r) and small things (a seed): less than x
        x_bytes = n * v["lorafa"]["in_features"] * 4
        assert 0 < v["lorafa"]["saved_bytes"] < x_bytes
        if HAS_PEFT:
            assert v["peft_lora"]["saved_bytes"] >= x_bytes  # PEFT keeps x for A's gradient
            assert v["lorafa"]["saved_bytes"] < v["peft_lora"]["saved_bytes"]


@needs_transformers
def test_e2e_fields(quick_run):
    out, _ = quick_run
    data = _strict_load(out / "results.json")
    e2e = data["e2e"]
    methods = {r["method"] for r in e2e["rows"]}
    assert {"full", "lorafa"} <= methods
    if HAS_PEFT:
        assert {"peft_lora", "peft_lorafa"} <= methods
    for r in e2e["rows"]:
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert r["trainable_params"] > 0
        assert r["saved_activation_bytes"] > 0
        assert r["peak_mem_bytes"] is None  # CUDA only
    assert e2e["comparisons"]
    c = e2e["comparisons"][0]
    assert c["goal_mem_met"] is None and c["goal_tokens_met"] is None  # goals are judged on a GPU only
    lora = {r["method"]: r for r in e2e["rows"]}
    assert lora["lorafa"]["trainable_params"] < lora["full"]["trainable_params"]


def test_markdown_tables(quick_run):
    out, _ = quick_run
    md = (out / "results.md").read_text()
    for text in ("fwd+bwd (us)", "TFLOP/s", "GB/s", "saved activations (MiB)", "| fwd_vs_cublas |"):
        assert text in md, text
    if HAS_TRANSFORMERS:
        assert "tokens/s" in md and "peak memory (GiB)" in md
    assert "nan" not in md.lower().replace("nanos", "")


def test_headline_ratios_api():
    variants = ["cublas", "lorafa", "lorafa_dropout"] + (["peft_lora"] if HAS_PEFT else [])
    head, rows = bench.headline_ratios("cpu", case=Case(64, 32, 48, 4, "fp32", True), variants=variants,
                                       timing=TINY_TIMING)
    assert set(head) == {"shape", "spread", "noisy", *bench.HEADLINE_KEYS}
    assert head["fwdbwd_vs_frozen"] > 0 and head["fwdbwd_dropout_vs_frozen"] > 0
    assert head["speedup_vs_peft_compiled"] is None
    assert (head["speedup_vs_peft"] is not None) == HAS_PEFT
    assert {r["variant"] for r in rows} == set(variants)
    for r in rows:
        us = [k for k in r if k.endswith("_us")]
        assert {"fwd_us", "bwd_us", "fwdbwd_us"} <= set(us)
        assert all(math.isfinite(r[k]) and r[k] >= 0 for k in us)


@needs_peft
def test_compiled_peft_variant_runs():
    """The torch.compile'd PEFT variant (compiled once, shared by the rotated tensor sets)."""
    head, rows = bench.headline_ratios("cpu", case=Case(32, 16, 24, 4, "fp32", True),
                                       variants=["cublas", "lorafa", "peft_lora_compiled"], timing=TINY_TIMING)
    assert {r["variant"] for r in rows} == {"cublas", "lorafa", "peft_lora_compiled"}
    assert head["speedup_vs_peft_compiled"] > 0
    assert head["speedup_vs_peft"] is None


def test_measure_drops_failing_variant():
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(3, 4)

    def boom(k):
        raise RuntimeError("broken variant")

    steps = {"ok": Step(lambda k: x @ w.T, lambda k: [x], lambda k: torch.ones(8, 3)),
             "bad": Step(boom, lambda k: [x], lambda k: torch.ones(8, 3))}
    samples, failures = measure(steps, torch.device("cpu"), TINY_TIMING)
    assert "bad" in failures and "broken variant" in failures["bad"]
    assert len(samples["ok"]) == 3 and "bad" not in samples


def test_saved_counter_unique_storages():
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(4, 16, requires_grad=True)
    with SavedTensorCounter(exclude=[w]) as c:
        y = (x * x).sum() + (x[:2] * 2).sum() + (x @ w).sum()  # x saved three times, w excluded
    assert c.bytes == x.untyped_storage().nbytes()
    assert c.count >= 3
    del y


def test_sanitize_json(tmp_path):
    bad = write_json(str(tmp_path / "r.json"), {"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
    assert sorted(bad) == [".a", ".b[1]"]
    assert _strict_load(tmp_path / "r.json") == {"a": None, "b": [1.0, None], "c": "x"}
    assert sanitize({"d": torch.bfloat16}) == {"d": "bfloat16"}


def _e2e_cfg(**kw):
    base = dict(model="micro", dtype="fp32", batch=4, seq=8, steps=1, warmup=1, grad_ckpt=(False,), dropouts=(0.0,))
    base.update(kw)
    return e2e_mod.E2EConfig(**base)


def _assert_no_repeats(rows):
    keys = [(r["method"], r["batch"], r["grad_ckpt"], r["lora_dropout"]) for r in rows]
    assert len(keys) == len(set(keys)), keys
    assert all(r["lora_dropout"] is None for r in rows if r["method"] == "full")


@needs_transformers
def test_e2e_oom_is_reported_and_batch_reduced(tmp_path):
    """Full fine-tuning fits only at batch 1: ours is compared at the requested batch, full shown as OOM there."""
    cfg = _e2e_cfg(methods=("full", "lorafa"), simulate_oom=lambda method, batch: method == "full" and batch > 1)
    notes = []
    res = e2e_mod.run_e2e(cfg, torch.device("cpu"), notes=notes)
    status = {(r["method"], r["batch"]): r["status"] for r in res["rows"]}
    assert status == {("full", 4): "OOM", ("full", 2): "OOM", ("full", 1): "ok", ("lorafa", 4): "ok"}
    _assert_no_repeats(res["rows"])
    oom = [r for r in res["rows"] if r["status"] == "OOM"]
    assert all(r["tokens_per_s"] is None for r in oom)
    (c,) = res["comparisons"]
    assert c["batch"] == 4 and c["requested_batch"] == 4 and not c["batch_reduced"]
    assert c["status"] == {"full": "OOM", "lorafa": "ok"}
    assert c["largest_fitting_batch"] == {"full": 1, "lorafa": 4}
    assert c["tokens_per_s"]["full"] is None and c["tokens_per_s"]["lorafa"] > 0
    assert any("full fine-tuning" in n and "fits at batch 1" in n for n in c["notes"])
    (row,) = compare_table_rows([c])
    assert "OOM (fits at 1)" in row
    if HAS_MPL:
        path = plot_e2e(sanitize(res), str(tmp_path / "e2e.png"), "test CPU")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@needs_transformers
@needs_peft
def test_e2e_oom_fallback_compares_lora_methods_without_full(tmp_path):
    """Full fine-tuning never fits, PEFT LoRA only up to batch 2, ours and PEFT LoRA-FA at 4: the LoRA-type
    methods are compared at 2, full is OOM and outside the goals; every attempt is a row, none repeated."""
    def oom(method, batch):
        return method == "full" or (method == "peft_lora" and batch > 2)

    cfg = _e2e_cfg(dropouts=(0.0, 0.05), simulate_oom=oom)
    notes = []
    res = e2e_mod.run_e2e(cfg, torch.device("cpu"), notes=notes)
    _assert_no_repeats(res["rows"])
    status = {(r["method"], r["batch"], r["lora_dropout"]): r["status"] for r in res["rows"]}
    want = {("full", 4, None): "OOM", ("full", 2, None): "OOM", ("full", 1, None): "OOM"}  # once for both dropouts
    for p in (0.0, 0.05):
        want.update({("peft_lora", 4, p): "OOM", ("peft_lora", 2, p): "ok", ("peft_lorafa", 4, p): "ok",
                     ("peft_lorafa", 2, p): "ok", ("lorafa", 4, p): "ok", ("lorafa", 2, p): "ok"})
    assert status == want
    assert len(res["comparisons"]) == 2
    for c, p in zip(res["comparisons"], (0.0, 0.05)):
        assert c["lora_dropout"] == p
        assert c["batch"] == 2 and c["requested_batch"] == 4 and c["batch_reduced"]
        assert c["largest_fitting_batch"] == {"full": None, "peft_lora": 2, "peft_lorafa": 4, "lorafa": 4}
        assert c["status"] == {"full": "OOM", "peft_lora": "ok", "peft_lorafa": "ok", "lorafa": "ok"}
        assert c["tokens_per_s"]["full"] is None and c["peak_mem_gib"]["full"] is None
        for m in ("peft_lora", "peft_lorafa", "lorafa"):
            assert c["tokens_per_s"][m] > 0
        assert c["tokens_ratio_lorafa_over_peft_lora"] > 0 and c["tokens_ratio_lorafa_over_peft_lorafa"] > 0
        assert c["saved_ratio_peft_lora_over_lorafa"] > 0
        assert c["goal_mem_met"] is None and c["goal_tokens_met"] is None  # CPU
        assert any("every batch" in n for n in c["notes"])
    row = compare_table_rows(res["comparisons"])[0]
    assert "2 (asked 4)" in row and "OOM at every batch" in row
    if HAS_MPL:
        assert plot_e2e(sanitize(res), str(tmp_path / "e2e.png"), "test CPU")


@needs_transformers
def test_e2e_no_oom_compares_at_requested_batch():
    methods = ("full", "lorafa") + (("peft_lora",) if HAS_PEFT else ())
    cfg = _e2e_cfg(batch=2, methods=methods, simulate_oom=lambda method, batch: False)
    notes = []
    res = e2e_mod.run_e2e(cfg, torch.device("cpu"), notes=notes)
    assert sorted((r["method"], r["batch"]) for r in res["rows"]) == sorted((m, 2) for m in methods)
    assert all(r["status"] == "ok" for r in res["rows"])
    (c,) = res["comparisons"]
    assert c["batch"] == c["requested_batch"] == 2 and not c["batch_reduced"]
    assert c["largest_fitting_batch"] == {m: 2 for m in c["status"]}
    assert set(c["status"]) == set(methods) and set(c["status"].values()) == {"ok"}
    assert c["tokens_per_s"]["full"] > 0 and c["notes"] == []
    assert not any("batch" in n for n in notes)


@needs_transformers
@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_e2e_qlora_methods_over_quantized_projections():
    """QLoRA: the three LoRA methods train over bitsandbytes NF4 projections (full fine-tuning is
    skipped with a note); QLoRA-FA saves less for backward than PEFT QLoRA and PEFT's LoRA-FA
    optimizer, with dropout on."""
    pytest.importorskip("bitsandbytes")
    cfg = _e2e_cfg(model="tiny", batch=2, seq=16, dropouts=(0.05,), quant="nf4")
    notes = []
    res = e2e_mod.run_e2e(cfg, torch.device("cpu"), notes=notes)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"peft_lora", "peft_lorafa", "lorafa"} and any("nf4" in n for n in notes)
    assert all(r["status"] == "ok" for r in rows.values()), [r["status"] for r in rows.values()]
    assert rows["lorafa"]["trainable_params"] == rows["peft_lorafa"]["trainable_params"]
    saved = {m: r["saved_activation_bytes"] for m, r in rows.items()}
    assert saved["lorafa"] < saved["peft_lorafa"] < saved["peft_lora"], saved
    assert res["config"]["quant"] == "nf4"


@needs_transformers
def test_e2e_saved_activations_none_with_grad_ckpt(tmp_path):
    """Checkpointing's own saved_tensors_hooks hide the saved tensors: n/a there, not a wrong number."""
    methods = ("lorafa",) + (("peft_lora",) if HAS_PEFT else ())
    cfg = _e2e_cfg(batch=2, methods=methods, grad_ckpt=(False, True))
    notes = []
    res = e2e_mod.run_e2e(cfg, torch.device("cpu"), notes=notes)
    for r in res["rows"]:
        assert r["status"] == "ok", r
        if r["grad_ckpt"]:
            assert r["saved_activation_bytes"] is None and r["saved_activation_mib"] is None
        else:
            assert r["saved_activation_bytes"] > 0
    off, on = res["comparisons"]
    assert on["saved_ratio_peft_lora_over_lorafa"] is None
    assert set(on["saved_activation_mib"].values()) == {None}
    assert any("checkpointing" in n for n in on["notes"]) and not off["notes"]
    assert any("checkpointing" in n for n in notes)
    if HAS_PEFT:
        assert off["saved_ratio_peft_lora_over_lorafa"] > 1
        assert on["tokens_ratio_lorafa_over_peft_lora"] > 0
    assert compare_table_rows([on])[0][6] == "n/a (ckpt)"
    assert all(row[10] == "n/a" for row, r in zip(e2e_table_rows(res["rows"]), res["rows"]) if r["grad_ckpt"])
    if HAS_MPL:
        assert plot_e2e(sanitize(res), str(tmp_path / "e2e.png"), "test CPU")


def test_oom_detection_and_free_never_raises(monkeypatch):
    from lorafa_ext.bench.failures import free as _free, is_oom as _is_oom

    assert _is_oom(torch.OutOfMemoryError("x"))
    assert _is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert _is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not _is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not _is_oom(ValueError("shape mismatch"))
    assert _free("cpu") is None

    def sticky():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", sticky)
    why = _free(torch.device("cuda"))
    assert "illegal memory access" in why


def test_cli_help():
    text = bench.build_parser().format_help()
    for opt in ("--out", "--n", "--shapes", "--ranks", "--dtypes", "--variants", "--suites", "--compile",
                "--e2e-model", "--seq-lens"):
        assert opt in text
    for v in VARIANTS:
        assert v in text


def test_scripts_help():
    """Every script in benchmarks/ parses --help (one interpreter for all four: importing torch is slow)."""
    code = (
        "import runpy, sys\n"
        "bad = []\n"
        "for s in sys.argv[1:]:\n"
        "    sys.argv = [s, '--help']\n"
        "    sys.path.insert(0, __import__('os').path.dirname(s))\n"
        "    try:\n"
        "        runpy.run_path(s, run_name='__main__')\n"
        "        bad.append((s, 'no exit'))\n"
        "    except SystemExit as e:\n"
        "        if e.code not in (0, None):\n"
        "            bad.append((s, e.code))\n"
        "print('BAD', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    scripts = [os.path.join(ROOT, "benchmarks", s) for s in ("bench_ops.py", "bench_cpu.py", "bench_memory.py",
                                                             "bench_e2e.py")]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code, *scripts], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    assert p.stdout.count("usage:") == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_quick_run_is_well_formed(tmp_path):
    """The GPU paths (CUDA events, queue-ahead spin, L2 flush, peak CUDA memory, the end-to-end step
    in bf16) at the quick preset's tiny sizes, without torch.compile: outputs complete and finite,
    every lorafa variant measured."""
    args = bench.build_parser().parse_args(["--preset", "quick", "--device", "cuda", "--compile", "none",
                                            "--out", str(tmp_path), "--no-progress", "--no-plots"])
    bench.run(args)
    data = _strict_load(tmp_path / "results.json")
    assert data["meta"]["device"].startswith("cuda") and data["meta"]["backend"] == "cuda"
    for path, v in _walk_numbers(data):
        assert math.isfinite(v), path
    # results.json stores NaN/inf as null and says so in a note: there must be none
    assert not [n for n in data["notes"] if n.startswith("non-finite values written as null")], data["notes"]
    seen = {r["variant"] for r in data["micro"]["cases"]}
    assert {"cublas", "lorafa", "lorafa_dropout", "lorafa_correction"} <= seen
    assert all(r["fwdbwd_us"] > 0 for r in data["micro"]["cases"])
    mem = data["memory"]["cases"]
    assert mem and all(r["peak_fwdbwd_bytes"] > 0 for r in mem if r["variant"].startswith("lorafa"))
    if HAS_TRANSFORMERS:
        rows = data["e2e"]["rows"]
        assert any(r["method"] == "lorafa" and r["status"] == "ok" for r in rows)
        assert all(r["peak_mem_gib"] > 0 for r in rows if r["status"] == "ok")


# ------------------------------------------------------------------ honest figures


def test_stats_spread_and_noisy_rule():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]  # inclusive quartiles 2 and 4, median 3
    assert stats.rel_iqr(xs) == pytest.approx(2.0 / 3.0)
    assert stats.rel_iqr([7.0]) is None
    r, s = stats.paired_ratio([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert r == pytest.approx(2.0) and s == pytest.approx(0.0)  # drift common to both cancels
    assert stats.combined_spread(0.03, 0.04) == pytest.approx(0.05)
    assert not stats.is_noisy(0.05, stats.MIN_SAMPLES)
    assert stats.is_noisy(0.05, stats.MIN_SAMPLES - 1)  # too few samples
    assert stats.is_noisy(stats.NOISY_SPREAD * 1.01, 100)
    assert stats.is_noisy(None, 100)


def test_measure_warms_up_and_interleaves():
    """Warm-up of every variant first, then one sample of each per round, the order rotating."""
    calls = []
    x = torch.randn(4, 3, requires_grad=True)

    def step(name):
        def fwd(k):
            calls.append(name)
            return x * 2

        return Step(fwd, lambda k: [x], lambda k: torch.ones(4, 3))

    cfg = TimingConfig(warmup=2, reps=4, max_reps=4, min_time_s=0.0, max_time_s=60.0)
    samples, failures = measure({"a": step("a"), "b": step("b"), "c": step("c")}, torch.device("cpu"), cfg)
    assert not failures and all(len(s) == 4 for s in samples.values())
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up
    rounds = [calls[6 + 3 * i: 9 + 3 * i] for i in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_noisy_ratios_are_marked_in_tables():
    from lorafa_ext.bench.report import headline_rows, summary_rows

    row = {"case": "c", "variant": "lorafa", "label": "lorafa", "fwdbwd_us": 10.0, "fwdbwd_tflop_per_s": 1.0,
           "fwd_vs_cublas": 1.5, "fwdbwd_vs_cublas": 1.2, "noisy": ["fwdbwd_vs_cublas"]}
    base = {"case": "c", "variant": "cublas", "label": "F.linear", "fwdbwd_us": 8.0, "noisy": []}
    (line,) = summary_rows([base, row])
    assert line[4] == "1.50x" and line[5] == "~1.20x"
    head = {"shape": "s", "fwd_vs_cublas": 1.5, "fwdbwd_vs_frozen": 1.2, "spread": {"fwdbwd_vs_frozen": 0.3},
            "noisy": ["fwdbwd_vs_frozen"]}
    cells = {r[0]: r for r in headline_rows(head)}
    assert cells["fwd_vs_cublas"][1] == "1.50x" and cells["fwdbwd_vs_frozen"][1:3] == ["~1.20x", "30.0%"]


def test_micro_rows_have_spreads_and_flag_few_samples(quick_run):
    out, _ = quick_run
    data = _strict_load(out / "results.json")
    for r in data["micro"]["cases"]:
        assert r["samples"] < stats.MIN_SAMPLES  # the quick preset takes 3 samples: every figure is noisy
        assert "fwdbwd_us" in r["noisy"]
        if r["variant"] != "cublas":
            assert "fwdbwd_vs_cublas" in r["noisy"] and r["fwdbwd_vs_cublas_spread"] is not None
    assert "~" in (out / "results.md").read_text()


@needs_transformers
def test_e2e_methods_timed_side_by_side():
    methods = ("full", "lorafa") + (("peft_lora",) if HAS_PEFT else ())
    cfg = _e2e_cfg(batch=2, steps=3, methods=methods, grad_ckpt=(False, True))
    res = e2e_mod.run_e2e(cfg, torch.device("cpu"))
    rows = [r for r in res["rows"] if r["status"] == "ok"]
    assert len({r["timing_group"] for r in rows}) == 1  # one batch: every setting in one interleaved group
    for r in rows:
        assert r["samples"] == 3 and len(r["step_samples_ms"]) == 3
        assert r["step_ms"] == pytest.approx(sorted(r["step_samples_ms"])[1])
        assert r["tokens_per_s"] == pytest.approx(2 * cfg.seq / (r["step_ms"] / 1e3))
        assert "tokens_per_s" in r["noisy"]  # 3 samples are too few to support a figure
    for c in res["comparisons"]:
        if HAS_PEFT:
            assert "tokens_ratio_lorafa_over_peft_lora" in c["noisy"]
            assert "~" in compare_table_rows([c])[0][7]


def test_public_api_for_the_gpu_check():
    """What benchmarks/gpu_check.py uses, importable from lorafa_ext.bench itself."""
    cases = bench.gpu_sweep(dtypes=("bf16",), ranks=(16,))
    assert len(cases) == 16 and all(c.dtype == "bf16" and c.r == 16 for c in cases)
    assert len(bench.gpu_sweep()) == 4 * 4 * 4 * 2
    assert bench.timing_config("cuda", "quick").reps == 10
    assert bench.headline_case("cuda") == Case(8192, 4096, 4096, 16, "bf16", True)
    assert all(isinstance(bench.VARIANTS[v].compiled, bool) for v in bench.ALL_VARIANTS)
    assert set(bench.available_variants(bench.ALL_VARIANTS, [])) <= set(bench.ALL_VARIANTS)
    assert callable(bench.run_sweep) and callable(bench.headline_ratios)
    assert bench.HEADLINE_TARGETS["fwd_vs_cublas"] == "<= 1.05"
    assert set(bench.HEADLINE_TARGETS) == set(bench.HEADLINE_KEYS)


def test_importing_the_tooling_sets_no_environment_variable():
    code = ("import os; before = dict(os.environ); import lorafa_ext.bench, lorafa_ext.experiments.genre; "
            "print(sorted(set(os.environ.items()) ^ set(before.items())))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
