"""Planted bugs: each is a text patch applied to a temporary copy of csrc/, which the emulated device
is then built from; the tests named for it must fail. ``python -m tests.emulator.planted [NAME ...]``
runs them (all by default) and prints which test caught each; tests/test_emulator.py runs a few of
them as a slow test (LORAFA_SLOW_TESTS=1)."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile

from tests.emulator.build import BUILD_ROOT, ROOT


@dataclasses.dataclass(frozen=True)
class Bug:
    name: str
    what: str
    path: str  # under csrc/
    old: str
    new: str
    tests: tuple  # pytest arguments that must fail


_SHAPES = ("tests/test_cuda.py::test_cuda_shapes_dtypes", "-k", "emulated")
_LOWRANK = ("tests/test_lowrank.py::test_lowrank_forward_backward", "-k", "emulated")

BUGS = [
    Bug("missing_barrier", "project: no __syncthreads() between staging a K tile and reading it",
        "cuda/kernels/project.cuh", "    __syncthreads();\n    // Two-level sum", "    // Two-level sum", _SHAPES),
    Bug("off_by_one", "grad_b_partial: stages one row past its split's end",
        "cuda/kernels/grad_b.cuh", "ys[rr][cc] = (n < n_end && o < out)", "ys[rr][cc] = (n <= n_end && o < out)",
        _SHAPES),
    Bug("wrong_leading_dim", "forward GEMM: x's leading dimension taken as in (wrong for padded rows)",
        "cuda/lorafa_cuda.cu", "gemm(false, true, rows, out, in, 1.0, x2, row_stride(x2), w,",
        "gemm(false, true, rows, out, in, 1.0, x2, in, w,",
        ("tests/test_cuda.py::test_cuda_noncontiguous", "-k", "emulated")),
    Bug("cublas_min_leading_dim", "row_stride: a single row's stride passed to cuBLAS as is",
        "cuda/lorafa_cuda.cu", "return t.size(0) > 1 ? t.stride(0) : std::max<int64_t>(t.size(1), 1);",
        "return t.stride(0);",
        ("tests/test_ops.py::test_size_one_operands_with_degenerate_strides", "-k", "emulated")),
    Bug("wrong_dropout_counter", "project: the dropout counter uses x's row stride instead of K",
        "cuda/kernels/project.cuh", "dropout_keep4(s, static_cast<uint64_t>(n * K + kb), threshold)",
        "dropout_keep4(s, static_cast<uint64_t>(n * sx0 + kb), threshold)",
        ("tests/test_cuda.py::test_cuda_noncontiguous", "-k", "emulated")),
    Bug("unwritten_element", "grad_b_reduce: the last dbias element is never written",
        "cuda/kernels/grad_b.cuh", "for (int64_t idx = first; idx < out; idx += stride)",
        "for (int64_t idx = first; idx < out - 1; idx += stride)", _SHAPES),
    Bug("misaligned_vector_store", "expand: vector stores when C % 4 == 2 (8-byte aligned rows)",
        "cuda/kernels/expand.cuh", "const bool vector_store = (C % 4 == 0)", "const bool vector_store = (C % 2 == 0)",
        _SHAPES),
    Bug("wrong_split_count", "grad_b: splits rounded down, the last rows never summed",
        "cuda/launchers.cuh", "return {std::max<int64_t>(1, ceil_div(rows, rows_per_split)), rows_per_split};",
        "return {std::max<int64_t>(1, rows / rows_per_split), rows_per_split};", _SHAPES),
    Bug("too_large_launch", "project: 512-thread blocks for a kernel with __launch_bounds__(256)",
        "cuda/launchers.cuh", "dim3(kThreads), 0, current_stream(), kThreads};\n  const auto alpha = static_cast<acc_type<PT>>(p.alpha);\n  if (p.dropout_p > 0.0) {\n    launch(config, project_kernel",
        "dim3(2 * kThreads), 0, current_stream(), kThreads};\n  const auto alpha = static_cast<acc_type<PT>>(p.alpha);\n  if (p.dropout_p > 0.0) {\n    launch(config, project_kernel",
        _SHAPES),
    Bug("lowrank_b_transposed", "lowrank_forward: B (out, r) read with its strides swapped",
        "cuda/lorafa_cuda.cu", ".q = b.const_data_ptr<ZT>(), .sq0 = r, .sq1 = 1, .rows = rows",
        ".q = b.const_data_ptr<ZT>(), .sq0 = 1, .sq1 = r, .rows = rows", _LOWRANK),
    Bug("lowrank_grad_b_unscaled", "lowrank_backward: dB without the scaling s",
        "cuda/lorafa_cuda.cu", "grad_b<YT, ZT>(dy, z, &db_z, nullptr, scaling);",
        "grad_b<YT, ZT>(dy, z, &db_z, nullptr, 1.0);", _LOWRANK),
    Bug("gram_static_delta", "gram_invert: delta in static shared memory beside the dynamic rows (the "
        "launch at the largest admitted rank fails)",
        "cuda/kernels/gram_invert.cuh", "  G& delta = colk[r];", "  __shared__ G delta;",
        ("tests/test_emulator.py::test_gram_inverse_largest_rank_launches",)),
]


def _env(csrc, build_dir):
    env = dict(os.environ, LORAFA_EMULATOR_CSRC=csrc, LORAFA_EMULATOR_BUILD=build_dir, COLUMNS="1000")
    env.pop("LORAFA_FORCE_PYTHON", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(bug, keep=False):
    """Build the emulated device with ``bug`` planted and run its tests. Returns (caught, first failing
    test or the reason it was not caught)."""
    tmp = tempfile.mkdtemp(prefix=f"lorafa_bug_{bug.name}_")
    try:
        csrc = os.path.join(tmp, "csrc")
        shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
        path = os.path.join(csrc, bug.path)
        text = open(path).read()
        assert text.count(bug.old) == 1, f"{bug.name}: the patch's old text is not unique in {bug.path}"
        open(path, "w").write(text.replace(bug.old, bug.new))
        build_dir = os.path.join(BUILD_ROOT, "planted", bug.name)
        env = _env(csrc, build_dir)
        built = subprocess.run([sys.executable, "-c", "import os; from tests.emulator.build import build; "
                                "build(os.environ['LORAFA_EMULATOR_CSRC'], os.environ['LORAFA_EMULATOR_BUILD'])"],
                               cwd=ROOT, env=env, capture_output=True, text=True)
        if built.returncode != 0:
            return False, f"the planted copy does not build:\n{built.stdout[-2000:]}{built.stderr[-2000:]}"
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-v", "-s", "-rf", "-p", "no:cacheprovider", *bug.tests],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode == 0:
            return False, "its tests passed"
        failed = re.findall(r"^FAILED (.+)$", proc.stdout, re.M)
        if failed:
            return True, failed[0]
        # a crash (a UBSan report) ends pytest without a summary: the test it was in, and the report
        last = re.findall(r"^(tests/\S+::.+?)(?: (?:PASSED|FAILED|SKIPPED|ERROR).*)?$", proc.stdout, re.M)
        report = re.findall(r"runtime error: .*", proc.stderr)
        return True, f"{last[-1] if last else 'a crash'} - {report[0] if report else proc.stderr[-300:]}"
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main(names):
    chosen = [b for b in BUGS if not names or b.name in names]
    for bug in chosen:
        caught, detail = run(bug)
        print(f"{bug.name}: {'caught by ' if caught else 'NOT CAUGHT: '}{detail}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
