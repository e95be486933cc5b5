"""Builds the emulated CUDA device: csrc/'s CUDA backend (host layer, launchers, kernels) compiled by
the host compiler against simt.h, with the op library (schemas, composite, C++ autograd) under the
namespace ``lorafa_emulated``, as a library loaded into this process (torch.ops.lorafa_emulated.*,
torch.ops.lorafa_emulator.*). The build is cached in a gitignored folder and rebuilt when a source
changes; UBSan is on (-fsanitize=undefined -fno-sanitize-recover): undefined behaviour aborts.
"""
from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BUILD_ROOT = os.path.join(ROOT, "build", "emulator")
NAMESPACE = "lorafa_emulated"

_FLAGS = ["-O2", "-g0", "-DLORAFA_EMULATED", f"-DLORAFA_NAMESPACE={NAMESPACE}", "-fvisibility=hidden",
          "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas",
          "-fsanitize=undefined", "-fno-sanitize-recover=all"]


def sources(csrc):
    return [os.path.join(csrc, "ops.cpp"), os.path.join(csrc, "autograd.cpp"), os.path.join(csrc, "checks.cpp"),
            os.path.join(HERE, "host.cpp"), os.path.join(HERE, "simt.cpp"), os.path.join(HERE, "runtime.cpp")]


def build(csrc=None, build_dir=None, name="lorafa_emulated", verbose=False):
    """Compile (if needed) and return the path of the emulator library built from ``csrc`` (default:
    the repository's csrc/) in ``build_dir`` (default: build/emulator/<name>)."""
    from torch.utils.cpp_extension import load

    csrc = os.path.abspath(csrc or os.path.join(ROOT, "csrc"))
    build_dir = build_dir or os.path.join(BUILD_ROOT, name)
    os.makedirs(build_dir, exist_ok=True)
    load(name=name, sources=sources(csrc), extra_cflags=_FLAGS + [f"-I{csrc}", f"-I{HERE}"],
         extra_ldflags=["-fsanitize=undefined"], build_directory=build_dir, is_python_module=False,
         verbose=verbose)
    return os.path.join(build_dir, f"{name}.so")
