"""The fp64 reference itself: Philox known answers, mask definition, forward/backward vs autograd."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import make_case, make_dy
from lorafa_ext import reference

M32 = 0xFFFFFFFF

# Random123 kat_vectors, philox4x32 with 10 rounds: (counter, key, expected output)
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((M32, M32, M32, M32), (M32, M32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    got = tuple(int(v) for v in reference.philox4x32(counter, key))
    assert got == expected, [hex(v) for v in got]


def test_philox_counter_and_key_sensitivity():
    base = tuple(reference.philox4x32((1, 0, 0, 0), (7, 0)))
    assert all(0 <= int(v) <= M32 for v in base)
    # every counter word and key word changes the output
    for i in range(4):
        c = [1, 0, 0, 0]
        c[i] ^= 1 << 31
        assert tuple(reference.philox4x32(tuple(c), (7, 0))) != base
    assert tuple(reference.philox4x32((1, 0, 0, 0), (7, 1))) != base
    assert tuple(reference.philox4x32((1, 0, 0, 0), (8, 0))) != base


def _mask_by_definition(seed, rows, cols, p):
    """docs/API.md's definition spelled out element by element."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    key = (s & M32, (s >> 32) & M32)
    thr = int(p * 2**32)
    out = torch.empty(rows, cols, dtype=torch.bool)
    for n in range(rows):
        for k in range(cols):
            e = n * cols + k
            c = e >> 2
            word = reference.philox4x32((c & M32, (c >> 32) & M32, 0, 0), key)[e & 3]
            out[n, k] = not (word < thr)
    return out


@pytest.mark.parametrize(
    "seed,rows,cols,p",
    [(0, 3, 5, 0.5), (0x123456789ABCDEF0, 7, 3, 0.3), (-5, 2, 9, 0.9), (2**32 + 1, 1, 13, 0.1)],
)
def test_reference_mask_matches_definition(seed, rows, cols, p):
    got = reference.dropout_mask(seed, rows, cols, p)
    assert got.dtype == torch.bool and got.shape == (rows, cols)
    assert torch.equal(got, _mask_by_definition(seed, rows, cols, p))


def test_reference_mask_p0_keeps_everything():
    assert bool(reference.dropout_mask(3, 4, 6, 0.0).all())


def test_reference_mask_seed_is_uint64_bits():
    # -1 as int64 has the same 64 bits as 2**64 - 1
    assert torch.equal(reference.dropout_mask(-1, 4, 5, 0.5), reference.dropout_mask(2**64 - 1, 4, 5, 0.5))
    assert not torch.equal(reference.dropout_mask(1, 8, 8, 0.5), reference.dropout_mask(2**32 + 1, 8, 8, 0.5))


def _autograd_model(x, w, b, a, bb, s, mask, p):
    """An independent fp64 derivation of the layer via torch.autograd."""
    xd = x if mask is None else x * mask.double() / (1.0 - p)
    y = x @ w.T + s * (xd @ a.T) @ bb.T
    if b is not None:
        y = y + b
    return y


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (3, 5)])
def test_reference_forward_backward_vs_autograd(p, bias, lead):
    n_in, out, r = 11, 6, 3
    c = make_case(lead, n_in, out, r, "fp64", bias=bias, seed=3)
    rows = 1
    for d in lead:
        rows *= d
    mask = reference.dropout_mask(99, rows, n_in, p) if p else None
    if p:
        assert not bool(mask.all()) and bool(mask.any())

    x = c["x"].clone().requires_grad_(True)
    bb = c["lora_b"].clone().requires_grad_(True)
    b = c["bias"].clone().requires_grad_(True) if bias else None
    mask_full = None if mask is None else mask.reshape(*lead, n_in)
    y_ag = _autograd_model(x, c["weight"], b, c["lora_a"], bb, c["scaling"], mask_full, p)
    dy = make_dy(y_ag.shape, "fp64", "cpu", seed=4)
    y_ag.backward(dy)

    y, z = reference.forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"], mask, p)
    assert y.dtype == torch.float64 and y.shape == (*lead, out)
    assert z.shape == (rows, r)
    torch.testing.assert_close(y, y_ag.detach(), rtol=1e-12, atol=1e-12)
    x2 = c["x"].reshape(rows, n_in)
    z_expected = (x2 if mask is None else x2 * mask / (1 - p)) @ c["lora_a"].T
    torch.testing.assert_close(z, z_expected, rtol=1e-12, atol=1e-12)

    dx, d_b, d_bias = reference.backward(dy, c["x"], c["weight"], c["lora_a"], c["lora_b"], c["scaling"], mask, p)
    torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d_b, bb.grad, rtol=1e-12, atol=1e-12)
    if bias:
        torch.testing.assert_close(d_bias, b.grad, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(d_bias, dy.reshape(rows, out).sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("r,n_in", [(1, 9), (4, 9), (8, 33)])
def test_reference_correct_grad_is_least_squares(r, n_in):
    out = 5
    c = make_case(6, n_in, out, r, "fp64", seed=r)
    dy = make_dy((6, out), "fp64", "cpu", seed=7)
    s = c["scaling"]
    g_full = dy.T @ c["x"]  # (out, in)
    _, d_b, _ = reference.backward(dy, c["x"], c["weight"], c["lora_a"], c["lora_b"], s)
    got = reference.correct_grad(d_b, c["lora_a"], s, eps=1e-12)
    # min_g || s g A - G ||_F  <=>  A^T g^T = G^T / s in the least-squares sense
    g_star = torch.linalg.lstsq(c["lora_a"].T, g_full.T / s).solution.T
    torch.testing.assert_close(got, g_star, rtol=1e-7, atol=1e-9)
    # with the default eps, delta = 1e-6 * mean eigenvalue: a small but visible difference
    got_default = reference.correct_grad(d_b, c["lora_a"], s)
    torch.testing.assert_close(got_default, g_star, rtol=1e-4, atol=1e-6)
