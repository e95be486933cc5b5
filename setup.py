"""Build the extension lorafa_ext._C: a CUDAExtension when a CUDA toolkit is found, else a CppExtension.
The package metadata and extras are in pyproject.toml.

Environment:
  LORAFA_BUILD_CUDA=0/1   force the CPU-only or the CUDA build (default: CUDA iff a toolkit is found)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default: build_config.json's cuda_arch_list)
  CUDA_HOME               the toolkit (default: the nvcc on PATH, resolved through wrappers)
  MAX_JOBS                parallel compile jobs (torch's build honours it)
  LORAFA_DEBUG=1          -O0 -g host code, -lineinfo device code
The decision never asks for a GPU: it looks for the toolkit only.

build_config.json, read by this file and by CMakeLists.txt, holds what the two builds share:
  sources                 globs of the C++ sources of every build
  cuda_sources            globs of the sources added to a CUDA build
  python_module_sources   sources of the Python module only (they include Python.h; CMake leaves them out)
  cuda_arch_list          the default TORCH_CUDA_ARCH_LIST
  nvidia_wheel_dirs       globs, relative to torch's site-packages, of the nvidia-* wheels' roots (each
                          with include/ and lib/): cuBLAS is taken from there first, else from the toolkit
  cublas_header, cublas_library   the files sought there (the library by a versioned name, lib*.so.N)
"""
import glob
import json
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "build_config.json")) as f:
    CONFIG = json.load(f)


def _find_cuda_home():
    """The CUDA toolkit root: $CUDA_HOME, else the nvcc on PATH (following wrapper scripts), else
    /usr/local/cuda. None when there is no nvcc."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A dry run names the real toolkit (TOP=...) even when PATH holds a wrapper script.
        try:
            out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                                 text=True, timeout=60).stderr
            for line in out.splitlines():
                if line.startswith("#$ TOP="):
                    top = line.split("=", 1)[1].strip()
                    if os.path.exists(os.path.join(top, "bin", "nvcc")):
                        return os.path.realpath(top)
        except (OSError, subprocess.SubprocessError):
            pass
        home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def _want_cuda(cuda_home):
    forced = os.environ.get("LORAFA_BUILD_CUDA")
    if forced is not None:
        if forced == "1" and cuda_home is None:
            sys.exit("LORAFA_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return forced == "1"
    import torch

    return cuda_home is not None and torch.version.cuda is not None


CUDA_HOME = _find_cuda_home()
if CUDA_HOME is not None:
    os.environ["CUDA_HOME"] = CUDA_HOME  # before torch.utils.cpp_extension reads it
WITH_CUDA = _want_cuda(CUDA_HOME)
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CONFIG["cuda_arch_list"])

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _sources(key):
    """The files matched by build_config.json's globs under ``key``, relative to the top, sorted."""
    return sorted({f for pattern in CONFIG[key] for f in glob.glob(pattern, root_dir=ROOT)})


def _cublas():
    """(include_dirs, library_dirs, link_args) for cuBLAS from the first nvidia wheel that has it,
    linked by its versioned name (the wheels ship no unversioned .so) with an rpath to its folder;
    torch loads the same library first in any case. Without one, the toolkit's (-lcublas)."""
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    roots = sorted({d for pattern in CONFIG["nvidia_wheel_dirs"]
                    for d in glob.glob(os.path.join(site_packages, pattern))})
    for root in roots:
        lib_dir, include_dir = os.path.join(root, "lib"), os.path.join(root, "include")
        versioned = sorted(glob.glob(os.path.join(lib_dir, CONFIG["cublas_library"] + ".*")))
        if versioned:
            has_header = os.path.exists(os.path.join(include_dir, CONFIG["cublas_header"]))
            link = [f"-l:{os.path.basename(versioned[0])}", f"-Wl,-rpath,{lib_dir}"]
            return [include_dir] if has_header else [], [lib_dir], link
    return [], [], ["-lcublas"]


def extensions():
    debug = os.environ.get("LORAFA_DEBUG") == "1"
    host_flags = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is a header template over OpenMP; without it the CPU loops run serially.
    host_flags += ["-Wall", "-Wextra", "-Wno-unused-parameter", "-fopenmp"]
    # The standard is ours, not torch's default (C++17 in torch 2.11's cpp_extension, C++20 later): the
    # sources use C++20. torch adds its own -std only when none is given.
    std = f"-std=c++{CONFIG['cxx_standard']}"
    host_flags.append(std)
    sources = sorted(set(_sources("sources")) | set(_sources("python_module_sources")))
    kwargs = dict(extra_compile_args={"cxx": host_flags}, extra_link_args=["-fopenmp"], py_limited_api=False)
    if not WITH_CUDA:
        return [CppExtension("lorafa_ext._C", sources, **kwargs)]
    sources += _sources("cuda_sources")
    nvcc_flags = [std, "-O3", "--expt-relaxed-constexpr", "-Xcompiler=-Wall"]
    nvcc_flags += ["-lineinfo"] if debug else []
    include_dirs, library_dirs, link_args = _cublas()
    kwargs["extra_compile_args"] = {"cxx": host_flags + ["-DLORAFA_WITH_CUDA"], "nvcc": nvcc_flags}
    kwargs.update(include_dirs=include_dirs, library_dirs=library_dirs, extra_link_args=["-fopenmp"] + link_args)
    return [CUDAExtension("lorafa_ext._C", sources, **kwargs)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
