"""What the LoRA-FA correction (1/s^2) dB (A A^T + delta I)^-1 does to a training step (docs/CORRECTION.md):
with SGD, the step of s B A is the least-squares projection of the full-gradient step onto A's row
space (checked against torch.linalg.lstsq in fp64); with AdamW and an A whose rows are orthogonal
(A A^T diagonal), the correction is a fixed per-column rescaling that Adam cancels, so the
trajectories with and without it agree to Adam's eps; with correlated rows they differ."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lorafa_ext  # noqa: F401  (registers torch.ops.lorafa)
from lorafa_ext.layers import LoRAFALinear

D_IN, D_OUT, R = 13, 11, 4
ALPHA = 6.0
STEPS = 12
LR = 1e-2


def orthonormal_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(D_IN, R, generator=g, dtype=torch.float64)).Q.T


def a_orthogonal_rows():
    """Orthogonal rows of unequal norms: A A^T diagonal but not a multiple of I (PiSSA-like)."""
    norms = torch.tensor([0.2, 0.5, 0.9, 1.4], dtype=torch.float64)
    return orthonormal_rows() * norms[:, None]


def a_correlated_rows():
    """Rows sharing one strong direction: A A^T far from diagonal."""
    q = orthonormal_rows()
    return (q + 0.9 * q[:1]) * 0.6


def batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    return [(torch.randn(9, D_IN, **f64), torch.randn(9, D_OUT, **f64)) for _ in range(STEPS)]


def make_layer(a, correction, eps=1e-6, b=None, seed=2):
    torch.manual_seed(seed)
    layer = LoRAFALinear(nn.Linear(D_IN, D_OUT).double(), R, ALPHA, correction=correction, eps=eps)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        if b is not None:
            layer.lora_B.copy_(b)
    return layer


def loss_of(layer, batch):
    x, t = batch
    return nn.functional.mse_loss(layer(x), t)


def trajectory(a, correction, make_opt):
    layer = make_layer(a, correction)
    opt = make_opt([layer.lora_B])
    out = []
    for batch in batches():
        opt.zero_grad()
        loss_of(layer, batch).backward()
        opt.step()
        out.append(layer.lora_B.detach().clone())
    return torch.stack(out)


def rel_diff(p, q):
    return ((p - q).abs().max() / q.abs().max()).item()


def adamw(eps):
    return lambda params: torch.optim.AdamW(params, lr=LR, eps=eps, weight_decay=0.01)


# ---------------------------------------------------------------------------------- Adam


def test_adamw_cancels_the_correction_for_orthogonal_rows():
    a = a_orthogonal_rows()
    gram = a @ a.T
    assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-14  # diagonal ...
    assert torch.diagonal(gram).max() / torch.diagonal(gram).min() > 40  # ... far from a multiple of I
    # Adam's eps -> 0: the same trajectory up to rounding
    tiny = adamw(1e-30)
    assert rel_diff(trajectory(a, True, tiny), trajectory(a, False, tiny)) < 1e-12
    # the default eps: the correction's per-column scale d_j only rescales eps to eps / d_j
    default = adamw(1e-8)
    assert rel_diff(trajectory(a, True, default), trajectory(a, False, default)) < 1e-5


def test_adamw_does_not_cancel_the_correction_for_correlated_rows():
    a = a_correlated_rows()
    gram = a @ a.T
    norms = torch.diagonal(gram).sqrt()
    correlation = gram / (norms[:, None] * norms[None, :]) - torch.eye(R, dtype=gram.dtype)
    assert correlation.abs().max() > 0.4
    default = adamw(1e-8)
    assert rel_diff(trajectory(a, True, default), trajectory(a, False, default)) > 0.05


# ---------------------------------------------------------------------------------- SGD


def full_weight_gradient(layer, batch):
    """dL/dW at the current merged weight W + s B A, from plain fp64 autograd (no LoRA-FA op)."""
    w = (layer.base_layer.weight + layer.scaling * layer.lora_B @ layer.lora_A).detach().clone().requires_grad_(True)
    x, t = batch
    loss = nn.functional.mse_loss(nn.functional.linear(x, w, layer.base_layer.bias.detach()), t)
    (grad,) = torch.autograd.grad(loss, w)
    return grad


@pytest.mark.parametrize("a_of", [a_correlated_rows, a_orthogonal_rows], ids=["correlated", "orthogonal"])
def test_sgd_with_correction_is_the_least_squares_projection_of_the_full_step(a_of):
    """One SGD step on B with the correction (eps = 0): s * (B1 - B0) = argmin_M ||M A - (-lr G)||_F."""
    a = a_of()
    g = torch.Generator().manual_seed(3)
    b0 = torch.randn(D_OUT, R, generator=g, dtype=torch.float64) * 0.3  # a general point, not B = 0
    batch = batches()[0]
    expected_step = {}
    for correction in (True, False):
        layer = make_layer(a, correction, eps=0.0, b=b0)
        grad_w = full_weight_gradient(layer, batch)
        opt = torch.optim.SGD([layer.lora_B], lr=LR)
        loss_of(layer, batch).backward()
        opt.step()
        expected_step[correction] = layer.scaling * (layer.lora_B.detach() - b0)
    projected = torch.linalg.lstsq(a.T, (-LR * grad_w).T).solution.T  # (out, r): min ||A^T M^T + lr G^T||
    torch.testing.assert_close(expected_step[True], projected, rtol=1e-10, atol=1e-12 * projected.abs().max().item())
    # without the correction the step is -lr s^2 G A^T instead: a different matrix (unless A A^T = I / s^2)
    assert rel_diff(expected_step[False], projected) > 0.1
    # and the merged-weight change s dB A is the orthogonal projection of -lr G onto A's row space
    proj = a.T @ torch.linalg.solve(a @ a.T, a)
    torch.testing.assert_close(expected_step[True] @ a, -LR * grad_w @ proj, rtol=1e-10, atol=1e-14)


def test_the_regulariser_delta_moves_the_sgd_step_by_about_eps():
    """eps = 1e-6 (the default): delta = eps * tr(A A^T) / r changes the corrected step by at most about
    delta / lambda_min(A A^T), relative."""
    a = a_correlated_rows()
    batch = batches()[0]
    steps = []
    for eps in (0.0, 1e-6):
        layer = make_layer(a, True, eps=eps)
        opt = torch.optim.SGD([layer.lora_B], lr=LR)
        loss_of(layer, batch).backward()
        opt.step()
        steps.append(layer.lora_B.detach().clone())
    gram = a @ a.T
    delta = 1e-6 * torch.trace(gram).item() / R
    bound = delta / torch.linalg.eigvalsh(gram).min().item()
    assert 0 < rel_diff(steps[1], steps[0]) <= 2 * bound
