"""The emulated CUDA device itself (tests/emulator): launch checks with the CUDA runtime's errors, the
Gram inverse's shared-memory limit, CUDA features it lacks failing the build, and planted bugs that
the CUDA tests must catch."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from tests import emulator
from tests.emulator import planted
from tests.emulator.build import HERE
from tests.helpers import EMULATED, make_case, requires_emulator

pytestmark = [requires_emulator, pytest.mark.emulated]


@pytest.fixture
def dry_run():
    """Launches and GEMMs are checked, not run: configurations far too large to emulate."""
    control = emulator.control()
    control.set_dry_run(True)
    yield
    control.set_dry_run(False)


@pytest.mark.parametrize("dtype,largest", [(torch.float32, 6143), (torch.bfloat16, 6143), (torch.float64, 3071)])
def test_gram_inverse_largest_rank_launches(dry_run, dtype, largest):
    """The largest rank gram_inverse admits launches: all of the kernel's shared memory (the pivot row
    and column and delta) fits 48 KiB, and one more is refused by name before any launch."""
    ops = emulator.load()
    before = emulator.control().launches()
    ops.gram_inverse(torch.randn(largest, 1, dtype=dtype), 1e-6)
    assert emulator.control().launches() == before + 2  # the Gram product and the inversion
    with pytest.raises(RuntimeError, match=rf"rank r = {largest + 1} is too large .*at most {largest}"):
        ops.gram_inverse(torch.randn(largest + 1, 1, dtype=dtype), 1e-6)


def test_ops_launch_kernels():
    """The emulated ops run the CUDA backend's kernels (not some other backend)."""
    ops = emulator.load()
    c = make_case(7, 33, 17, 8, "bf16", "fp32", device=EMULATED, seed=1)
    before = emulator.control().launches()
    ops.linear_forward(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], 1.0, 0.5, torch.tensor(3))
    assert emulator.control().launches() == before + 2  # project (dropout) and expand


_KERNEL_USING = """
#include "simt.h"
template <typename T>
__global__ void k(T* out) {{ out[threadIdx.x] = {expr}; }}
template void k<float>(float*);
"""


@pytest.mark.parametrize("expr,feature", [("__shfl_xor_sync(0xffffffffu, out[0], 1)", "warp shuffles"),
                                          ("atomicAdd(out, T(1))", "atomics"),
                                          ("(__syncwarp(), T(0))", "warp barriers")])
def test_missing_feature_fails_the_build(tmp_path, expr, feature):
    src = tmp_path / "kernel.cpp"
    src.write_text(_KERNEL_USING.format(expr=expr))
    proc = subprocess.run(["c++", "-std=c++20", "-fsyntax-only", f"-I{HERE}", str(src)], capture_output=True,
                          text=True)
    assert proc.returncode != 0
    assert f"has no {feature}" in proc.stderr


SLOW = pytest.mark.skipif(os.environ.get("LORAFA_SLOW_TESTS") != "1",
                          reason="builds the emulated device once per bug (minutes each): LORAFA_SLOW_TESTS=1")


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("name", ["missing_barrier", "wrong_dropout_counter", "wrong_split_count",
                                  "gram_static_delta"])
def test_planted_bug_is_caught(name):
    bug = next(b for b in planted.BUGS if b.name == name)
    caught, detail = planted.run(bug)
    assert caught, f"{bug.name} ({bug.what}): {detail}"
