#!/usr/bin/env python3
"""The CPU speed case: fp32, x 4096 x 1024, W 1024 x 1024, r = 16, with bias, on the CPU.

Times our op's forward+backward against the frozen F.linear forward+backward, side by side (median of
perf_counter samples, variants interleaved round by round, inputs rotated), and prints the ratios:

    fwdbwd_vs_frozen          lorafa / F.linear               target <= 1.15
    fwdbwd_dropout_vs_frozen  lorafa dropout 0.1 / F.linear   target <= 1.25
    speedup_vs_peft           PEFT LoRA / lorafa              (for comparison)

    python benchmarks/bench_cpu.py [--reps 25] [--threads N] [--json FILE] [--check]

--check exits with status 1 when a target is missed. Timings on a busy machine are noisy: run it on
an otherwise idle one.
"""
import argparse
import json
import sys

import _common  # noqa: F401
import torch

from lorafa_ext._bench import report
from lorafa_ext._bench.timing import TimingConfig
from lorafa_ext.bench import CPU_HEADLINE, Case, headline_ratios

TARGETS = {"fwdbwd_vs_frozen": 1.15, "fwdbwd_dropout_vs_frozen": 1.25}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/bench_cpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=CPU_HEADLINE.N, help="rows of x (default 4096)")
    p.add_argument("--in-features", type=int, default=CPU_HEADLINE.in_features, help="default 1024")
    p.add_argument("--out-features", type=int, default=CPU_HEADLINE.out_features, help="default 1024")
    p.add_argument("--r", type=int, default=CPU_HEADLINE.r, help="LoRA rank (default 16)")
    p.add_argument("--reps", type=int, default=25, help="samples per variant (default 25)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up rounds (default 3)")
    p.add_argument("--max-time", type=float, default=120.0, help="stop sampling after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    p.add_argument("--json", default=None, help="also write the ratios and cases to this JSON file")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    case = Case(a.n, a.in_features, a.out_features, a.r, "fp32", True)
    variants = ["cublas", "lorafa", "lorafa_dropout"] + ([] if a.no_peft else ["peft_lora", "peft_lorafa"])
    timing = TimingConfig(warmup=a.warmup, reps=a.reps, max_reps=a.reps, min_time_s=0.0, max_time_s=a.max_time)
    notes = []
    head, rows = headline_ratios("cpu", case=case, variants=variants, timing=timing, notes=notes)
    import lorafa_ext

    print(f"CPU speed case: {case.label} with bias; {report.device_name('cpu')}; "
          f"torch {torch.__version__}; lorafa_ext backend {lorafa_ext.backend()}")
    print(report.text_table(["variant", "fwd (us)", "bwd (us)", "fwd+bwd (us)", "fwd+bwd GFLOP/s",
                             "fwd+bwd vs frozen (x)", "samples"],
                            [[r["label"], report.fmt(r["fwd_us"]), report.fmt(r["bwd_us"]), report.fmt(r["fwdbwd_us"]),
                              report.fmt(r["fwdbwd_tflop_per_s"] * 1e3), report.fmt_x(r.get("fwdbwd_vs_cublas")),
                              r["samples"]] for r in rows]))
    print()
    missed = []
    for k in ("fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen", "speedup_vs_peft"):
        v = head.get(k)
        t = TARGETS.get(k)
        verdict = ""
        if t is not None and v is not None:
            verdict = f"target <= {t:.2f}x: " + ("met" if v <= t else "MISSED")
            if v > t:
                missed.append(k)
        print(f"{k:26s} {report.fmt_x(v):>8s}  {verdict}")
    for n in notes:
        print(f"note: {n}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report.sanitize({"headline": head, "targets": TARGETS, "cases": rows}), f, indent=1,
                      allow_nan=False)
    return 1 if (a.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
