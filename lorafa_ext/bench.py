"""Benchmarks of the LoRA-FA layer: ``python -m lorafa_ext.bench --out DIR``.

Runs on the GPU when there is one, else on the CPU with sizes that finish in about a minute. Three
suites, each optional (``--suites``):

micro   forward, backward and forward+backward of one layer, every variant side by side: F.linear
        (the frozen cuBLAS baseline), our op (plain, dropout 0.1, gradient correction), PEFT's LoRA
        layer (A trainable), PEFT's LoRA layer with A frozen (what PEFT's LoRA-FA runs), and both PEFT
        layers under torch.compile. Median times, TFLOP/s, GB/s.
memory  bytes saved for backward per layer (unique storages, saved_tensors_hooks) against sequence
        length, and the peak CUDA memory of one forward+backward.
e2e     a training step (forward, backward, optimizer) of a Llama-architecture model built from a
        transformers config with random weights: full fine-tuning, PEFT LoRA, PEFT LoRA-FA, ours.

Writes DIR/results.json, DIR/results.md and PNG plots, and prints the tables.

Python API (used by benchmarks/ and by the GPU check):
    headline_ratios(...) -> (headline dict, list of case dicts with median times in microseconds)
    run(args) / main(argv)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import warnings
from typing import Sequence

import torch

from ._bench import e2e as _e2e
from ._bench import memory as _memory
from ._bench import micro as _micro
from ._bench import report as _report
from ._bench.progress import progress
from ._bench.timing import TimingConfig
from ._bench.variants import DTYPES, VARIANTS, Case

CPU_HEADLINE = _micro.CPU_HEADLINE
GPU_HEADLINE = _micro.GPU_HEADLINE
HEADLINE_KEYS = _micro.HEADLINE_KEYS
ALL_VARIANTS = tuple(VARIANTS)
available_variants = _micro.available_variants
run_sweep = _micro.run_sweep
SUITES = ("micro", "memory", "e2e")
DEFAULT_OUT = "bench_out"

# The paper's end-to-end setting and the GPU timing, shared by the default and full GPU presets.
_GPU_E2E = dict(model="llama2-7b", dtype="bf16", batch=8, seq=1024, steps=4, warmup=2, grad_ckpt=(False, True),
                dropouts=(0.0, 0.05))
_GPU_TIMING = dict(warmup=5, reps=30, max_reps=200, min_time_s=0.3, max_time_s=20.0)

# Presets: what each suite runs when the options leave it open. "auto" = default.
PRESETS = {
    "cuda": {
        "quick": dict(ns=[512, 2048], shapes=[(1024, 1024)], ranks=[16], dtypes=["bf16"], compile="headline",
                      seq_lens=[256, 1024], mem_shape=(1024, 1024), mem_r=16, mem_dtype="bf16",
                      e2e=dict(model="tiny", dtype="bf16", batch=2, seq=128, steps=2, warmup=1,
                               grad_ckpt=(False,), dropouts=(0.0,)),
                      timing=dict(warmup=2, reps=10, max_reps=50, min_time_s=0.0, max_time_s=5.0)),
        "default": dict(ns=list(_micro.GPU_NS), shapes=list(_micro.GPU_SHAPES), ranks=[16], dtypes=["bf16"],
                        compile="subset", seq_lens=[512, 1024, 2048, 4096, 8192], mem_shape=(4096, 4096), mem_r=16,
                        mem_dtype="bf16",
                        e2e=_GPU_E2E, timing=_GPU_TIMING),
        "full": dict(ns=list(_micro.GPU_NS), shapes=list(_micro.GPU_SHAPES), ranks=list(_micro.GPU_RANKS),
                     dtypes=list(_micro.GPU_DTYPES), compile="subset", seq_lens=[512, 1024, 2048, 4096, 8192],
                     mem_shape=(4096, 4096), mem_r=16, mem_dtype="bf16",
                     e2e=_GPU_E2E, timing=_GPU_TIMING),
    },
    "cpu": {
        "quick": dict(ns=[32, 64], shapes=[(64, 64)], ranks=[4], dtypes=["fp32"], compile="none",
                      seq_lens=[16, 32], mem_shape=(64, 64), mem_r=4, mem_dtype="fp32",
                      e2e=dict(model="micro", dtype="fp32", batch=2, seq=16, steps=1, warmup=1,
                               grad_ckpt=(False,), dropouts=(0.0,)),
                      timing=dict(warmup=1, reps=3, max_reps=3, min_time_s=0.0, max_time_s=2.0)),
        "default": dict(ns=[512, 1024, 2048, 4096], shapes=[(1024, 1024)], ranks=[16], dtypes=["fp32"],
                        compile="none", seq_lens=[256, 512, 1024, 2048], mem_shape=(1024, 1024), mem_r=16,
                        mem_dtype="fp32",
                        e2e=dict(model="tiny", dtype="fp32", batch=2, seq=64, steps=5, warmup=1,
                                 grad_ckpt=(False, True), dropouts=(0.0, 0.05)),
                        timing=dict(warmup=1, reps=7, max_reps=30, min_time_s=0.3, max_time_s=3.0)),
        "full": dict(ns=[512, 1024, 2048, 4096, 8192], shapes=[(1024, 1024), (1024, 2752), (2752, 1024)],
                     ranks=[8, 16, 64], dtypes=["fp32"], compile="headline", seq_lens=[256, 512, 1024, 2048, 4096],
                     mem_shape=(1024, 1024), mem_r=16, mem_dtype="fp32",
                     e2e=dict(model="tiny", dtype="fp32", batch=8, seq=256, steps=5, warmup=2,
                              grad_ckpt=(False, True), dropouts=(0.0, 0.05)),
                     timing=dict(warmup=2, reps=15, max_reps=60, min_time_s=0.5, max_time_s=10.0)),
    },
}


# ------------------------------------------------------------------------------------------------
# public helpers

def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def timing_config(device=None, preset: str = "default", **overrides) -> TimingConfig:
    kind = torch.device(device or default_device()).type
    d = dict(PRESETS["cuda" if kind == "cuda" else "cpu"][preset]["timing"])
    d.update({k: v for k, v in overrides.items() if v is not None})
    return TimingConfig(**d)


def headline_case(device=None) -> Case:
    """bf16 N=8192 in=out=4096 r=16 with bias on a GPU; the CPU speed case (fp32 4096x1024x1024) on the CPU."""
    return GPU_HEADLINE if torch.device(device or default_device()).type == "cuda" else CPU_HEADLINE


def sweep(ns: Sequence[int], shapes: Sequence[tuple], ranks: Sequence[int], dtypes: Sequence[str],
          bias: bool = True) -> list:
    """Every Case of the product ns x shapes x ranks x dtypes."""
    return _micro.sweep(ns, shapes, ranks, dtypes, bias)


def gpu_sweep(dtypes: Sequence[str] = _micro.GPU_DTYPES, ranks: Sequence[int] = _micro.GPU_RANKS) -> list:
    """The CUDA issue's sweep: N in {512, 2048, 8192, 32768} x (in, out) in {4096x4096, 4096x11008,
    11008x4096, 8192x8192} x r in {8, 16, 64, 128} x {bf16, fp16}, with bias."""
    return _micro.sweep(_micro.GPU_NS, _micro.GPU_SHAPES, ranks, dtypes, True)


def headline_ratios(device=None, *, case: Case | None = None, cases: Sequence[Case] = (),
                    variants: Sequence[str] | None = None, timing: TimingConfig | None = None,
                    compile_all: bool = False, bar=None, notes: list | None = None):
    """Measure the headline case (and any extra `cases`) side by side.

    Returns (headline, rows):
      headline: {"shape": str, "fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen",
                 "speedup_vs_peft", "speedup_vs_peft_compiled"}; a ratio is None when its variant could
                 not run (e.g. peft not installed).
      rows: one dict per (case, variant) with median times fwd_us, bwd_us, fwdbwd_us (microseconds),
            TFLOP/s, GB/s and ratios.
    The compiled PEFT variants run on the headline case (on every case with compile_all=True).
    """
    device = torch.device(device or default_device())
    case = case or headline_case(device)
    notes = notes if notes is not None else []
    vs = _micro.available_variants(variants or ALL_VARIANTS, notes)
    timing = timing or timing_config(device)
    todo = [case] + [c for c in cases if c != case]
    res = _micro.run_sweep(todo, vs, device, timing, compile_for=lambda c: compile_all or c == case, bar=bar)
    return _micro.headline_from_rows(res["cases"], case), res["cases"]


# ------------------------------------------------------------------------------------------------
# CLI

def _ints(s: str) -> list:
    return [int(x) for x in s.replace(" ", "").split(",") if x]


def _floats(s: str) -> list:
    return [float(x) for x in s.replace(" ", "").split(",") if x]


def _shapes(s: str) -> list:
    out = []
    for part in s.replace(" ", "").split(","):
        if part:
            a, b = part.lower().split("x")
            out.append((int(a), int(b)))
    return out


def _names(s: str, allowed: Sequence[str], what: str) -> list:
    if s.strip().lower() == "all":
        return list(allowed)
    names = [x for x in s.replace(" ", "").split(",") if x]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return names


def _list_of(allowed: Sequence[str], what: str):
    def parse(s: str) -> list:
        return _names(s, allowed, what)

    parse.__name__ = what  # argparse names the type in its error message
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lorafa_ext.bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmark the LoRA-FA layer against F.linear (cuBLAS) and PEFT: microbenchmarks, "
                    "activation memory and an end-to-end fine-tuning step. Writes OUT/results.json, "
                    "OUT/results.md and PNG plots.",
        epilog=f"""
