"""The command line of ``python -m lorafa_ext.bench``: options, what they resolve to, and the run."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import torch

from . import e2e as _e2e
from . import memory as _memory
from . import micro as _micro
from . import report as _report
from .environment import backend_notes, device_name, meta, resolve_device
from .presets import headline_case, preset_for, sweep, timing_config
from .progress import progress
from .variants import DTYPES, VARIANTS, Case

ALL_VARIANTS = tuple(VARIANTS)
SUITES = ("micro", "memory", "e2e")
DEFAULT_OUT = "bench_out"


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


def _micro_options(p: argparse.ArgumentParser) -> None:
    """--n, --shapes, --ranks, --dtypes, --variants, --compile and the timing."""
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
    g.add_argument("--reps", type=int, help="interleaved samples per variant (median of these)")
    g.add_argument("--warmup", type=int, help="warm-up rounds per case")
    g.add_argument("--max-case-time", type=float, help="stop sampling a case after this many seconds")


def _memory_options(p: argparse.ArgumentParser) -> None:
    """--seq-lens, --mem-shape."""
    m = p.add_argument_group("memory")
    m.add_argument("--seq-lens", type=_ints, help="sequence lengths for saved-activation memory, e.g. 512,1024")
    m.add_argument("--mem-shape", type=_shapes, help="in x out of the memory layer, e.g. 4096x4096")


def _e2e_options(p: argparse.ArgumentParser) -> None:
    """The end-to-end step: model, batch, methods, settings."""
    e = p.add_argument_group("end-to-end")
    e.add_argument("--e2e-model", choices=sorted(_e2e.MODEL_PRESETS), help="model config preset")
    e.add_argument("--e2e-dtype", choices=["bf16", "fp16", "fp32"], help="model dtype")
    e.add_argument("--e2e-batch", type=int, help="batch size (a method that runs out of memory is retried at half the batch; the LoRA methods "
                        "are compared at the largest batch that fits all of them)")
    e.add_argument("--e2e-seq", type=int, help="sequence length")
    e.add_argument("--e2e-steps", type=int, help="timed steps per method, interleaved across methods (median)")
    e.add_argument("--e2e-methods", default=list(_e2e.METHODS), type=_list_of(_e2e.METHODS, "e2e method"),
                   help=f"comma list of {','.join(_e2e.METHODS)} or all (default)")
    e.add_argument("--grad-ckpt", choices=["off", "on", "both"], help="gradient checkpointing settings")
    e.add_argument("--lora-dropouts", type=_floats, help="LoRA dropout settings, e.g. 0,0.05")
    e.add_argument("--adapter-dtype", choices=["model", "fp32"], default="model",
                   help="adapters in the model's dtype for every method (default), or fp32 (PEFT's default)")
    e.add_argument("--e2e-quant", choices=list(_e2e.QUANTS), default="none",
                   help="QLoRA: bitsandbytes-quantized projections (nf4, fp4, int8) under the LoRA methods "
                        "(PEFT QLoRA, PEFT's LoRA-FA optimizer, QLoRA-FA); needs bitsandbytes")


def _output_options(p: argparse.ArgumentParser) -> None:
    """Plots, progress bar, seed."""
    o = p.add_argument_group("output")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--seed", type=int, default=0)


def build_parser(prog: str = "python -m lorafa_ext.bench", out_help: str | None = None,
                 out_default: str = DEFAULT_OUT) -> argparse.ArgumentParser:
    """The options; benchmarks/ scripts pass their own prog and --out (a results file there)."""
    p = argparse.ArgumentParser(
        prog=prog,
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
  CPU default  fp32, N in {{512..4096}}, 1024x1024, r=16, no torch.compile; tiny Llama e2e (about two minutes on 2 idle cores)
  quick        tiny sizes everywhere (smoke test)

variants: {', '.join(ALL_VARIANTS)}
  cublas = F.linear with W and bias frozen (the baseline); lorafa* = torch.ops.lorafa.linear;
  peft_lora = PEFT LoRA layer, A trainable; peft_lorafa = PEFT LoRA layer with A frozen (what PEFT's
  LoRA-FA runs); *_compiled = under torch.compile. PEFT variants are skipped when peft is missing.
e2e methods: {', '.join(_e2e.METHODS)}

figures marked ~ are noisy: spread (IQR / median) above 10% or fewer than 5 samples

examples:
  python -m lorafa_ext.bench --out results/
  python -m lorafa_ext.bench --suites micro --n 8192 --shapes 4096x4096 --ranks 8,16 --dtypes bf16,fp16
  python -m lorafa_ext.bench --preset full --compile all
""")
    p.add_argument("--out", default=out_default, help=out_help or f"output folder (default: ./{out_default})")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    p.add_argument("--preset", default="default", choices=["quick", "default", "full"],
                   help="size preset (see below; default: default)")
    p.add_argument("--suites", default=list(SUITES), type=_list_of(SUITES, "suite"),
                   help="comma list of micro,memory,e2e (default: all)")
    for add in (_micro_options, _memory_options, _e2e_options, _output_options):
        add(p)
    return p


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


