#!/usr/bin/env python3
"""The CPU speed case: fp32, x 4096 x 1024, W 1024 x 1024, r = 16, with bias, on the CPU.

Times our op's forward+backward against the frozen F.linear forward+backward, side by side (median of
perf_counter samples, variants interleaved round by round, inputs rotated), and prints the ratios:

    fwdbwd_vs_frozen          lorafa / F.linear               target: lorafa_ext.bench.CPU_HEADLINE_GOALS
    fwdbwd_dropout_vs_frozen  lorafa dropout 0.1 / F.linear   target: lorafa_ext.bench.CPU_HEADLINE_GOALS
    speedup_vs_peft           PEFT LoRA / lorafa              (for comparison)

    python benchmarks/bench_cpu.py [--reps 25] [--threads N] [--out FILE] [--check]

Writes one results file, bench_out/bench_cpu.json by default. --check exits with status 1 when a
target is missed; a ratio too noisy to judge (marked ~) counts as missed. Timings on a busy machine
are noisy: run it on an otherwise idle one.
"""
import argparse
import sys

import _common
import torch
from _common import bench


def parse(argv):
    c = bench.CPU_HEADLINE
    p = argparse.ArgumentParser(prog="benchmarks/bench_cpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=c.N, help="rows of x (default 4096)")
    p.add_argument("--in-features", type=int, default=c.in_features, help="default 1024")
    p.add_argument("--out-features", type=int, default=c.out_features, help="default 1024")
    p.add_argument("--r", type=int, default=c.r, help="LoRA rank (default 16)")
    p.add_argument("--reps", type=int, default=25, help="interleaved samples per variant (default 25)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up rounds (default 3)")
    p.add_argument("--max-time", type=float, default=120.0, help="stop sampling after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT comparison")
    p.add_argument("--out", "--json", dest="out", default=_common.results_path(__file__),
                   help=f"results file (default {_common.results_path(__file__)})")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    return p.parse_args(argv)


def verdicts(head: dict) -> tuple:
    """(lines, missed keys): every headline ratio against its CPU goal, if it has one."""
    lines, missed = [], []
    for k in ("fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen", "speedup_vs_peft"):
        v, goal, noisy = head.get(k), bench.CPU_HEADLINE_GOALS.get(k), k in head.get("noisy", ())
        verdict = ""
        if goal is not None and v is not None:
            ok = goal.met(v) and not noisy
            verdict = f"target {goal}: " + ("met" if ok else "too noisy to judge" if noisy else "MISSED")
            if not ok:
                missed.append(k)
        lines.append(f"{k:26s} {bench.fmt_x(v, noisy):>8s}  {verdict}")
    return lines, missed


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    case = bench.Case(a.n, a.in_features, a.out_features, a.r, "fp32", True)
    variants = ["cublas", "lorafa", "lorafa_dropout"] + ([] if a.no_peft else ["peft_lora", "peft_lorafa"])
    timing = bench.TimingConfig(warmup=a.warmup, reps=a.reps, max_reps=a.reps, min_time_s=0.0, max_time_s=a.max_time)
    notes = []
    head, rows = bench.headline_ratios("cpu", case=case, variants=variants, timing=timing, notes=notes)
    import lorafa_ext

    print(f"CPU speed case: {case.label} with bias; {bench.device_name('cpu')}; "
          f"torch {torch.__version__}; lorafa_ext backend {lorafa_ext.backend()}")
    print(bench.text_table(["variant", "fwd (us)", "bwd (us)", "fwd+bwd (us)", "fwd+bwd spread", "fwd+bwd GFLOP/s",
                            "fwd+bwd vs frozen (x)", "samples"],
                           [[r["label"], bench.fmt(r["fwd_us"]), bench.fmt(r["bwd_us"]), bench.fmt(r["fwdbwd_us"]),
                             f"{100 * r['fwdbwd_spread']:.1f}%" if r["fwdbwd_spread"] is not None else "-",
                             bench.fmt(r["fwdbwd_tflop_per_s"] * 1e3),
                             bench.fmt_x(r.get("fwdbwd_vs_cublas"), "fwdbwd_vs_cublas" in r["noisy"]),
                             r["samples"]] for r in rows]))
    print()
    lines, missed = verdicts(head)
    print("\n".join(lines + [f"note: {n}" for n in notes]))
    _common.write_results(a.out, {"meta": {"command": " ".join(["python"] + sys.argv), "case": case.label,
                                           "threads": torch.get_num_threads(), "device": bench.device_name("cpu")},
                                  "headline": head, "targets": {k: str(g) for k, g in bench.CPU_HEADLINE_GOALS.items()},
                                  "cases": rows, "notes": notes})
    return 1 if (a.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
