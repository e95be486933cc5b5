"""The layer variants that the microbenchmarks time, and their work (FLOPs and bytes).

Every variant computes the same layer, y = x W^T + bias + s * (drop(x) A^T) B^T, on the same tensors:

    cublas               F.linear(x, W, bias): the frozen base layer alone (cuBLAS on a GPU); grads: x
    lorafa               torch.ops.lorafa.linear, no dropout; grads: x, B
    lorafa_dropout       the same with dropout_p = 0.1 (mask regenerated in backward)
    lorafa_correction    the same with correction=True and a cached (A A^T + delta I)^-1 (A is frozen)
    peft_lora            PEFT's LoRA Linear layer, A and B trainable; grads: x, A, B
    peft_lorafa          PEFT's LoRA Linear layer with A frozen (what PEFT's LoRA-FA runs); grads: x, B
    peft_lora_compiled   peft_lora under torch.compile
    peft_lorafa_compiled peft_lorafa under torch.compile

W and bias are frozen in every variant (PEFT's default, bias="none"). PEFT's adapters are created in
x's dtype (``autocast_adapter_dtype=False``) so that every variant computes in the same dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timing import Step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

DROPOUT_P = 0.1


@dataclass(frozen=True)
class Case:
    """One benchmarked shape. x is (N, in_features); scaling = alpha / r with alpha = 2 r."""

    N: int
    in_features: int
    out_features: int
    r: int
    dtype: str = "bf16"
    bias: bool = True

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def alpha(self) -> int:
        return 2 * self.r

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def label(self) -> str:
        return (f"N={self.N} in={self.in_features} out={self.out_features} r={self.r} {self.dtype}"
                + ("" if self.bias else " nobias"))


@dataclass(frozen=True)
class VariantSpec:
    name: str
    label: str
    lora: bool          # has a low-rank path
    trains_a: bool      # A receives a gradient
    dropout: float      # dropout probability on the low-rank path
    peft: bool          # needs the peft package
    compiled: bool      # runs under torch.compile
    builder: str        # which builder makes its step


VARIANTS = {
    v.name: v
    for v in [
        VariantSpec("cublas", "F.linear frozen (baseline)", False, False, 0.0, False, False, "cublas"),
        VariantSpec("lorafa", "lorafa", True, False, 0.0, False, False, "lorafa"),
        VariantSpec("lorafa_dropout", f"lorafa dropout {DROPOUT_P}", True, False, DROPOUT_P, False, False, "lorafa"),
        VariantSpec("lorafa_correction", "lorafa correction", True, False, 0.0, False, False, "lorafa"),
        VariantSpec("peft_lora", "PEFT LoRA", True, True, 0.0, True, False, "peft"),
        VariantSpec("peft_lorafa", "PEFT LoRA (A frozen)", True, False, 0.0, True, False, "peft"),
        VariantSpec("peft_lora_compiled", "PEFT LoRA compiled", True, True, 0.0, True, True, "peft"),
        VariantSpec("peft_lorafa_compiled", "PEFT LoRA (A frozen) compiled", True, False, 0.0, True, True, "peft"),
    ]
}
OURS = ("lorafa", "lorafa_dropout", "lorafa_correction")
PEFT_VARIANTS = tuple(n for n, v in VARIANTS.items() if v.peft)


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as missing
        return False
    return True


# ----------------------------------------------------------------------------------------------
# work model

def flops(case: Case, v: VariantSpec) -> dict:
    """Floating-point operations of one forward and one backward (multiply-add = 2)."""
    n, i, o, r = case.N, case.in_features, case.out_features, case.r
    base = 2 * n * i * o
    fwd, bwd = base, base  # forward GEMM; backward dx = dy W (W frozen: no dW)
    if v.lora:
        fwd += 2 * n * r * (i + o)               # z = x A^T, z B^T
        bwd += 2 * n * o * r + 2 * n * r * i     # t = dy B, t A
        bwd += 2 * n * o * r                     # dB = dy^T z
        if v.trains_a:
            bwd += 2 * n * r * i                 # dA = t^T x
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}


def traffic_bytes(case: Case, v: VariantSpec) -> dict:
    """Compulsory memory traffic: every operand read once, every result written once.

    This is the roofline floor of the layer, so bytes/time is comparable to the memory bandwidth
    ceiling; an implementation that makes extra passes moves more than this.
    """
    e = torch.empty((), dtype=case.torch_dtype).element_size()
    n, i, o, r = case.N, case.in_features, case.out_features, case.r
    fwd = e * (n * i + o * i + n * o) + (e * o if case.bias else 0)   # x, W, (bias) -> y
    bwd = e * (n * o + o * i + n * i)                                  # dy, W -> dx
    if v.lora:
        fwd += e * (r * i + o * r + n * r)        # A, B, write z
        bwd += e * (o * r + r * i + n * r + o * r)  # B, A, z -> dB
        if v.trains_a:
            bwd += e * (n * i + r * i)            # x (saved) -> dA
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}


# ----------------------------------------------------------------------------------------------
# tensors

@dataclass
class TensorSet:
    x: torch.Tensor
    dy: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    gram_inv: torch.Tensor | None = None


def make_sets(case: Case, device, count: int, seed: int = 0) -> list:
    """`count` independent sets of layer tensors (inputs and parameters), for rotation."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt, dev = case.torch_dtype, torch.device(device)
    n, i, o, r = case.N, case.in_features, case.out_features, case.r
    sets = []
    for _ in range(count):
        s = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
        dg = torch.Generator(device=dev).manual_seed(s)

        def rn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=dg, device=dev, dtype=torch.float32) * scale).to(dt)

        x = rn(n, i).requires_grad_(True)
        dy = rn(n, o)
        W = rn(o, i, scale=1 / math.sqrt(i))
        b = rn(o, scale=0.1) if case.bias else None
        A = rn(r, i, scale=1 / math.sqrt(i))
        B = rn(o, r, scale=0.1).requires_grad_(True)
        sets.append(TensorSet(x, dy, W, b, A, B))
    return sets


