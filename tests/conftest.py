"""pytest set-up for the lorafa_ext test suite; the shared helpers live in tests/helpers.py."""
from __future__ import annotations

import os

# cuBLAS needs this before CUDA initialises for torch.use_deterministic_algorithms(True) (test_cuda.py)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import DEVICES, HAS_CUDA  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "emulated: runs on the emulated CUDA device (tests/emulator)")
    config.addinivalue_line("markers", "slow: minutes long; skipped unless LORAFA_SLOW_TESTS=1")


@pytest.fixture(autouse=True)
def _stop_on_sticky_cuda_error(request):
    """After a test that used CUDA, synchronise: an asynchronous error (an illegal address) leaves the
    CUDA context unusable, and every later CUDA test of the session would fail for it. Stop the
    session there instead, naming the test that left it."""
    yield
    if HAS_CUDA and torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
        except RuntimeError as err:
            pytest.exit(f"CUDA error after {request.node.nodeid}: {err}; the CUDA context is unusable", returncode=3)


@pytest.fixture(params=DEVICES)
def device(request):
    """"cpu" always, "cuda" only when a GPU is present, EMULATED (the emulated CUDA device) unless
    LORAFA_FORCE_PYTHON=1 or LORAFA_EMULATOR=0 (skipped otherwise)."""
    return request.param
