#!/usr/bin/env python3
"""End-to-end training step of a Llama-architecture model (transformers config, random weights).

On a GPU (default): Llama-2-7B shapes, bf16, batch 8 x seq 1024, gradient checkpointing off and on,
lora_dropout 0 and 0.05, LoRA r = 16, alpha = 32 on every linear layer. On the CPU: a tiny config.
Methods: full fine-tuning, PEFT LoRA, PEFT LoRA-FA (create_lorafa_optimizer), lorafa_ext. Reports
tokens/s and peak memory of a step (forward, backward, optimizer); a method that runs out of memory
is reported as OOM and retried at half the batch, and the LoRA methods are compared at the largest
batch that fits all of them (full fine-tuning is shown beside them, as OOM where it does not fit).
Goals on a GPU: peak memory >= 1.4x lower than PEFT LoRA, tokens/s >= 1.3x PEFT LoRA.

    python benchmarks/bench_e2e.py [--e2e-model llama2-7b|tiny|micro] [--e2e-batch 8] [--e2e-seq 1024]
                                   [--grad-ckpt off|on|both] [--lora-dropouts 0,0.05] [--out FILE]

Writes one results file, bench_out/bench_e2e.json by default (--out FILE).
"""
import sys

import _common

if __name__ == "__main__":
    sys.exit(_common.run_suite(__file__, "e2e"))
