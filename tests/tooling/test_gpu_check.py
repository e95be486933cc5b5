"""The host side of benchmarks/gpu_check.py, which only a GPU runs whole: the csrc hash, the
sanitizer-summary parser, the test sharding, the strict-JSON record and the deadline kill."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
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


@pytest.mark.parametrize("text,errors", [
    ("========= COMPUTE-SANITIZER\nsanitizer cases done\n========= ERROR SUMMARY: 0 errors\n", 0),
    ("========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 3 errors\n", 3),
    ("========= ERROR SUMMARY: 1 error\n", 1),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 0),
    ("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n", 1),
    ("========= RACECHECK SUMMARY: 5 hazards displayed (5 errors, 0 warnings)\n", 5),
])
def test_sanitizer_summary(gc, text, errors):
    assert gc._sanitizer_errors(text) == errors


def test_progress_counts(gc):
    text = ("tests/test_a.py ..s.F [ 10%]\n"  # not a bare progress line: ignored
            "..s.F.x                                                                  [ 50%]\n"
            "warnings summary\n"
            "..E.X\n")
    assert gc._progress_counts(text) == {"passed": 8, "failed": 2, "skipped": 2}


def test_shards_cover_every_test_file_once(gc):
    shards = gc._test_shards(gc.TEST_SHARDS)
    files = [f for s in shards for f in s]
    assert sorted(files) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    assert len(shards) == min(gc.TEST_SHARDS, len(files))


def test_record_is_strict_json_and_markdown(gc, tmp_path):
    check = gc.Check(tmp_path, budget=480.0)
    check.record.update(device="test", torch="x", cuda="13.0")
    check.record["headline"] = {"shape": "N=1", "fwd_vs_cublas": float("nan"), "fwdbwd_vs_frozen": 1.25}
    check.record["cases"] = [{"case": "N=1", "variant": "lorafa", "fwd_us": float("inf"), "bwd_us": 2.0}]
    check.phase("tests", "timeout", 12.3)
    data = json.loads((tmp_path / "latest.json").read_text())  # strict: NaN would not parse back as null
    assert data["headline"]["fwd_vs_cublas"] is None and data["cases"][0]["fwd_us"] is None
    assert data["phases"]["tests"] == {"status": "timeout", "seconds": 12.3}
    assert data["csrc_sha"] == gc.csrc_sha(ROOT)
    assert (tmp_path / f"{data['date'][:10]}.json").read_text() == (tmp_path / "latest.json").read_text()
    md = (tmp_path / "latest.md").read_text()
    assert "| tests | timeout | 12.3 |" in md and "| fwd_vs_cublas | n/a | <= 1.05 |" in md
    assert "| fwdbwd_vs_frozen | 1.250 | <= 1.06 |" in md
    assert not check.ok()


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_deadline_kills_the_whole_process_tree(gc, tmp_path):
    marker = tmp_path / "grandchild_survived"
    with open(tmp_path / "log", "w") as f:
        p = gc.Proc("sleeper", ["bash", "-c", f"(sleep 2; touch {marker}) & sleep 60"], f, dict(os.environ))
        t = time.time()
        gc.wait_all([p], time.time() + 0.5)
    assert p.timed_out and p.popen.returncode is not None and time.time() - t < 20
    time.sleep(3)
    assert not marker.exists(), "the background grandchild outlived the deadline"


def test_help():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--budget" in out.stdout and "--sweep" in out.stdout
