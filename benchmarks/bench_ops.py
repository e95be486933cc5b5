#!/usr/bin/env python3
"""Microbenchmark sweep: forward, backward and forward+backward of one layer, every variant side by side.

On a GPU: the CUDA issue's sweep, N in {512, 2048, 8192, 32768} x (in, out) in {4096x4096, 4096x11008,
11008x4096, 8192x8192} x r in {8, 16, 64, 128} x {bf16, fp16} (``--preset full``, the default here),
median of CUDA-event samples, L2 flushed and inputs rotated. On the CPU: a quick fp32 subset.
Variants: F.linear (frozen, cuBLAS), lorafa (plain / dropout 0.1 / correction), PEFT LoRA, PEFT LoRA
with A frozen, and both PEFT layers under torch.compile (--compile).

    python benchmarks/bench_ops.py [--out DIR] [any option of python -m lorafa_ext.bench]

Writes DIR/results.json (cases with *_us median times, *_tflop_per_s, *_gb_per_s), DIR/results.md and
DIR/speedup_vs_n_<dtype>_r<r>.png.
"""
import sys

import _common  # noqa: F401
import torch

from lorafa_ext.bench import main

if __name__ == "__main__":
    preset = "full" if torch.cuda.is_available() else "default"
    sys.exit(main(defaults=["--suites", "micro", "--preset", preset, "--out", "bench_out/ops"],
                  prog="benchmarks/bench_ops.py"))
