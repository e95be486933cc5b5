"""Every target the benchmarks and the genre experiment judge against, in one place.

A Goal compares one ratio with a threshold. ``HEADLINE_TARGETS`` renders the GPU headline goals as
text ({"fwd_vs_cublas": "<= 1.05", ...}) for records that store them that way.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Goal:
    op: str        # "<=" (a time ratio: lower is better) or ">=" (a speedup or memory ratio)
    value: float

    def met(self, ratio: float | None) -> bool | None:
        """True or False; None when there is no ratio to judge."""
        if ratio is None:
            return None
        return ratio <= self.value if self.op == "<=" else ratio >= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:.2f}"


# The headline case on a GPU (bf16, N=8192, in=out=4096, r=16, with bias); see micro.headline_from_rows.
GPU_HEADLINE_GOALS = {
    "fwd_vs_cublas": Goal("<=", 1.05),
    "fwdbwd_vs_frozen": Goal("<=", 1.06),
    "fwdbwd_dropout_vs_frozen": Goal("<=", 1.10),
    "speedup_vs_peft": Goal(">=", 1.35),
    "speedup_vs_peft_compiled": Goal(">=", 1.15),
}
HEADLINE_TARGETS = {k: str(g) for k, g in GPU_HEADLINE_GOALS.items()}

# The CPU speed case (fp32, N=4096, in=out=1024, r=16, with bias): benchmarks/bench_cpu.py.
CPU_HEADLINE_GOALS = {
    "fwdbwd_vs_frozen": Goal("<=", 1.15),
    "fwdbwd_dropout_vs_frozen": Goal("<=", 1.25),
}

# End-to-end training step on a GPU, ours against PEFT LoRA at the compared batch.
E2E_GOALS = {
    "mem_ratio_peft_lora_over_lorafa": Goal(">=", 1.4),      # peak memory PEFT LoRA / ours
    "tokens_ratio_lorafa_over_peft_lora": Goal(">=", 1.3),   # tokens/s ours / PEFT LoRA
}

# The genre experiment (test accuracy in points): ours with the better data-aware A at most this far
# below PEFT LoRA, as the 95% lower bound of the paired difference over passages and seeds.
GENRE_MAX_GAP_TO_LORA_PTS = 1.0