def rotation_count(case: Case, device, target_bytes: int | None = None, lo: int = 2, hi: int = 8) -> int:
    """How many tensor sets to rotate over so that one cycle touches more than `target_bytes`
    (default twice the GPU's L2 cache; on the CPU 24 MiB, several times a core's L2, at most 4 sets)."""
    device = torch.device(device)
    if target_bytes is None:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            target_bytes = 2 * int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
        else:
            target_bytes, hi = 24 * 2**20, min(hi, 4)
    e = torch.empty((), dtype=case.torch_dtype).element_size()
    per_set = e * (case.N * case.in_features + case.N * case.out_features + case.in_features * case.out_features)
    return max(lo, min(hi, math.ceil(target_bytes / max(per_set, 1))))


# ----------------------------------------------------------------------------------------------
# builders

def _step_cublas(case, v, sets):
    def fwd(k):
        s = sets[k]
        return F.linear(s.x, s.W, s.b)

    return Step(fwd, lambda k: [sets[k].x], lambda k: sets[k].dy, len(sets))


def _step_lorafa(case, v, sets):
    import lorafa_ext  # noqa: F401 - registers torch.ops.lorafa

    op = torch.ops.lorafa.linear
    scaling = case.scaling
    correction = v.name == "lorafa_correction"
    if correction:
        for s in sets:
            # A is frozen, so a layer computes (A A^T + delta I)^-1 once and passes it on every call.
            s.gram_inv = torch.ops.lorafa.gram_inverse(s.A, 1e-6)
    p = v.dropout

    def fwd(k):
        s = sets[k]
        return op(s.x, s.W, s.b, s.A, s.B, scaling, dropout_p=p, correction=correction,
                  gram_inv=s.gram_inv if correction else None)

    return Step(fwd, lambda k: [sets[k].x, sets[k].B], lambda k: sets[k].dy, len(sets))


class _Holder(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj


def make_peft_layer(W, b, A, B, r: int, alpha: int, dropout: float = 0.0, train_a: bool = True):
    """PEFT's LoRA Linear wrapping a frozen nn.Linear, with its tensors set to (W, b, A, B).

    Uses only PEFT's public API (LoraConfig + get_peft_model) on a one-layer module.
    Returns (lora_layer, [A_param, B_param]).
    """
    from peft import LoraConfig, get_peft_model

    out_f, in_f = W.shape
    base = torch.nn.utils.skip_init(nn.Linear, in_f, out_f, bias=b is not None, device=W.device, dtype=W.dtype)
    base.weight = nn.Parameter(W.detach(), requires_grad=False)
    if b is not None:
        base.bias = nn.Parameter(b.detach(), requires_grad=False)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"], bias="none")
    pm = get_peft_model(_Holder(base), cfg, autocast_adapter_dtype=False)
    layer = pm.base_model.model.proj
    la, lb = layer.lora_A["default"], layer.lora_B["default"]
    la.weight = nn.Parameter(A.detach(), requires_grad=train_a)
    lb.weight = nn.Parameter(B.detach(), requires_grad=True)
    return layer, ([la.weight, lb.weight] if train_a else [lb.weight])


def raise_recompile_limit(limit: int = 64) -> None:
    """Benchmarks compile one layer class for many shapes: lift dynamo's per-function recompile limit."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < limit:
            setattr(cfg, name, limit)


def _step_peft(case, v, sets, dynamic=False):
    mods, params = [], []
    if v.compiled:
        raise_recompile_limit()
    for s in sets:
        layer, ps = make_peft_layer(s.W, s.b, s.A, s.B, case.r, case.alpha, v.dropout, v.trains_a)
        if v.compiled:
            # One compiled graph serves every rotated copy (the parameters are graph inputs).
            layer = torch.compile(layer, dynamic=dynamic)
        mods.append(layer)
        params.append(ps)

    def fwd(k):
        return mods[k](sets[k].x)

    return Step(fwd, lambda k: [sets[k].x, *params[k]], lambda k: sets[k].dy, len(sets))


_BUILDERS: dict = {"cublas": _step_cublas, "lorafa": _step_lorafa, "peft": _step_peft}


def build_step(name: str, case: Case, sets: list, dynamic: bool | None = False) -> Step:
    """The timed step of variant `name` on `sets`. `dynamic` is torch.compile's (compiled variants
    only): False (the default) compiles for this exact shape, None lets dynamo generalise over N."""
    v = VARIANTS[name]
    if v.builder == "peft":
        return _step_peft(case, v, sets, dynamic=dynamic)
    return _BUILDERS[v.builder](case, v, sets)


Builder = Callable[[Case, VariantSpec, list], Step]
