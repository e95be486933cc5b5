"""benchmarks/gpu_check.py on a machine without a GPU: the csrc hash, the report parsers, the test
selection plugin, the budget arithmetic, the strict-JSON record, the deadline kill, and the whole check
end to end in its dry run (every GPU step replaced by a CPU stand-in), with and without phases that
run out of time."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "benchmarks" / "gpu_check.py").exists())
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
RECORD_FIELDS = {"date", "device", "torch", "cuda", "csrc_sha", "tests", "sanitizer_errors", "headline", "cases",
                 "phases", "notes", "wall_s"}
HEADLINE_FIELDS = {"shape", "fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen", "speedup_vs_peft",
                   "speedup_vs_peft_compiled"}
OUT_FILES = {"latest.json", "latest.md", "build.log", "tests.log", "sanitizer.log", "bench.log"}


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_csrc_sha_definition(gc, tmp_path):
    (tmp_path / "csrc" / "sub").mkdir(parents=True)
    (tmp_path / "csrc" / "b.cpp").write_bytes(b"int b;\n")
    (tmp_path / "csrc" / "sub" / "a.cu").write_bytes(b"\x00\xff")
    want = hashlib.sha256(b"csrc/b.cpp\0int b;\n\0" + b"csrc/sub/a.cu\0\x00\xff\0").hexdigest()
    assert gc.csrc_sha(tmp_path) == want
    (tmp_path / "csrc" / "b.cpp").write_bytes(b"int c;\n")
    assert gc.csrc_sha(tmp_path) != want


@pytest.mark.parametrize("text,errors,summary", [
    ("========= COMPUTE-SANITIZER\nsanitizer cases done\n========= ERROR SUMMARY: 0 errors\n", 0, True),
    ("========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 3 errors\n", 3, True),
    ("========= ERROR SUMMARY: 1 error\n", 1, True),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 0, True),
    ("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n", 1, True),
    ("========= RACECHECK SUMMARY: 5 hazards displayed (5 errors, 0 warnings)\n", 5, True),
    # killed before the summary: the errors reported so far
    ("========= Invalid __global__ write of size 2 bytes\n=========     at k+0x10\n"
     "========= Error: Race reported between Write access at x and Read access at y\n", 2, False),
    ("========= COMPUTE-SANITIZER\nlinear torch.float32 x, torch.float32 adapters: done\n", 0, False),
])
def test_sanitizer_summary(gc, text, errors, summary):
    assert gc.sanitizer_errors(text) == (errors, summary)


def test_cuda_tools_are_found_in_the_toolkit(gc, tmp_path, monkeypatch):
    for rel in ("bin/cuobjdump", "compute-sanitizer/compute-sanitizer"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert gc.cuda_tool("cuobjdump") == str(tmp_path / "bin" / "cuobjdump")
    assert gc.cuda_tool("compute-sanitizer") == str(tmp_path / "compute-sanitizer" / "compute-sanitizer")
    assert gc.cuda_tool("no-such-tool") is None


def test_junit_counts(gc, tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text('<testsuites><testsuite tests="9" failures="1" errors="1" skipped="3"/></testsuites>')
    assert gc.junit_counts(path) == {"passed": 4, "failed": 2, "skipped": 3}
    path.write_text("<testsuites><testsuite tests=")  # cut off by a kill
    assert gc.junit_counts(path) is None
    assert gc.junit_counts(tmp_path / "missing.xml") is None


def test_progress_counts(gc):
    text = ("tests/test_a.py ..s.F [ 10%]\n"  # not a bare progress line: ignored
            "..s.F.x                                                                  [ 50%]\n"
            "warnings summary\n"
            "..E.X\n")
    assert gc.progress_counts(text) == {"passed": 8, "failed": 2, "skipped": 2}


# ------------------------------------------------------------------------------------------------
# test selection

SELECTION_SUITE = {
    "tests/test_a.py": """
        import pytest
        import torch

        needs_cuda = pytest.mark.skipif(True, reason="needs a CUDA device")

        @pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_cuda), "emulated"])
        def device(request):
            return request.param

        def test_fixture(device):
            pass

        @pytest.mark.parametrize("dev", ["cpu", "cuda:0"])
        @pytest.mark.parametrize("n", [1, 7])
        def test_strings(dev, n):
            pass

        @pytest.mark.parametrize("d", [torch.device("cuda"), torch.device("cpu")], ids=["gpu", "host"])
        def test_torch_device(d):
            pass

        @needs_cuda
        def test_marked():
            pass

        @pytest.mark.skipif(True, reason="needs process groups")
        def test_other_skip():
            pass

        def test_cuda_in_name_only():
            pass
    """,
    "tests/test_b.py": """
        import pytest

        pytestmark = pytest.mark.skipif(True, reason="needs a CUDA device")

        def test_module_marked():
            pass

        @pytest.fixture(params=["real", "emulated"])
        def kind(request):
            return request.param

        def test_module_marked_kinds(kind):
            pass
    """,
    "tests/tooling/test_t.py": """
        import pytest

        @pytest.mark.skipif(True, reason="needs a CUDA device")
        def test_tool():
            pass
    """,
}
CUDA_SELECTION = {"tests/test_a.py::test_fixture[cuda]", "tests/test_a.py::test_strings[1-cuda:0]",
                  "tests/test_a.py::test_strings[7-cuda:0]", "tests/test_a.py::test_torch_device[gpu]",
                  "tests/test_a.py::test_marked", "tests/test_b.py::test_module_marked",
                  "tests/test_b.py::test_module_marked_kinds[real]"}
CPU_SELECTION = {"tests/test_a.py::test_fixture[cpu]", "tests/test_a.py::test_strings[1-cpu]",
                 "tests/test_a.py::test_strings[7-cpu]", "tests/test_a.py::test_torch_device[host]"}


@pytest.fixture(scope="module")
def selection_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    (root / "pytest.ini").write_text("[pytest]\n")
    for rel, code in SELECTION_SUITE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(code))
    return root


class _Collected:
    """A pytest plugin that keeps the node ids left after collection."""

    def pytest_collection_finish(self, session):
        self.ids = {item.nodeid for item in session.items}


def _collect(gc, root, *opts):
    """Collect the suite under `root` in this process, with gpu_check as the plugin (as -p gpu_check loads it)."""
    seen, report = _Collected(), root / "selected.json"
    rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                      "-c", str(root / "pytest.ini"), "--rootdir", str(root), "--gpu-check-report", str(report),
                      *opts, str(root / "tests")], plugins=[gc, seen])
    assert rc == 0
    return seen.ids, json.loads(report.read_text())


def test_selection_keeps_the_real_cuda_tests(gc, selection_suite):
    ids, report = _collect(gc, selection_suite, "--gpu-check-device", "cuda")
    assert ids == CUDA_SELECTION
    assert report == {"collected": 16, "selected": len(CUDA_SELECTION), "shard": len(CUDA_SELECTION)}


def test_selection_of_the_cpu_parametrisation(gc, selection_suite):
    ids, _ = _collect(gc, selection_suite, "--gpu-check-device", "cpu")
    assert ids == CPU_SELECTION


def test_selection_shards_partition_and_limit(gc, selection_suite):
    shards = [_collect(gc, selection_suite, "--gpu-check-device", "cuda", "--gpu-check-shard", f"{k}/4")[0]
              for k in range(4)]
    assert set().union(*shards) == CUDA_SELECTION and sum(map(len, shards)) == len(CUDA_SELECTION)
    ids, report = _collect(gc, selection_suite, "--gpu-check-device", "cuda", "--gpu-check-limit", "2")
    assert len(ids) == 2 and ids <= CUDA_SELECTION and report["shard"] == 2


# ------------------------------------------------------------------------------------------------
# budget, record, kill


def test_windows_keep_time_for_the_later_phases(gc, tmp_path):
    check = gc.Check(tmp_path, budget=540.0)
    assert check.window("build") == gc.PHASE_CAPS["build"]
    # a short budget: the build gives way to the tests and the headline, the tests to the headline
    check = gc.Check(tmp_path, budget=300.0)
    margin, reserved = gc.MARGIN_S, gc.RESERVED
    want = {"build": 300.0 - reserved["tests"] - reserved["headline"] - margin,
            "tests": min(gc.PHASE_CAPS["tests"], 300.0 - reserved["headline"] - margin),
            "sanitizer": min(gc.PHASE_CAPS["sanitizer"], 300.0 - reserved["headline"] - margin),
            "headline": gc.PHASE_CAPS["headline"], "sweep": 300.0 - margin}
    assert {k: check.window(k) for k in want} == pytest.approx(want, abs=2.0)
    check = gc.Check(tmp_path, budget=540.0, caps={"tests": 1.5})
    assert check.window("tests") == 1.5


def test_phase_limit_argument(gc):
    args = gc.build_parser().parse_args(["--phase-limit", "tests=30", "--phase-limit", "sweep=0"])
    assert dict(args.phase_limit) == {"tests": 30.0, "sweep": 0.0}
    with pytest.raises(SystemExit):
        gc.build_parser().parse_args(["--phase-limit", "bogus=3"])


def test_record_is_strict_json_and_markdown(gc, tmp_path):
    check = gc.Check(tmp_path, budget=540.0)
    check.record.update(device="test", torch="x", cuda="13.0")
    check.record["headline"].update(shape="N=1", fwd_vs_cublas=float("nan"), fwdbwd_vs_frozen=1.25)
    check.record["headline_targets"] = {"fwd_vs_cublas": "<= 1.05", "fwdbwd_vs_frozen": "<= 1.06"}
    check.record["cases"] = [{"case": "N=1", "variant": "lorafa", "fwd_us": float("inf"), "bwd_us": 2.0}]
    check.phase("tests", "timeout", 12.3)
    data = json.loads((tmp_path / "latest.json").read_text())  # strict: NaN would not parse back as null
    assert RECORD_FIELDS <= set(data) and HEADLINE_FIELDS <= set(data["headline"])
    assert data["headline"]["fwd_vs_cublas"] is None and data["cases"][0]["fwd_us"] is None
    assert data["phases"]["tests"] == {"status": "timeout", "seconds": 12.3}
    assert data["csrc_sha"] == gc.csrc_sha(ROOT)
    assert (tmp_path / f"{data['date'][:10]}.json").read_text() == (tmp_path / "latest.json").read_text()
    md = (tmp_path / "latest.md").read_text()
    assert "| tests | timeout | 12.3 |" in md and "| fwd_vs_cublas | n/a | <= 1.05 |" in md
    assert "| fwdbwd_vs_frozen | 1.250 | <= 1.06 |" in md and "| speedup_vs_peft | n/a | n/a |" in md
    assert not check.ok()


def test_cap_log_keeps_head_and_tail(gc, tmp_path):
    path = tmp_path / "big.log"
    path.write_bytes(b"HEAD" + b"x" * 5000 + b"TAIL")
    gc.cap_log(path, limit=1000)
    data = path.read_bytes()
    assert len(data) < 1000 and data.startswith(b"HEAD") and data.endswith(b"TAIL") and b"bytes cut" in data


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_deadline_kills_the_whole_process_tree(gc, tmp_path):
    """A background grandchild, and one in a process group of its own (as ninja starts compile jobs)."""
    marker, own_group = tmp_path / "grandchild_survived", tmp_path / "own_group_survived"
    regroup = f"import os, time; os.setpgid(0, 0); time.sleep(2); open({str(own_group)!r}, 'w')"
    script = f"(sleep 2; touch {marker}) & {sys.executable} -c \"{regroup}\" & sleep 60"
    p = gc.Proc("sleeper", ["bash", "-c", script], tmp_path / "log", dict(os.environ), time.time() + 0.5)
    t = time.time()
    gc.wait([p])
    assert p.timed_out and p.popen.returncode is not None and time.time() - t < 20
    time.sleep(3)
    assert not marker.exists(), "the background grandchild outlived the deadline"
    assert not own_group.exists(), "the grandchild in its own process group outlived the deadline"


def test_help():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert all(opt in out.stdout for opt in ("--budget", "--sweep", "--phase-limit", "--dry-run", "--out"))


# ------------------------------------------------------------------------------------------------
# the dry run, end to end

TINY_SUITE = """
import pytest

