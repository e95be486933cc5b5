#!/usr/bin/env python3
"""Microbenchmark sweep: forward, backward and forward+backward of one layer, every variant side by side.

On a GPU: the GPU sweep, N in {512, 2048, 8192, 32768} x (in, out) in {4096x4096, 4096x11008,
11008x4096, 8192x8192} x r in {8, 16, 64, 128} x {bf16, fp16} (``--preset full``, the default here),
median of CUDA-event samples, L2 flushed and inputs rotated. On the CPU: a quick fp32 subset.
Variants: F.linear (frozen, cuBLAS), lorafa (plain / dropout 0.1 / correction), PEFT LoRA, PEFT LoRA
with A frozen, and both PEFT layers under torch.compile (--compile).

    python benchmarks/bench_ops.py [--out FILE] [any option of python -m lorafa_ext.bench]

Writes one results file, bench_out/bench_ops.json by default (--out FILE): cases with *_us median
times and *_spread, *_tflop_per_s, *_gb_per_s. For the plots run python -m lorafa_ext.bench.
"""
import sys

import _common
import torch

if __name__ == "__main__":
    preset = "full" if torch.cuda.is_available() else "default"
    sys.exit(_common.run_suite(__file__, "micro", defaults=["--preset", preset]))