def _micro_plan(args, device, notes: list) -> dict:
    """Cases, variants, headline, compile rule and timing of the micro suite."""
    pre = preset_for(device, args.preset)
    cases = sweep(args.n or pre["ns"], args.shapes or pre["shapes"], args.ranks or pre["ranks"],
                  args.dtypes or pre["dtypes"], not args.no_bias)
    variants = _micro.available_variants(args.variants, notes)
    headline = _pick_headline(cases, device)
    mode = args.compile or pre["compile"]
    if mode == "none" and any(VARIANTS[v].compiled for v in variants) and set(args.suites) & {"micro", "memory"}:
        notes.append("torch.compile'd PEFT variants not run (--compile none; on the CPU compiling takes minutes)")
    timing = timing_config(device, args.preset, reps=args.reps, warmup=args.warmup, max_time_s=args.max_case_time)
    if args.reps is not None:
        timing.max_reps = max(timing.max_reps, args.reps)
    return {"cases": cases, "variants": variants, "headline": headline, "compile_mode": mode,
            "compile_for": _compile_rule(mode, cases, headline), "timing": timing}


def _memory_cases(args, device) -> list:
    pre = preset_for(device, args.preset)
    mi, mo = args.mem_shape[0] if args.mem_shape else pre["mem_shape"]
    dtype = args.dtypes[0] if args.dtypes else pre["mem_dtype"]
    r = args.ranks[0] if args.ranks else pre["mem_r"]
    return [Case(s, mi, mo, r, dtype, not args.no_bias) for s in (args.seq_lens or pre["seq_lens"])]


def _e2e_config(args, device) -> "_e2e.E2EConfig":
    kw = dict(preset_for(device, args.preset)["e2e"])
    for key, val in (("model", args.e2e_model), ("dtype", args.e2e_dtype), ("batch", args.e2e_batch),
                     ("seq", args.e2e_seq), ("steps", args.e2e_steps)):
        if val is not None:
            kw[key] = val
    if args.grad_ckpt:
        kw["grad_ckpt"] = {"off": (False,), "on": (True,), "both": (False, True)}[args.grad_ckpt]
    if args.lora_dropouts is not None:
        kw["dropouts"] = tuple(args.lora_dropouts)
    return _e2e.E2EConfig(**kw, methods=list(args.e2e_methods), adapter_dtype=args.adapter_dtype,
                          quant=args.e2e_quant, seed=args.seed)


def _has_transformers(notes: list) -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        notes.append("transformers is not installed: end-to-end suite skipped (pip install transformers)")
        return False
    return True


def _timed(fn, *a, **kw) -> dict:
    t0 = time.perf_counter()
    res = fn(*a, **kw)
    res["seconds"] = time.perf_counter() - t0
    return res