@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(True, reason="needs a CUDA device"))])
def device(request):
    return request.param

@pytest.mark.parametrize("k", range(5))
def test_cpu_work(device, k):
    import torch
    assert torch.ones(3, device=device).sum().item() == 3
"""


def _dry_run(tmp_path, *opts):
    suite = tmp_path / "suite" / "test_tiny.py"
    suite.parent.mkdir(parents=True)
    suite.write_text(TINY_SUITE)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--tests", str(suite), *opts],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    record = json.loads((out / "latest.json").read_text())
    return p, out, record


def _check_files_and_fields(out, record):
    names = {p.name for p in out.iterdir()}
    assert names == OUT_FILES | {f"{record['date'][:10]}.json"}
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)  # what the device tool brings back
    assert all((out / n).stat().st_size < 8 << 20 for n in names)
    assert RECORD_FIELDS <= set(record) and HEADLINE_FIELDS <= set(record["headline"])
    assert set(record["tests"]) == {"passed", "failed", "skipped"}
    assert list(record["phases"]) == ["build", "tests", "sanitizer", "headline", "sweep"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    return _dry_run(tmp_path_factory.mktemp("dry"), "--sweep", "quick")


def test_dry_run_end_to_end(dry_run):
    p, out, record = dry_run
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _check_files_and_fields(out, record)
    assert {k: v["status"] for k, v in record["phases"].items()} == dict.fromkeys(
        ["build", "tests", "sanitizer", "headline", "sweep"], "ok")
    # 5 CPU items in 2 shards, at most 3 each: 3 + 2
    assert record["tests"] == {"passed": 5, "failed": 0, "skipped": 0}
    assert record["phases"]["tests"]["selected"] == 5 and record["phases"]["tests"]["collected"] == 10
    assert record["sanitizer_errors"] == 0
    assert set(record["phases"]["sanitizer"]["tools"]) == {"memcheck", "racecheck"}
    assert record["backend"] in ("cpu", "cuda") and record["csrc_sha"] and record["torch"]
    h = record["headline"]
    assert h["shape"] == "N=48 in=40 out=24 r=4 fp32"
    assert set(record["headline_targets"]) == HEADLINE_FIELDS - {"shape"}
    assert all(h[k] > 0 for k in ("fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen"))
    cases = {(c["case"], c["variant"]) for c in record["cases"]}
    assert {("N=48 in=40 out=24 r=4 fp32", "lorafa"), ("N=16 in=40 out=24 r=4 fp32", "cublas")} <= cases
    assert all(c["fwdbwd_us"] > 0 for c in record["cases"])
    assert "sanitizer cases done" in (out / "sanitizer.log").read_text()
    assert "===== headline" in (out / "bench.log").read_text() and "===== sweep" in (out / "bench.log").read_text()
    assert "| headline | ok |" in (out / "latest.md").read_text()


def test_dry_run_phases_that_run_out_are_killed(tmp_path):
    p, out, record = _dry_run(tmp_path, "--skip-build", "--sweep", "none", "--phase-limit", "tests=0.5",
                              "--phase-limit", "sanitizer=0.5", "--phase-limit", "headline=0.5")
    assert p.returncode == 1
    _check_files_and_fields(out, record)
    status = {k: v["status"] for k, v in record["phases"].items()}
    assert status == {"build": "ok", "tests": "timeout", "sanitizer": "timeout", "headline": "timeout",
                      "sweep": "skipped (--sweep none)"}
    assert record["tests"]["failed"] >= 2  # each killed shard counts as a failure
    assert {t["status"] for t in record["phases"]["sanitizer"]["tools"].values()} == {"timeout"}
    assert record["headline"]["fwd_vs_cublas"] is None and record["cases"] == []
    assert "killed at its deadline" in p.stdout
