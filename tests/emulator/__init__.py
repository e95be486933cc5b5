"""The emulated CUDA device of the test suite (README.md here): csrc/'s CUDA backend compiled for the
CPU (build.py), registered as torch.ops.lorafa_emulated with the same schemas as torch.ops.lorafa, on CPU
tensors. ``load()`` builds (cached) and loads it once per process: from csrc/, or from the copy named by
LORAFA_EMULATOR_CSRC in the build folder LORAFA_EMULATOR_BUILD (the planted-bug runs, planted.py)."""
from __future__ import annotations

import os

import torch

from tests.emulator.build import NAMESPACE, build

# The ops whose fakes (lorafa_ext.ops._<op>_fake) are registered for the emulated namespace too.
_OPS = ["_linear", "linear_forward", "linear_backward", "gram_inverse", "correct_grad", "dropout_mask"]
_loaded = {}


def skip_reason():
    """Why the emulated device does not run in this test session, or None."""
    if os.environ.get("LORAFA_FORCE_PYTHON") == "1":
        return "the emulated CUDA device runs in the compiled-backend session (LORAFA_FORCE_PYTHON=1)"
    if os.environ.get("LORAFA_EMULATOR") == "0":
        return "LORAFA_EMULATOR=0"
    return None


def load():
    """torch.ops.lorafa_emulated, built if needed and loaded, with its fakes."""
    if "ops" not in _loaded:
        build(os.environ.get("LORAFA_EMULATOR_CSRC"), os.environ.get("LORAFA_EMULATOR_BUILD"))
        from lorafa_ext import ops as lorafa_ops

        for name in _OPS:
            fake = getattr(lorafa_ops, f"_{name.lstrip('_')}_fake")
            torch.library.register_fake(f"{NAMESPACE}::{name}")(fake)
        _loaded["ops"] = getattr(torch.ops, NAMESPACE)
    return _loaded["ops"]


def control():
    """torch.ops.lorafa_emulator: set_schedule_seed(seed), set_dry_run(on), launches()."""
    load()
    return torch.ops.lorafa_emulator
