"""Every bad input of tests/test_errors.py gets the same error from every check layer: the compiled
library (csrc/checks.cpp and the C++ composite, on CPU tensors), the Python backend's kernels and
composite called directly, and the fake kernels on meta tensors (both lorafa_ext/_checks.py)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import lorafa_ext
from lorafa_ext import ops as wrappers
from lorafa_ext.python_backend import kernels
from lorafa_ext.python_backend import ops as python_ops
from tests.helpers import requires_cuda, run_python
from tests.test_errors import BAD_INPUT_IDS, bad_inputs, device_bad_inputs

COMPILED_LOADED = lorafa_ext.backend() != "python"
COMPILED_BUILT = importlib.util.find_spec("lorafa_ext._C") is not None

# `linear` and `lowrank` have no fake: they are composite, and their kernel checks are linear_forward's
# and lowrank_forward's, which every bad input of `linear` / `lowrank` in test_errors.py also goes to.
FAKES = {
    "linear_forward": wrappers._linear_forward_fake,
    "linear_backward": wrappers._linear_backward_fake,
    "lowrank_forward": wrappers._lowrank_forward_fake,
    "lowrank_backward": wrappers._lowrank_backward_fake,
    "gram_inverse": wrappers._gram_inverse_fake,
    "correct_grad": wrappers._correct_grad_fake,
    "dropout_mask": wrappers._dropout_mask_fake,
}


def error_of(fn, args):
    """``"Type: message"`` of the error that fn(*args) raises; None when it raises none."""
    try:
        fn(*args)
    except (RuntimeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def python_backend_fn(op):
    return getattr(python_ops, op) if op in ("linear", "lowrank") else getattr(kernels, op)


def _meta(a):
    return a.detach().to("meta").requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a


COMPILED_CODE = """
import json, torch, lorafa_ext
from tests.test_check_messages import error_of
from tests.test_errors import bad_inputs
assert lorafa_ext.backend() != "python"
print(json.dumps({k: error_of(getattr(torch.ops.lorafa, op), args) for k, (op, args, _) in bad_inputs().items()}))
"""


@pytest.fixture(scope="module")
def compiled_errors():
    """{bad input id: error} from the compiled library, in this process or a fresh one."""
    if COMPILED_LOADED:
        return {k: error_of(getattr(torch.ops.lorafa, op), args) for k, (op, args, _) in bad_inputs().items()}
    if not COMPILED_BUILT:
        pytest.skip("lorafa_ext._C is not built")
    return json.loads(run_python(COMPILED_CODE).strip().splitlines()[-1])


def _assert_same(case, errors):
    compiled = errors["compiled"]
    assert compiled is not None, f"{case}: the compiled library raised no error"
    for layer, err in errors.items():
        assert err == compiled, f"{case}:\n  compiled: {compiled}\n  {layer}: {err}"


@pytest.mark.parametrize("case", BAD_INPUT_IDS)
def test_same_error_in_every_layer(compiled_errors, case):
    op, args, _ = bad_inputs("cpu")[case]
    errors = {"compiled": compiled_errors[case], "python backend": error_of(python_backend_fn(op), args)}
    if op in FAKES:
        errors["fake (meta)"] = error_of(FAKES[op], [_meta(a) for a in args])
    _assert_same(case, errors)


@requires_cuda
@pytest.mark.skipif(not COMPILED_LOADED, reason="the compiled library is not in use")
def test_same_error_in_every_layer_across_devices():
    for case, (op, args, _) in device_bad_inputs().items():
        errors = {"compiled": error_of(getattr(torch.ops.lorafa, op), args),
                  "python backend": error_of(python_backend_fn(op), args)}
        if op in FAKES:  # on the real tensors: meta tensors cannot be on two devices
            errors["fake"] = error_of(FAKES[op], args)
        _assert_same(case, errors)
