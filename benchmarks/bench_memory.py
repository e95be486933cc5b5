#!/usr/bin/env python3
"""Activation memory of one layer, every variant: bytes saved for backward (unique storages, counted
with saved_tensors_hooks, parameters excluded) against sequence length, and (CUDA) the peak memory of
one forward+backward.

    python benchmarks/bench_memory.py [--seq-lens 512,1024,2048] [--mem-shape 4096x4096] [--out FILE]

Writes one results file, bench_out/bench_memory.json by default (--out FILE). Our layer saves only
z = drop(x) A^T (N x r); PEFT's LoRA layer also saves x (N x in), and with dropout its dropped copy.
"""
import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.run_suite(__file__, "memory"))