def collect(args: argparse.Namespace, save=None) -> dict:
    """Run the suites chosen by `args` (from build_parser()) and return the results; save(results),
    when given, is called after every suite (so a run cut short still leaves its finished suites)."""
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # events and streams are the current device's
    backend, notes = backend_notes(device)
    suites = [x for x in SUITES if x in args.suites]
    plan = _micro_plan(args, device, notes)
    mem_cases = _memory_cases(args, device)
    e2e_cfg = _e2e_config(args, device)
    if "e2e" in suites and not _has_transformers(notes):
        suites.remove("e2e")
    total = (len(plan["cases"]) if "micro" in suites else 0) + (len(mem_cases) if "memory" in suites else 0) + \
        (len(e2e_cfg.grad_ckpt) * len(e2e_cfg.dropouts) if "e2e" in suites else 0)
    results = {"meta": meta(device, backend, args.preset, suites), "notes": notes}
    save = save or (lambda r: None)

    def done(name, res):
        results[name] = res
        results["meta"]["seconds"] = time.perf_counter() - t_start
        save(results)

    bar = progress(total, "lorafa bench", enabled=not args.no_progress)
    try:
        if "micro" in suites:
            res = _timed(_micro.run_sweep, plan["cases"], plan["variants"], device, plan["timing"],
                         compile_for=plan["compile_for"], bar=bar, seed=args.seed)
            res.update(headline=_micro.headline_from_rows(res["cases"], plan["headline"]),
                       variants=plan["variants"], timing=vars(plan["timing"]))
            done("micro", res)
        if "memory" in suites:
            mem_variants = [v for v in plan["variants"] if not VARIANTS[v].compiled or plan["compile_mode"] != "none"]
            done("memory", _timed(_memory.run_memory, mem_cases, mem_variants, device, bar=bar,
                                  compile_for=plan["compile_for"]))
        if "e2e" in suites:
            done("e2e", _timed(_e2e.run_e2e, e2e_cfg, device, bar=bar, notes=notes))
    finally:
        bar.close()
    results["meta"]["seconds"] = time.perf_counter() - t_start
    return results


def save_json(results: dict, path: str) -> None:
    """Write results.json; non-finite values become null, and a note says where."""
    bad = _report.write_json(path, results)
    note = "non-finite values written as null: " + ", ".join(bad[:10])
    if bad and note not in results["notes"]:
        results["notes"].append(note)
        _report.write_json(path, results)


def make_plots(results: dict, out: str) -> list:
    """The PNG plots of whatever suites ran; a note instead when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        results["notes"].append("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    name, plots = results["meta"]["device_name"], []
    micro, mem, e2e = results.get("micro"), results.get("memory"), results.get("e2e")
    if micro and micro["cases"]:
        for dt, r in sorted({(c["dtype"], c["r"]) for c in micro["cases"]}):
            plots.append(_report.plot_speedup_vs_n(micro["cases"], os.path.join(out, f"speedup_vs_n_{dt}_r{r}.png"),
                                                   name, r=r, dtype=dt))
    if mem and mem["cases"]:
        plots.append(_report.plot_saved_vs_seqlen(mem["cases"], os.path.join(out, "saved_memory_vs_seqlen.png"), name))
    if e2e and e2e["rows"]:
        plots.append(_report.plot_e2e(e2e, os.path.join(out, "e2e.png"), name))
    return [p for p in plots if p]


def run(args: argparse.Namespace) -> dict:
    """Run the suites chosen by `args` and write OUT/results.json, OUT/results.md and the plots;
    prints the summary. Returns the results."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = collect(args, save=lambda r: save_json(r, path))
    plots = [] if args.no_plots else make_plots(results, args.out)
    results["plots"] = [os.path.basename(p) for p in plots]
    save_json(results, path)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(_report.markdown(results))
    _report.print_summary(results, out=args.out)
    return results


def main(argv: Sequence[str] | None = None, *, defaults: Sequence[str] = (), prog: str | None = None) -> int:
    """CLI entry point. `defaults` are arguments placed before `argv` (so argv overrides them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog) if prog else build_parser()
    run(parser.parse_args(list(defaults) + argv))
    return 0
