"""Builds the emulated CUDA device as two libraries loaded into this process:
  base     csrc/'s op library (schemas, composite, C++ autograd, argument checks) under the namespace
           ``lorafa_emulated``, the SIMT runtime and the device runtime (simt.cpp, runtime.cpp):
           torch.ops.lorafa_emulated.* without kernels, torch.ops.lorafa_emulator.*
  backend  csrc/cuda's host layer, launchers and kernels compiled by the host compiler against simt.h,
           registered as the CPU kernels of torch.ops.lorafa_emulated; from csrc/ or from a copy (the
           planted bugs of planted.py, which patch csrc/cuda only, so the base is shared)
Both are cached in a gitignored folder (build/emulator/) and rebuilt when a source changes. UBSan is on
(-fsanitize=undefined -fno-sanitize-recover=all): undefined behaviour aborts.
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
BUILD_ROOT = os.path.join(ROOT, "build", "emulator")
NAMESPACE = "lorafa_emulated"

_FLAGS = ["-O2", "-g0", "-DLORAFA_EMULATED", f"-DLORAFA_NAMESPACE={NAMESPACE}", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Wno-unknown-pragmas", "-fsanitize=undefined", "-fno-sanitize-recover=all"]


def _load(name, sources, csrc, build_dir, ldflags, verbose):
    from torch.utils.cpp_extension import load

    os.makedirs(build_dir, exist_ok=True)
    load(name=name, sources=sources, extra_cflags=_FLAGS + [f"-I{csrc}", f"-I{HERE}"],
         extra_ldflags=["-fsanitize=undefined"] + ldflags, build_directory=build_dir, is_python_module=False,
         verbose=verbose)
    return os.path.join(build_dir, f"{name}.so")


def build(csrc=None, build_dir=None, verbose=False):
    """Compile what is out of date and load the base and the backend built from ``csrc`` (default:
    csrc/) in ``build_dir`` (default: build/emulator/backend)."""
    base_dir = os.path.join(BUILD_ROOT, "base")
    base = _load("lorafa_emulated_base", [os.path.join(CSRC, f) for f in ("ops.cpp", "autograd.cpp", "checks.cpp")]
                 + [os.path.join(HERE, "simt.cpp"), os.path.join(HERE, "runtime.cpp")], CSRC, base_dir, [], verbose)
    csrc = os.path.abspath(csrc or CSRC)
    _load("lorafa_emulated", [os.path.join(HERE, "host.cpp")], csrc, build_dir or os.path.join(BUILD_ROOT, "backend"),
          [base, f"-Wl,-rpath,{base_dir}"], verbose)
