"""The pure-PyTorch backend (lorafa_ext/python_backend/) on every dtype combination that the checks
admit, against the fp64 reference: its kernels called directly (whatever backend is loaded), and the
autograd entry point when it is the loaded backend (LORAFA_FORCE_PYTHON=1)."""
from __future__ import annotations

import itertools

import pytest
import torch

import lorafa_ext
from lorafa_ext import reference
from lorafa_ext.python_backend import kernels
from tests.helpers import (
    assert_matches,
    fp32_tight,
    make_case,
    make_dy,
    ops,
    plain_backward,
    plain_forward,
    ref_backward,
    ref_forward,
    seed_tensor,
)

FLOATS = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PAIRS = list(itertools.product(FLOATS, FLOATS))  # (x/weight/bias dtype, lora_a/lora_b dtype)
LEAD, N_IN, OUT, R = (3, 7), 33, 19, 5
SEED = 987654321


def _admitted(x_name, lora_name):
    """What the checks of every backend admit: adapters in x's dtype or in float32."""
    return lora_name in (x_name, "fp32")


def _case(dtypes):
    return make_case(LEAD, N_IN, OUT, R, *dtypes, seed=3)


def _mask(p):
    return reference.dropout_mask(SEED, 21, N_IN, p) if p else None


@pytest.mark.parametrize("dtypes", PAIRS, ids="-".join)
def test_checks_admit_adapters_in_x_dtype_or_fp32(dtypes):
    c = _case(dtypes)
    args = (c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["scaling"])
    if _admitted(*dtypes):
        kernels.linear_forward(*args)
    else:
        with pytest.raises(RuntimeError, match="lora_a/lora_b must have x's dtype"):
            kernels.linear_forward(*args)


ADMITTED = [d for d in PAIRS if _admitted(*d)]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtypes", ADMITTED, ids="-".join)
def test_kernels_match_reference(dtypes, p):
    c = _case(dtypes)
    x, a, b = c["x"], c["lora_a"], c["lora_b"]
    seed = seed_tensor(SEED, "cpu") if p else None
    mask = _mask(p)
    y, z = kernels.linear_forward(x, c["weight"], c["bias"], a, b, c["scaling"], p, seed)
    zdt = torch.promote_types(x.dtype, a.dtype)
    y_ref, z_ref = ref_forward(c, mask, p)
    y_pl, z_pl = plain_forward(c, mask, p)
    assert_matches(y, y_pl, y_ref, "y", dtype=x.dtype, rtol_abs=fp32_tight(x.dtype), k=N_IN)
    assert_matches(z, z_pl, z_ref, "z", dtype=zdt, rtol_abs=fp32_tight(zdt), k=N_IN)

    dy = make_dy((*LEAD, OUT), x.dtype, "cpu", seed=4)
    dx, d_b, d_bias = kernels.linear_backward(dy, z, c["weight"], a, b, c["scaling"], p, seed, [True, True, True])
    dx_ref, db_ref, dbias_ref = ref_backward(dy, c, mask, p)
    dx_pl, db_pl, dbias_pl = plain_backward(dy, z, c, mask, p)
    assert_matches(dx, dx_pl, dx_ref, "dx", dtype=x.dtype, rtol_abs=fp32_tight(x.dtype), k=OUT)
    assert_matches(d_b, db_pl, db_ref, "dB", dtype=b.dtype, rtol_abs=fp32_tight(b.dtype), k=21)
    assert_matches(d_bias, dbias_pl, dbias_ref, "dbias", dtype=x.dtype, rtol_abs=fp32_tight(x.dtype), k=21)


@pytest.mark.skipif(lorafa_ext.backend() != "python", reason="the Python backend is not the loaded one")
@pytest.mark.parametrize("dtypes", ADMITTED, ids="-".join)
def test_autograd_matches_reference(dtypes):
    c = _case(dtypes)
    p = 0.3
    x = c["x"].clone().requires_grad_(True)
    b = c["lora_b"].clone().requires_grad_(True)
    bias = c["bias"].clone().requires_grad_(True)
    y = ops.linear(x, c["weight"], bias, c["lora_a"], b, c["scaling"], p, False, SEED)
    dy = make_dy(y.shape, x.dtype, "cpu", seed=5)
    y.backward(dy)
    mask = _mask(p)
    y_ref, z_ref = ref_forward(c, mask, p)
    y_pl, z_pl = plain_forward(c, mask, p)
    assert_matches(y.detach(), y_pl, y_ref, "y", dtype=x.dtype, rtol_abs=fp32_tight(x.dtype), k=N_IN)
    dx_ref, db_ref, dbias_ref = ref_backward(dy, c, mask, p)
    dx_pl, db_pl, dbias_pl = plain_backward(dy, z_pl, c, mask, p)
    assert_matches(x.grad, dx_pl, dx_ref, "dx", dtype=x.dtype, rtol_abs=fp32_tight(x.dtype), k=OUT)
    assert_matches(b.grad, db_pl, db_ref, "dB", dtype=b.dtype, rtol_abs=fp32_tight(b.dtype), k=21)
    assert_matches(bias.grad, dbias_pl, dbias_ref, "dbias", dtype=x.dtype, k=21)