presets (the sizes used where the options above leave them open):
  GPU default  N in {{512,2048,8192,32768}} x (in,out) in {{4096x4096, 4096x11008, 11008x4096, 8192x8192}},
               r=16, bf16; compiled PEFT on in=out=4096; memory vs seq len 512..8192 at 4096x4096;
               e2e Llama-2-7B shapes, bf16, batch 8 x seq 1024, grad checkpointing off/on, dropout 0/0.05
  GPU full     the whole CUDA sweep: also r in {{8,16,64,128}} and fp16
  CPU default  fp32, N in {{512..4096}}, 1024x1024, r=16, no torch.compile; tiny Llama e2e (about a minute)
  quick        tiny sizes everywhere (smoke test)

variants: {', '.join(ALL_VARIANTS)}
  cublas = F.linear with W and bias frozen (the baseline); lorafa* = torch.ops.lorafa.linear;
  peft_lora = PEFT LoRA layer, A trainable; peft_lorafa = PEFT LoRA layer with A frozen (what PEFT's
  LoRA-FA runs); *_compiled = under torch.compile. PEFT variants are skipped when peft is missing.
e2e methods: {', '.join(_e2e.METHODS)}

examples:
  python -m lorafa_ext.bench --out results/
  python -m lorafa_ext.bench --suites micro --n 8192 --shapes 4096x4096 --ranks 8,16 --dtypes bf16,fp16
  python -m lorafa_ext.bench --preset full --compile all
