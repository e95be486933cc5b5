"""Benchmarks of the LoRA-FA layer: ``python -m lorafa_ext.bench --out DIR``.

Runs on the GPU when there is one, else on the CPU with sizes that finish in about a minute and a
half. Three suites, each optional (``--suites``):

micro   forward, backward and forward+backward of one layer, every variant side by side: F.linear
        (the frozen cuBLAS baseline), our op (plain, dropout 0.1, gradient correction), PEFT's LoRA
        layer (A trainable), PEFT's LoRA layer with A frozen (what PEFT's LoRA-FA runs), and both PEFT
        layers under torch.compile. Median times with their spread, TFLOP/s, GB/s.
memory  bytes saved for backward per layer (unique storages, saved_tensors_hooks) against sequence
        length, and the peak CUDA memory of one forward+backward.
e2e     a training step (forward, backward, optimizer) of a Llama-architecture model built from a
        transformers config with random weights: full fine-tuning, PEFT LoRA, PEFT LoRA-FA, ours.

Every timed figure is warmed up, sampled in interleaved rounds across variants (methods), and
reported as a median with its spread; a figure or ratio whose spread is too wide is marked noisy
("~" in the tables, hollow or hatched in the plots; see stats.py). Writes DIR/results.json,
DIR/results.md and PNG plots, and prints the tables.

Python API (benchmarks/ and the GPU check use these; the modules behind them may change):

    headline_ratios(device=None, *, case=None, cases=(), variants=None, timing=None, compile_all=False,
                    bar=None, notes=None) -> (headline, rows)
        the headline case (and `cases`) side by side; headline = {"shape", the HEADLINE_KEYS ratios,
        "spread", "noisy"}, rows = one dict per (case, variant) with *_us median times
    headline_case(device=None) -> Case      GPU: bf16 N=8192 in=out=4096 r=16; CPU: fp32 4096x1024x1024
    gpu_sweep(dtypes=("bf16", "fp16"), ranks=(8, 16, 64, 128)) -> [Case]    the GPU sweep
    sweep(ns, shapes, ranks, dtypes, bias=True) -> [Case]
    timing_config(device=None, preset="default", **overrides) -> TimingConfig
    available_variants(names, notes=None) -> [name]     drops PEFT variants when peft is missing
    run_sweep(cases, variants, device, timing, compile_for=None, rotate=None, bar=None, seed=0)
        -> {"cases": rows, "skipped": [...]}; compile_for(case) says whether compiled variants run
    ALL_VARIANTS, VARIANTS (name -> VariantSpec with .compiled, .peft, ...), Case, TimingConfig
    goals: GPU_HEADLINE_GOALS, CPU_HEADLINE_GOALS, E2E_GOALS, HEADLINE_TARGETS ({key: "<= 1.05"})
    helpers for other tooling: SavedTensorCounter, device_name(device), module_versions(names),
        write_json(path, obj), fmt, fmt_x, text_table, md_table
    build_parser(), collect(args), run(args), main(argv=None)

Modules: presets (sizes), variants (what is timed), timing (the timer), stats (medians, spreads,
the noisy rule), goals (every target), micro, memory, e2e (suites), environment (device and versions),
failures (OOM handling), report (tables, markdown, JSON, plots), cli.
"""
from .cli import ALL_VARIANTS, DEFAULT_OUT, SUITES, build_parser, collect, main, run
from .environment import default_device, device_name, module_versions
from .goals import CPU_HEADLINE_GOALS, E2E_GOALS, GPU_HEADLINE_GOALS, HEADLINE_TARGETS, Goal
from .memory import SavedTensorCounter
from .micro import HEADLINE_KEYS, available_variants, headline_from_rows, run_sweep
from .presets import (CPU_HEADLINE, GPU_DTYPES, GPU_HEADLINE, GPU_NS, GPU_RANKS, GPU_SHAPES, PRESETS, gpu_sweep,
                      headline_case, sweep, timing_config)
from .report import fmt, fmt_x, md_table, print_summary, text_table, write_json
from .stats import MIN_SAMPLES, NOISY_SPREAD
from .timing import TimingConfig
from .variants import DTYPES, VARIANTS, Case


def headline_ratios(device=None, *, case: Case | None = None, cases=(), variants=None,
                    timing: TimingConfig | None = None, compile_all: bool = False, bar=None,
                    notes: list | None = None):
    """Measure the headline case (and any extra `cases`) side by side.

    Returns (headline, rows):
      headline: {"shape": str, "fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen",
                 "speedup_vs_peft", "speedup_vs_peft_compiled", "spread": {key: relative IQR},
                 "noisy": [keys]}; a ratio is None when its variant could not run (e.g. peft missing).
      rows: one dict per (case, variant) with median times fwd_us, bwd_us, fwdbwd_us (microseconds),
            their spreads, TFLOP/s, GB/s and ratios.
    The compiled PEFT variants run on the headline case (on every case with compile_all=True).
    """
    import torch

    device = torch.device(device or default_device())
    case = case or headline_case(device)
    notes = notes if notes is not None else []
    vs = available_variants(variants or ALL_VARIANTS, notes)
    timing = timing or timing_config(device)
    todo = [case] + [c for c in cases if c != case]
    res = run_sweep(todo, vs, device, timing, compile_for=lambda c: compile_all or c == case, bar=bar)
    return headline_from_rows(res["cases"], case), res["cases"]


__all__ = ["ALL_VARIANTS", "CPU_HEADLINE", "CPU_HEADLINE_GOALS", "Case", "DEFAULT_OUT", "DTYPES", "E2E_GOALS",
           "GPU_DTYPES", "GPU_HEADLINE", "GPU_HEADLINE_GOALS", "GPU_NS", "GPU_RANKS", "GPU_SHAPES", "Goal",
           "HEADLINE_KEYS", "HEADLINE_TARGETS", "MIN_SAMPLES", "NOISY_SPREAD", "PRESETS", "SUITES",
           "SavedTensorCounter", "TimingConfig", "VARIANTS", "available_variants", "build_parser", "collect",
           "default_device", "device_name", "fmt", "fmt_x", "gpu_sweep", "headline_case", "headline_from_rows",
           "headline_ratios", "main", "md_table", "module_versions", "print_summary", "run", "run_sweep", "sweep",
           "text_table", "timing_config", "write_json"]
