"""Why the correction does (or does not) change training: the conditioning of A A^T in our layers and
how far the corrected gradient of B is from the plain one."""
from __future__ import annotations

import statistics
from typing import Sequence

import torch
from torch import nn

from .config import METHODS, Size
from .data import BalancedSampler
from .model import build


def _layer_stats(model) -> dict:
    """Per adapted layer: cond(A A^T), mean eigenvalue, expected norm ratio, and (when B has a
    gradient) the cosine and norm ratio between dB and the corrected dB*."""
    import lorafa_ext

    st = {"conds": [], "coss": [], "ratios": [], "eig_means": [], "expected": []}
    for mod in model.modules():
        if not (hasattr(mod, "lora_A") and isinstance(getattr(mod, "lora_B", None), nn.Parameter)):
            continue
        ev = torch.linalg.eigvalsh(mod.lora_A.detach().double() @ mod.lora_A.detach().double().T)
        st["conds"].append(float(ev[-1] / ev[0]))
        st["eig_means"].append(float(ev.mean()))
        st["expected"].append(1.0 / (mod.scaling ** 2 * float(ev.mean())))
        dB = mod.lora_B.grad
        if dB is None:
            continue
        corr = lorafa_ext.correct_grad(dB, lorafa_ext.gram_inverse(mod.lora_A.detach()), mod.scaling)
        st["coss"].append(float(nn.functional.cosine_similarity(dB.flatten().double(), corr.flatten().double(), dim=0)))
        st["ratios"].append(float(corr.norm() / dB.norm().clamp_min(1e-30)))
    return st


def _summary(st: dict) -> dict:
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    return {"layers": len(st["conds"]), "cond_AAt_mean": statistics.fmean(st["conds"]),
            "cond_AAt_max": max(st["conds"]), "eig_AAt_mean": statistics.fmean(st["eig_means"]),
            "cos_dB_dBcorr_mean": mean(st["coss"]), "cos_dB_dBcorr_min": min(st["coss"]) if st["coss"] else None,
            "norm_ratio_dBcorr_over_dB_mean": mean(st["ratios"]), "expected_norm_ratio": mean(st["expected"])}


def _one_rank(encoder, data, size: Size, device, r: int) -> dict:
    model, _, _ = build(METHODS["ours_kaiming_nocorr"], r, 1e-3, 0, encoder, device)
    ix = BalancedSampler(data["train"].labels, size.batch, 0).next()
    ids, y = data["train"].input_ids[ix].to(device), data["train"].labels[ix].to(device)
    # B = 0 at init makes dB depend on nothing but A and the data; take one sign-SGD step (as Adam's
    # first step) so that the gradient also reflects B != 0 (as during training): both are reported.
    model.train()
    rows = {}
    for phase in ("init", "after_1_step"):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)), y).backward()
        rows[phase] = _summary(_layer_stats(model))
        if phase == "init":
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.add_(p.grad.sign(), alpha=-1e-3)
    return rows


def diagnostics(encoder, data, size: Size, device, ranks: Sequence[int]) -> dict:
    """Why the correction does (or does not) change training: for our layers with kaiming A (seed 0),
    the conditioning of A A^T, and for one training batch the cosine between B's plain gradient dB and
    the corrected one dB* = (1/s^2) dB (A A^T + delta I)^-1, and their norm ratio. With A A^T close
    to a multiple of I, dB* is close to a multiple of dB, and Adam (which divides every coordinate
    by its own running RMS) takes nearly the same steps with either."""
    return {str(r): _one_rank(encoder, data, size, device, r) for r in ranks}