""")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default: ./{DEFAULT_OUT})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--preset", default="default", choices=["quick", "default", "full"],
                   help="size preset (see below; default: default)")
    p.add_argument("--suites", default=list(SUITES), type=_list_of(SUITES, "suite"),
                   help="comma list of micro,memory,e2e (default: all)")
    g = p.add_argument_group("microbenchmarks")
    g.add_argument("--n", type=_ints, help="rows of x, comma list, e.g. 512,2048,8192")
    g.add_argument("--shapes", type=_shapes, help="in x out pairs, comma list, e.g. 4096x4096,4096x11008")
    g.add_argument("--ranks", type=_ints, help="LoRA ranks, comma list, e.g. 8,16,64")
    g.add_argument("--dtypes", type=_list_of(tuple(DTYPES), "dtype"), help="comma list of bf16, fp16, fp32")
    g.add_argument("--variants", default=list(ALL_VARIANTS), type=_list_of(ALL_VARIANTS, "variant"),
                   help="comma list of variants (see below) or all (default)")
    g.add_argument("--no-bias", action="store_true", help="layers without bias (default: with bias)")
    g.add_argument("--compile", choices=["none", "headline", "subset", "all"],
                   help="which cases run the torch.compile'd PEFT variants: none, the headline case, the plot "
                        "subset (r=16, first shape; the default on a GPU) or all (compiling takes a while)")
    g.add_argument("--reps", type=int, help="samples per variant (median of these)")
    g.add_argument("--warmup", type=int, help="warm-up rounds per case")
    g.add_argument("--max-case-time", type=float, help="stop sampling a case after this many seconds")
    m = p.add_argument_group("memory")
    m.add_argument("--seq-lens", type=_ints, help="sequence lengths for saved-activation memory, e.g. 512,1024")
    m.add_argument("--mem-shape", type=_shapes, help="in x out of the memory layer, e.g. 4096x4096")
    e = p.add_argument_group("end-to-end")
    e.add_argument("--e2e-model", choices=sorted(_e2e.MODEL_PRESETS), help="model config preset")
    e.add_argument("--e2e-dtype", choices=["bf16", "fp16", "fp32"], help="model dtype")
    e.add_argument("--e2e-batch", type=int, help="batch size (a method that runs out of memory is retried at half the batch; the LoRA methods "
                        "are compared at the largest batch that fits all of them)")
    e.add_argument("--e2e-seq", type=int, help="sequence length")
    e.add_argument("--e2e-steps", type=int, help="timed steps (median)")
    e.add_argument("--e2e-methods", default=list(_e2e.METHODS), type=_list_of(_e2e.METHODS, "e2e method"),
                   help=f"comma list of {','.join(_e2e.METHODS)} or all (default)")
    e.add_argument("--grad-ckpt", choices=["off", "on", "both"], help="gradient checkpointing settings")
    e.add_argument("--lora-dropouts", type=_floats, help="LoRA dropout settings, e.g. 0,0.05")
    e.add_argument("--adapter-dtype", choices=["model", "fp32"], default="model",
                   help="adapters in the model's dtype for every method (default), or fp32 (PEFT's default)")
    o = p.add_argument_group("output")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--seed", type=int, default=0)
    return p


def _resolve_device(s: str) -> torch.device:
    if s == "auto":
        return default_device()
    d = torch.device(s)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    return d


def _compile_rule(mode: str, cases: Sequence[Case], headline: Case):
    if mode == "none":
        return lambda c: False
    if mode == "all":
        return lambda c: True
    if mode == "headline":
        return lambda c: c == headline
    first = cases[0] if cases else headline
    r0 = 16 if any(c.r == 16 for c in cases) else first.r
    return lambda c: c == headline or (c.r == r0 and c.dtype == first.dtype and
                                       (c.in_features, c.out_features) == (first.in_features, first.out_features))


def _pick_headline(cases: Sequence[Case], device) -> Case:
    want = headline_case(device)
    if want in cases or not cases:
        return want
    # The largest N of the first (shape, r, dtype) swept.
    f = cases[0]
    same = [c for c in cases if (c.in_features, c.out_features, c.r, c.dtype) ==
            (f.in_features, f.out_features, f.r, f.dtype)]
    return max(same, key=lambda c: c.N)


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(os.path.join("lorafa_ext", "bench.py")):
        argv = ["-m", "lorafa_ext.bench"] + argv[1:]
    return " ".join(["python"] + argv)


def run(args: argparse.Namespace) -> dict:
    """Run the suites chosen by `args` (from build_parser()) and write the outputs. Returns the results."""
    t_start = time.perf_counter()
    device = _resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # events and streams are the current device's
    kind = "cuda" if device.type == "cuda" else "cpu"
    preset = PRESETS[kind][args.preset]
    suites = [x for x in SUITES if x in args.suites]
    notes: list = []

    import lorafa_ext

    backend = lorafa_ext.backend() if hasattr(lorafa_ext, "backend") else "unknown"
    if device.type == "cpu":
        notes.append("CPU run: sizes are the CPU preset's, not the GPU sweep; timings on a shared CPU are noisy")
    if backend == "python":
        notes.append("lorafa_ext backend is the pure-PyTorch fallback (no compiled extension)")
    elif device.type == "cuda" and backend != "cuda":
        msg = (f"lorafa_ext backend is {backend!r}: the compiled library has no CUDA kernels, so every lorafa "
               "variant fails on this GPU (rebuild with the CUDA toolkit: pip install --no-build-isolation -e .)")
        warnings.warn(msg)
        notes.append(msg)

    ns = args.n or preset["ns"]
    shapes = args.shapes or preset["shapes"]
    ranks = args.ranks or preset["ranks"]
    dtypes = args.dtypes or preset["dtypes"]
    bias = not args.no_bias
    cases = _micro.sweep(ns, shapes, ranks, dtypes, bias)
    variants = _micro.available_variants(args.variants, notes)
    headline = _pick_headline(cases, device)
    compile_mode = args.compile or preset["compile"]
    if compile_mode == "none" and any(VARIANTS[v].compiled for v in variants) and (
            "micro" in suites or "memory" in suites):
        notes.append("torch.compile'd PEFT variants not run (--compile none; on the CPU compiling takes minutes)")
    compile_for = _compile_rule(compile_mode, cases, headline)
    timing = timing_config(device, args.preset, reps=args.reps, warmup=args.warmup,
                           max_time_s=args.max_case_time)
    if args.reps is not None:
        timing.max_reps = max(timing.max_reps, args.reps)

    seq_lens = args.seq_lens or preset["seq_lens"]
    mi, mo = (args.mem_shape[0] if args.mem_shape else preset["mem_shape"])
    mem_dtype = dtypes[0] if args.dtypes else preset["mem_dtype"]
    mem_r = ranks[0] if args.ranks else preset["mem_r"]
    mem_cases = [Case(s, mi, mo, mem_r, mem_dtype, bias) for s in seq_lens]
    mem_variants = [v for v in variants if not VARIANTS[v].compiled or compile_mode != "none"]

    e2e_kw = dict(preset["e2e"])
    for key, val in (("model", args.e2e_model), ("dtype", args.e2e_dtype), ("batch", args.e2e_batch),
                     ("seq", args.e2e_seq), ("steps", args.e2e_steps)):
        if val is not None:
            e2e_kw[key] = val
    if args.grad_ckpt:
        e2e_kw["grad_ckpt"] = {"off": (False,), "on": (True,), "both": (False, True)}[args.grad_ckpt]
    if args.lora_dropouts is not None:
        e2e_kw["dropouts"] = tuple(args.lora_dropouts)
    e2e_cfg = _e2e.E2EConfig(**e2e_kw, methods=list(args.e2e_methods),
                             adapter_dtype=args.adapter_dtype, seed=args.seed)
    if "e2e" in suites:
        try:
            import transformers  # noqa: F401
        except ImportError:
            notes.append("transformers is not installed: end-to-end suite skipped (pip install transformers)")
            suites.remove("e2e")

    total = (len(cases) if "micro" in suites else 0) + (len(mem_cases) if "memory" in suites else 0) + \
        (len(e2e_cfg.grad_ckpt) * len(e2e_cfg.dropouts) if "e2e" in suites else 0)
    bar = progress(total, "lorafa bench", enabled=not args.no_progress)

    dev_name = _report.device_name(device)
    results: dict = {
        "meta": {"device": str(device), "device_name": dev_name, "torch": torch.__version__,
                 "cuda": torch.version.cuda, "backend": backend, "python": platform.python_version(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": _command_line(),
                 "preset": args.preset, "suites": suites, "threads": torch.get_num_threads(),
                 **_report.module_versions(("peft", "transformers", "matplotlib")),
                 "units": {"*_us": "microseconds (median)", "*_tflop_per_s": "TFLOP/s", "*_gb_per_s": "GB/s (1e9 B/s)",
                           "*_mib": "MiB (2^20 bytes)", "*_gib": "GiB (2^30 bytes)", "*_bytes": "bytes",
                           "tokens_per_s": "tokens per second", "*_vs_*": "time ratio (variant / baseline)",
                           "speedup_vs_*": "time ratio (other / ours)"}},
        "notes": notes,
    }
    os.makedirs(args.out, exist_ok=True)

    def save():  # after every suite, so a run cut short still leaves its finished suites
        results["meta"]["seconds"] = time.perf_counter() - t_start
        bad = _report.write_json(os.path.join(args.out, "results.json"), results)
        note = "non-finite values written as null: " + ", ".join(bad[:10])
        if bad and note not in notes:
            notes.append(note)
            _report.write_json(os.path.join(args.out, "results.json"), results)

    try:
        if "micro" in suites:
            t0 = time.perf_counter()
            res = _micro.run_sweep(cases, variants, device, timing, compile_for=compile_for, bar=bar,
                                   seed=args.seed)
            res["headline"] = _micro.headline_from_rows(res["cases"], headline)
            res["variants"] = variants
            res["timing"] = vars(timing)
            res["seconds"] = time.perf_counter() - t0
            results["micro"] = res
            save()
        if "memory" in suites:
            t0 = time.perf_counter()
            res = _memory.run_memory(mem_cases, mem_variants, device, bar=bar, compile_for=compile_for)
            res["seconds"] = time.perf_counter() - t0
            results["memory"] = res
            save()
        if "e2e" in suites:
            t0 = time.perf_counter()
            res = _e2e.run_e2e(e2e_cfg, device, bar=bar, notes=notes)
            res["seconds"] = time.perf_counter() - t0
            results["e2e"] = res
    finally:
        bar.close()

    plots = []
    if not args.no_plots:
        plots = _make_plots(results, args.out, dev_name, notes)
    results["plots"] = [os.path.basename(p) for p in plots]
    save()
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(_report.markdown(results))
    print_summary(results, out=args.out)
    return results


def _make_plots(results: dict, out: str, dev_name: str, notes: list) -> list:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        notes.append("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    plots = []
    micro = results.get("micro")
    if micro and micro["cases"]:
        for dt, r in sorted({(c["dtype"], c["r"]) for c in micro["cases"]}):
            p = _report.plot_speedup_vs_n(micro["cases"], os.path.join(out, f"speedup_vs_n_{dt}_r{r}.png"),
                                          dev_name, r=r, dtype=dt)
            if p:
                plots.append(p)
    mem = results.get("memory")
    if mem and mem["cases"]:
        p = _report.plot_saved_vs_seqlen(mem["cases"], os.path.join(out, "saved_memory_vs_seqlen.png"), dev_name)
        if p:
            plots.append(p)
    e2e = results.get("e2e")
    if e2e and e2e["rows"]:
        p = _report.plot_e2e(e2e, os.path.join(out, "e2e.png"), dev_name)
        if p:
            plots.append(p)
    return plots


def print_summary(results: dict, out: str | None = None, file=None) -> None:
    file = file or sys.stdout
    meta = results["meta"]
    w = lambda s="": print(s, file=file)  # noqa: E731
    w(f"lorafa_ext bench on {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
      f"backend {meta['backend']}")
    micro = results.get("micro")
    if micro:
        if micro["cases"]:
            w()
            w("Microbenchmarks (median, fwd+bwd; ratios are times, speedups are other/ours):")
            w(_report.text_table(_report.SUMMARY_HEADERS, _report.summary_rows(micro["cases"])))
        h = micro.get("headline")
        if h:
            w()
            w(f"Headline ({h['shape']}):")
            w(_report.text_table(["ratio", "value", "meaning"], _report.headline_rows(h)))
        if micro.get("skipped"):
            w(f"({len(micro['skipped'])} variant runs skipped; see results.md)")
    mem = results.get("memory")
    if mem and mem["cases"]:
        w()
        w("Saved activations per layer:")
        w(_report.text_table(_report.MEMORY_HEADERS, _report.memory_table_rows(mem["cases"])))
    e2e = results.get("e2e")
    if e2e and e2e["rows"]:
        w()
        w(f"End-to-end training step ({e2e['config']['model']}, {e2e['config']['dtype']}):")
        w(_report.text_table(_report.E2E_HEADERS, _report.e2e_table_rows(e2e["rows"])))
        if e2e["comparisons"]:
            w()
            w(_report.text_table(_report.COMPARE_HEADERS, _report.compare_table_rows(e2e["comparisons"])))
    for n in results.get("notes", []):
        w(f"note: {n}")
    if out:
        files = ["results.json", "results.md"] + list(results.get("plots", []))
        w(f"wrote {', '.join(os.path.join(out, f) for f in files)} in {meta.get('seconds', 0):.0f} s")


def main(argv: Sequence[str] | None = None, *, defaults: Sequence[str] = (), prog: str | None = None) -> int:
    """CLI entry point. `defaults` are arguments placed before `argv` (so argv overrides them); the
    scripts in benchmarks/ use it to pick their suite, preset and output folder."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if prog:
        parser.prog = prog
    args = parser.parse_args(list(defaults) + argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
