"""The GPU check: one command on a CUDA machine that builds the extension for that GPU, runs the test
suite's CUDA tests, runs compute-sanitizer over small cases of every kernel, measures the headline
ratios and as much of the microbenchmark sweep as the time left allows, and writes the results
record, all within a time budget (540 s by default, the build included).

    python3 benchmarks/gpu_check.py --out DIR [--budget S] [--sweep none|quick|full]
                                    [--phase-limit NAME=S ...] [--tests PATH ...] [--skip-build] [--dry-run]

Phases, in order of value. Each one's deadline is its cap (PHASE_CAPS, or --phase-limit NAME=S) cut
to what the budget leaves once the later phases' shares (RESERVED) are kept back; a phase that runs
out is killed, every process of its session with it, and recorded as "timeout". On a device machine
whose commands may run 10 minutes: `python3 benchmarks/gpu_check.py --out $OUT` with a 600 s limit.

  build      `python setup.py build_ext --inplace` (without a setup.py: pip install -e . with
             --no-build-isolation --no-deps --no-index): nothing is downloaded. TORCH_CUDA_ARCH_LIST is
             the visible GPU's compute capability (9.0 on an H100 or H200), asked in a child process
             before the build; MAX_JOBS is the CPU count. The library then has to import with the
             "cuda" backend.
  tests      the CUDA tests, sharded over TEST_SHARDS pytest processes. This file is also the pytest
             plugin that selects them (-p gpu_check): a test runs when one of its parameters is the
             device "cuda" (or a torch.device of type cuda) or when it carries a skipif marker whose
             reason names CUDA or a GPU (the suite's requires-CUDA marker). tests/tooling/ and
             emulated-device parametrisations are left out. Per-test timeout with pytest-timeout
             where it is installed.
  sanitizer  beside the tests: compute-sanitizer memcheck (every kernel, cuBLAS's too, with torch's
             caching allocator off so that out-of-bounds accesses inside pooled memory show) and
             racecheck (the lorafa kernels), side by side, over benchmarks/sanitizer_cases.py.
  headline   alone on the GPU: the headline case (bf16 N=8192 in=out=4096 r=16 with bias), every
             variant side by side, then the compiled PEFT variants beside lorafa in a second
             side-by-side run (compiling can be slow: the other ratios are recorded first).
  sweep      the sweep (quick: bf16, r = 16; full: the whole CUDA sweep), smallest cases first, one
             case at a time, until the budget runs out; "timeout" here is the normal end.

The record, DIR/latest.json (with a copy DIR/<YYYY-MM-DD>.json and a summary DIR/latest.md), is
rewritten after every phase, so a check cut short still leaves one. Strict JSON: a value that is
missing, NaN or infinite is null.

  date              UTC, "YYYY-MM-DDTHH:MM:SSZ"
  device            the GPU's name ("NVIDIA H200")
  torch, cuda       torch.__version__, torch.version.cuda
  csrc_sha          sha256 over the files under csrc/ in sorted order, each contributing its path
                    relative to the repository root (posix), NUL, its bytes, NUL. CUDA code whose
                    csrc_sha differs from the recorded one has not run on a GPU.
  tests             {"passed", "failed", "skipped"}: the CUDA tests (a shard that crashed or was killed
                    counts from its progress lines, plus one failure)
  sanitizer_errors  errors in the memcheck and racecheck reports; null when the sanitizer cannot run
  headline          {"shape": "N=8192 in=4096 out=4096 r=16 bf16", "fwd_vs_cublas", "fwdbwd_vs_frozen",
                    "fwdbwd_dropout_vs_frozen", "speedup_vs_peft", "speedup_vs_peft_compiled"}: time
                    ratios (ours / baseline) and speedups (other / ours), as lorafa_ext.bench defines them,
                    with what the bench adds ("spread": {key: spread}, "noisy": [key])
  headline_targets  {key: "<= 1.05", ...}: lorafa_ext.bench.HEADLINE_TARGETS
  cases             one dict per (case, variant) as lorafa_ext.bench measures them: "case", "variant",
                    median times "fwd_us", "bwd_us", "fwdbwd_us" in microseconds, TFLOP/s, GB/s, ratios
  phases            {name: {"status", "seconds", ...}} in the order run; status is "ok", "timeout",
                    "failed (why)", "skipped (why)" or "unavailable (why)"
  notes             strings; gpu: {"name", "capability"}; backend: what lorafa_ext.backend() said;
                    budget_s, wall_s: seconds

Beside the record: build.log, tests.log, sanitizer.log and bench.log (seven files, each under 8 MiB).
Exit status 0 when build, tests, sanitizer and headline are "ok", no test failed and the sanitizer found
no error; else 1.

--dry-run runs the whole check on a machine without a GPU, each GPU step replaced by a quick stand-in:
the build parses setup.py and compiles nothing (the library already built is used), the tests are the
first few CPU-parametrised tests of each shard, the sanitizer step runs the cases on the CPU under a
stand-in that prints compute-sanitizer's summaries, and the benchmarks run tiny shapes on the CPU. It
writes the same files, so argument parsing, deadlines, kills, logs and the record are all exercised.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
HERE = pathlib.Path(__file__).resolve().parent

DEFAULT_BUDGET_S = 540.0
# Seconds each phase may take at most. The build's cap is two to three times the estimate for a
# 16-core machine: the longest translation unit (csrc/autograd.cpp or the CUDA file, about 45 s of one
# core; all six took about 160 s of CPU on the 2-core development machine) plus setup and link, about
# 60 to 90 s in all.
PHASE_CAPS = {"build": 200.0, "tests": 240.0, "sanitizer": 200.0, "headline": 150.0, "sweep": math.inf}
PHASES = tuple(PHASE_CAPS)
SIDE_BY_SIDE = {"tests": "sanitizer", "sanitizer": "tests"}  # run together: neither waits for the other
# Seconds kept back for a phase while earlier phases run (the sweep gets whatever is left).
RESERVED = {"tests": 120.0, "sanitizer": 0.0, "headline": 90.0, "sweep": 0.0}
MARGIN_S = 10.0          # kept back at the end for the last record write
PROBE_TIMEOUT_S = 60.0   # the GPU query and the import check
TEST_SHARDS = 4
TEST_TIMEOUT_S = 150     # per test, where pytest-timeout is installed
DRY_TEST_SHARDS, DRY_TESTS_PER_SHARD = 2, 3
LOG_LIMIT_BYTES = 8 << 20
HEADLINE_KEYS = ("fwd_vs_cublas", "fwdbwd_vs_frozen", "fwdbwd_dropout_vs_frozen", "speedup_vs_peft",
                 "speedup_vs_peft_compiled")
SANITIZER_TOOLS = {
    "memcheck": ["--tool", "memcheck"],  # every kernel, cuBLAS's too: a wrong leading dimension shows
    "racecheck": ["--tool", "racecheck", "--kernel-name", "kns=lorafa"],  # our shared-memory kernels
}
SANITIZER_COMMON = ["--report-api-errors", "no", "--error-exitcode", "99"]


def csrc_sha(root: pathlib.Path) -> str:
    """sha256 over the files under csrc/, sorted by relative path: relpath, NUL, bytes, NUL."""
    h = hashlib.sha256()
    for path in sorted(p for p in (root / "csrc").rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env(**extra) -> dict:
    """The environment of every child: unbuffered output, the checkout (and this folder, for -p gpu_check)
    first on the import path, the interpreter's folder first on PATH. LORAFA_FORCE_PYTHON is dropped: the
    check is of the compiled library."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop("LORAFA_FORCE_PYTHON", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(HERE), env.get("PYTHONPATH")) if p)
    # the interpreter's own bin folder first: a virtual environment's ninja (the parallel build) lives there
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), env.get("PATH")) if p)
    return env


class Proc:
    """A child process in its own session (so that a kill reaches its whole tree), its output in a log
    file, with a deadline (time.time()) after which wait() kills it."""

    def __init__(self, name: str, cmd: list, log_path: pathlib.Path, env: dict, deadline: float):
        self.name, self.log_path, self.deadline = name, pathlib.Path(log_path), deadline
        log(f"{name}: {shlex.join(map(str, cmd))[:400]}")
        with open(self.log_path, "w") as f:
            self.popen = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        self.rc: int | None = None
        self.timed_out = False

    def kill(self) -> None:
        """SIGKILL to the child's process group, then to every other live process of its session (ninja
        starts each compile job in a process group of its own), until none is left."""
        for _ in range(50):
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            members = _session_members(self.popen.pid)
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not members:
                break
            time.sleep(0.05)
        self.rc = self.popen.wait()
        self.timed_out = True
        log(f"{self.name}: killed at its deadline")

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _session_members(sid: int) -> list:
    """The live (not zombie) processes of session `sid`, read from /proc (empty where there is none)."""
    members = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry))
    return members


def wait(procs: list) -> None:
    """Wait for every process, killing each (with its session) at its own deadline."""
    pending = list(procs)
    while pending:
        for p in list(pending):
            rc = p.popen.poll()
            if rc is not None:
                p.rc = rc
                pending.remove(p)
            elif time.time() >= p.deadline:
                p.kill()
                pending.remove(p)
        if pending:
            time.sleep(0.1)


def run_once(name: str, cmd: list, log_path: pathlib.Path, env: dict, seconds: float) -> Proc:
    p = Proc(name, cmd, log_path, env, time.time() + seconds)
    wait([p])
    return p


def _proc_status(p: Proc) -> str:
    return "timeout" if p.timed_out else ("ok" if p.rc == 0 else f"failed (exit {p.rc})")


def _finite(v):
    """The record with NaN and inf as None (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def cap_log(path: pathlib.Path, limit: int = LOG_LIMIT_BYTES) -> None:
    """Keep a log under `limit` bytes: its first quarter and its end, with a line saying what was cut."""
    if not path.exists() or path.stat().st_size <= limit:
        return
    data = path.read_bytes()
    head, tail = data[: limit // 4], data[-(limit // 2):]
    path.write_bytes(head + f"\n[... {len(data) - len(head) - len(tail)} bytes cut ...]\n".encode() + tail)


class Check:
    """The record, the budget and the phase deadlines."""

    def __init__(self, out: pathlib.Path, budget: float, caps: dict | None = None):
        self.out, self.t0, self.budget = out, time.time(), budget
        self.caps = dict(PHASE_CAPS, **(caps or {}))
        self.record = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": None, "torch": None, "cuda": None, "csrc_sha": csrc_sha(ROOT),
            "tests": {"passed": 0, "failed": 0, "skipped": 0}, "sanitizer_errors": None,
            "headline": {"shape": None, **{k: None for k in HEADLINE_KEYS}}, "headline_targets": {}, "cases": [],
            "phases": {}, "notes": [], "gpu": None, "backend": None, "budget_s": budget, "wall_s": 0.0,
        }

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def window(self, name: str) -> float:
        """Seconds phase `name` may run from now: its cap, less what the later phases keep back."""
        later = PHASES[PHASES.index(name) + 1:]
        reserve = sum(RESERVED[p] for p in later if p != SIDE_BY_SIDE.get(name))
        return min(self.caps[name], self.left() - reserve - MARGIN_S)

    def phase(self, name: str, status: str, seconds: float, **extra) -> None:
        self.record["phases"][name] = {"status": status, "seconds": round(seconds, 1), **extra}
        log(f"phase {name}: {status} ({seconds:.0f} s)")
        self.save()

    def skip_rest(self, why: str) -> None:
        for name in PHASES:
            if name not in self.record["phases"]:
                self.record["phases"][name] = {"status": f"skipped ({why})", "seconds": 0.0}
        self.save()

    def note(self, text: str) -> None:
        self.record["notes"].append(text)

    def save(self) -> None:
        self.record["wall_s"] = round(time.time() - self.t0, 1)
        record = _finite(self.record)
        text = json.dumps(record, indent=1, allow_nan=False) + "\n"
        (self.out / "latest.json").write_text(text)
        (self.out / f"{record['date'][:10]}.json").write_text(text)
        (self.out / "latest.md").write_text(markdown(record))

    def ok(self) -> bool:
        r, phases = self.record, self.record["phases"]
        essential = all(phases.get(p, {}).get("status") == "ok" for p in ("build", "tests", "sanitizer", "headline"))
        return essential and r["tests"]["failed"] == 0 and r["sanitizer_errors"] == 0


# ------------------------------------------------------------------------------------------------
# the pytest plugin that picks the tests (loaded into each test shard with -p gpu_check)

_DEVICE_NAME = re.compile(r"(cpu|cuda|meta|mps|xpu)(:\d+)?")
_NEEDS_CUDA = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


def _param_devices(item) -> set:
    """Device types named by a test's parameters: device strings ("cuda", "cuda:1", "cpu") and
    torch.device values."""
    found = set()
    callspec = getattr(item, "callspec", None)
    for v in (callspec.params.values() if callspec else ()):
        if isinstance(v, str) and _DEVICE_NAME.fullmatch(v):
            found.add(v.split(":")[0])
        elif type(v).__name__ == "device" and isinstance(getattr(v, "type", None), str):
            found.add(v.type)
    return found


def _emulated(item) -> bool:
    callspec = getattr(item, "callspec", None)
    tokens = re.split(r"[-\[\]_/.]", item.nodeid.lower())
    ids = re.split(r"[-_]", callspec.id.lower()) if callspec else []
    return "emulated" in tokens or "emu" in ids or any(t.startswith("emulat") for t in tokens)


def runs_on(item, device: str, rootpath: pathlib.Path) -> bool:
    """Whether a collected test is one of `device`'s tests: "cuda" (the real GPU) or "cpu" (the CPU
    parametrisation of a test that also has others)."""
    path = pathlib.Path(str(getattr(item, "path", None) or item.fspath))
    try:
        parts = path.resolve().relative_to(rootpath.resolve()).parts
    except ValueError:
        parts = path.parts
    if "tooling" in parts[:-1] or _emulated(item):
        return False
    devices = _param_devices(item)
    cuda = "cuda" in devices or any(_NEEDS_CUDA.search(str(m.kwargs.get("reason", "")))
                                    for m in item.iter_markers("skipif"))
    if device == "cuda":
        return cuda
    return device in devices and not cuda


def pytest_addoption(parser):
    g = parser.getgroup("gpu_check", "the GPU check's test selection")
    g.addoption("--gpu-check-device", help="keep only this device's tests: cuda (the real GPU) or cpu")
    g.addoption("--gpu-check-shard", default="0/1", help="K/N: keep selected tests K, K+N, K+2N, ...")
    g.addoption("--gpu-check-limit", type=int, default=0, help="keep at most this many per shard (0: all)")
    g.addoption("--gpu-check-report", help="write {collected, selected, shard} (JSON) to this file")


def pytest_collection_modifyitems(config, items):
    device = config.getoption("gpu_check_device")
    if not device:
        return
    k, n = (int(x) for x in config.getoption("gpu_check_shard").split("/"))
    selected = [it for it in items if runs_on(it, device, config.rootpath)]
    mine = selected[k::n]
    limit = config.getoption("gpu_check_limit")
    mine = mine[:limit] if limit else mine
    keep = {id(it) for it in mine}
    config.hook.pytest_deselected(items=[it for it in items if id(it) not in keep])
    report = config.getoption("gpu_check_report")
    if report:
        pathlib.Path(report).write_text(json.dumps({"collected": len(items), "selected": len(selected),
                                                    "shard": len(mine)}))
    items[:] = mine


# ------------------------------------------------------------------------------------------------
# report parsing


def junit_counts(path: pathlib.Path):
    """{"passed", "failed", "skipped"} from a pytest junit report, None when there is none."""
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    if suite is None:
        return None
    total = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def progress_counts(text: str) -> dict:
    """Counts from pytest -q's progress lines (for a shard killed before it wrote its junit report)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for line in text.splitlines():
        m = re.fullmatch(r"([.FEsxX]+)\s*(\[\s*\d+%\])?", line.strip())
        if m:
            counts["passed"] += m.group(1).count(".") + m.group(1).count("X")
            counts["failed"] += m.group(1).count("F") + m.group(1).count("E")
            counts["skipped"] += m.group(1).count("s") + m.group(1).count("x")
    return counts


def sanitizer_errors(text: str):
    """Errors in compute-sanitizer's output: the summaries' counts (memcheck: ERROR SUMMARY; racecheck:
    RACECHECK SUMMARY), or, without a summary (the run was killed), the errors reported so far.
    Returns (errors, whether a summary was found)."""
    found = [int(m) for m in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    found += [int(m) for m in re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text)]
    if found:
        return sum(found), True
    return len(re.findall(r"^=+ (Invalid |Error: Race|Error: )", text, flags=re.MULTILINE)), False


# ------------------------------------------------------------------------------------------------
# phases


def probe_gpu(check: Check, tmp: pathlib.Path, dry_run: bool) -> dict | None:
    """Ask a child process what torch sees (the check itself never imports torch)."""
    code = ("import json, torch\n"
            "ok = torch.cuda.is_available()\n"
            "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, 'available': ok,\n"
            "                  'name': torch.cuda.get_device_name() if ok else None,\n"
            "                  'capability': list(torch.cuda.get_device_capability()) if ok else None}))\n")
    p = run_once("gpu query", [sys.executable, "-c", code], tmp / "probe.log", child_env(), PROBE_TIMEOUT_S)
    text = p.text()
    try:
        info = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        check.note(f"the GPU query failed ({_proc_status(p)}): {text[-500:]}")
        return None
    check.record.update(torch=info["torch"], cuda=info["cuda"])
    if dry_run:
        info.update(name="cpu (dry run)", capability=None)
    elif not info["available"]:
        check.note("torch.cuda.is_available() is False: no GPU to check")
        return None
    check.record["device"] = info["name"]
    check.record["gpu"] = {"name": info["name"], "capability": info["capability"]}
    return info


def cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program: on PATH, beside nvcc, or in $CUDA_HOME or /usr/local/cuda (bin/, or a
    folder of its own as the toolkit installs compute-sanitizer)."""
    nvcc = shutil.which("nvcc")
    candidates = [shutil.which(name), nvcc and os.path.join(os.path.dirname(nvcc), name)]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates += [os.path.join(home, "bin", name), os.path.join(home, name, name)]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def build_command(dry_run: bool) -> list:
    if (ROOT / "setup.py").exists():
        return [sys.executable, "setup.py", "--name"] if dry_run else \
            [sys.executable, "setup.py", "build_ext", "--inplace"]
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index"]
    return pip + (["--dry-run"] if dry_run else []) + ["-e", "."]


def import_check(check: Check, out: pathlib.Path, tmp: pathlib.Path, dry_run: bool) -> str:
    """Import the library in a child and ask its backend: "cuda" on the GPU (any compiled one in a dry run).
    Returns "ok" or why not; appends what it saw to build.log."""
    p = run_once("import check", [sys.executable, "-c", "import lorafa_ext; print(lorafa_ext.backend())"],
                 tmp / "import.log", child_env(), PROBE_TIMEOUT_S)
    text = p.text()
    with open(out / "build.log", "a") as f:
        f.write(f"\n===== import check (exit {p.rc})\n{text}")
    lines = text.strip().splitlines()
    check.record["backend"] = lines[-1] if lines and p.rc == 0 else None
    want = ("cpu", "cuda") if dry_run else ("cuda",)  # a dry run takes any compiled library
    if check.record["backend"] not in want:
        return f"failed (lorafa_ext.backend() is {check.record['backend']!r}, expected {' or '.join(want)})"
    return "ok"


def build(check: Check, out: pathlib.Path, tmp: pathlib.Path, gpu: dict, dry_run: bool, skip: bool) -> bool:
    t = time.time()
    if skip:
        status = import_check(check, out, tmp, dry_run)
        check.phase("build", status, time.time() - t, command="none (--skip-build)")
        return status == "ok"
    window = check.window("build")
    if window <= 0:
        check.phase("build", "skipped (no time left)", 0.0)
        return False
    extra = {"MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)),
             "LORAFA_BUILD_CUDA": "0" if dry_run else "1"}
    if gpu.get("capability"):
        extra["TORCH_CUDA_ARCH_LIST"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "{}.{}".format(*gpu["capability"]))
    build_log = out / "build.log"
    cmd = build_command(dry_run)
    p = run_once("build", cmd, build_log, child_env(**extra), window)
    elf = []
    with open(build_log, "a") as f:
        f.write(f"\n===== build: exit {p.rc}, timed out: {p.timed_out}, environment: {extra}\n")
        nvcc = cuda_tool("nvcc")
        if nvcc:
            f.write(subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout)
        cuobjdump = cuda_tool("cuobjdump")
        libs = sorted((ROOT / "lorafa_ext").glob("_C*.so"))
        if cuobjdump and libs and not dry_run:  # the machine code the library holds: sm_90 alone on an H200
            listing = subprocess.run([cuobjdump, "--list-elf", str(libs[-1])], capture_output=True, text=True,
                                     timeout=60).stdout
            f.write(listing)
            elf = sorted(set(re.findall(r"\bsm_\d+a?\b", listing)))
    cap_log(build_log)
    status = _proc_status(p)
    if status == "ok":
        status = import_check(check, out, tmp, dry_run)
    check.phase("build", status, time.time() - t, arch=extra.get("TORCH_CUDA_ARCH_LIST"), elf=elf,
                max_jobs=int(extra["MAX_JOBS"]), command=" ".join(cmd[1:]))
    return status == "ok"


def _have_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def start_tests(check: Check, tmp: pathlib.Path, paths: list, dry_run: bool, seconds: float) -> list:
    """Start the test shards; returns [(proc, junit path, selection report path)]."""
    shards = DRY_TEST_SHARDS if dry_run else TEST_SHARDS
    device = "cpu" if dry_run else "cuda"
    deadline = time.time() + seconds
    extra = [f"--timeout={TEST_TIMEOUT_S}"] if _have_module("pytest_timeout") else []
    extra += ["--gpu-check-limit", str(DRY_TESTS_PER_SHARD)] if dry_run else []
    procs = []
    for i in range(shards):
        junit, report = tmp / f"junit{i}.xml", tmp / f"selected{i}.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "-p", "gpu_check",
               "--continue-on-collection-errors", f"--junitxml={junit}", "--ignore=tests/tooling",
               "--gpu-check-device", device, "--gpu-check-shard", f"{i}/{shards}",
               "--gpu-check-report", str(report), *extra, *paths]
        procs.append((Proc(f"tests[{i}]", cmd, tmp / f"tests{i}.log", child_env(), deadline), junit, report))
    return procs


def finish_tests(check: Check, shards: list, out: pathlib.Path, t0: float, dry_run: bool) -> None:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    status, selected, collected, ran = "ok", None, None, 0
    with open(out / "tests.log", "w") as tests_log:
        for p, junit, report in shards:
            text = p.text()
            tests_log.write(f"\n===== {p.name} (exit {p.rc}, timed out: {p.timed_out})\n{text}")
            c = junit_counts(junit)
            try:
                sel = json.loads(report.read_text())
                selected, collected, ran = sel["selected"], sel["collected"], ran + sel["shard"]
            except (OSError, ValueError, KeyError):
                pass
            if p.timed_out:
                status = "timeout"
            if c is None:  # killed or crashed before its report: count its progress, and one failure
                c = progress_counts(text)
                c["failed"] += 1
                check.note(f"{p.name}: no junit report (exit {p.rc}, timed out: {p.timed_out}); counted from its "
                           "progress lines, plus one failure")
            elif not p.timed_out and p.rc not in (0, 1, 5):  # 2 interrupted, 3 internal error, 4 usage
                c["failed"] += 1
                status = f"failed (pytest exit {p.rc})"
                check.note(f"{p.name}: pytest exited with {p.rc} (see tests.log), counted as a failure")
            for k in counts:
                counts[k] += c[k]
    cap_log(out / "tests.log")
    if not selected and status == "ok":
        status = "failed (no test selected)"
    if status == "ok" and counts["failed"]:
        status = f"failed ({counts['failed']} failed)"
    if status == "ok" and not dry_run and counts["skipped"] and not counts["passed"]:
        status = "failed (every CUDA test skipped: the test processes saw no GPU)"
    check.record["tests"] = counts
    check.phase("tests", status, time.time() - t0, selected=selected, ran=ran, collected=collected,
                shards=len(shards))


def sanitizer_exe(dry_run: bool) -> list | None:
    if dry_run:
        return [sys.executable, str(pathlib.Path(__file__).resolve()), "--sanitizer-stand-in"]
    exe = cuda_tool("compute-sanitizer")
    return [exe] if exe else None


def start_sanitizer(tmp: pathlib.Path, dry_run: bool, seconds: float) -> dict:
    exe = sanitizer_exe(dry_run)
    if exe is None:
        return {}
    cases = [sys.executable, str(HERE / "sanitizer_cases.py")] + (["--device", "cpu"] if dry_run else [])
    # No caching allocator: out-of-bounds accesses inside torch's pooled segments would go unseen.
    env = child_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    deadline = time.time() + seconds
    return {tool: Proc(f"sanitizer {tool}", [*exe, *args, *SANITIZER_COMMON, *cases], tmp / f"sanitizer_{tool}.log",
                       env, deadline)
            for tool, args in SANITIZER_TOOLS.items()}


def finish_sanitizer(check: Check, procs: dict, out: pathlib.Path, t0: float) -> None:
    if not procs:
        check.record["sanitizer_errors"] = None
        check.phase("sanitizer", "failed (compute-sanitizer not found: not on PATH, beside nvcc or in the toolkit)",
                    time.time() - t0)
        return
    tools, total, statuses = {}, 0, []
    with open(out / "sanitizer.log", "w") as san_log:
        for tool, p in procs.items():
            text = p.text()
            san_log.write(f"\n===== compute-sanitizer {tool} (exit {p.rc}, timed out: {p.timed_out})\n{text}")
            n, summary = sanitizer_errors(text)
            if "Device not supported" in text:  # e.g. under gVisor: the tool cannot run, which is no verdict
                status, n = "unavailable (compute-sanitizer: Device not supported)", None
            elif p.timed_out:
                status = "timeout"
            elif not summary:
                status, n = f"failed (exit {p.rc}, no summary)", max(n, 1)
            elif n:
                status = f"failed ({n} errors)"
            elif p.rc != 0 or "sanitizer cases done" not in text:
                status = f"failed (exit {p.rc}, cases did not finish)"
            else:
                status = "ok"
            log(f"compute-sanitizer {tool}: {status}")
            tools[tool] = {"status": status, "errors": n}
            statuses.append(status)
            total = None if total is None or n is None else total + n
    cap_log(out / "sanitizer.log")
    check.record["sanitizer_errors"] = total
    overall = next((s for s in statuses if s != "ok"), "ok")
    check.phase("sanitizer", overall, time.time() - t0, tools=tools)


def tests_and_sanitizer(check: Check, out: pathlib.Path, tmp: pathlib.Path, paths: list, dry_run: bool) -> None:
    """The test shards and the sanitizer side by side, each against its own deadline."""
    t0 = time.time()
    windows = {name: check.window(name) for name in ("tests", "sanitizer")}
    shards = start_tests(check, tmp, paths, dry_run, windows["tests"]) if windows["tests"] > 0 else None
    san = start_sanitizer(tmp, dry_run, windows["sanitizer"]) if windows["sanitizer"] > 0 else None
    wait([p for p, _, _ in shards or []] + list((san or {}).values()))
    if shards is None:
        check.phase("tests", "skipped (no time left)", 0.0)
    else:
        finish_tests(check, shards, out, t0, dry_run)
    if san is None:
        check.phase("sanitizer", "skipped (no time left)", 0.0)
    else:
        finish_sanitizer(check, san, out, t0)


def read_rows(path: pathlib.Path) -> list:
    """The JSON lines a bench child wrote (a last line cut off by a kill is dropped)."""
    items = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                items.append(json.loads(line))
            except ValueError:
                pass
    return items


def bench(check: Check, name: str, out: pathlib.Path, tmp: pathlib.Path, sweep: str, dry_run: bool) -> None:
    """The headline or the sweep, in a child process that writes one JSON line per finished step."""
    t = time.time()
    window = check.window(name)
    if name == "sweep" and sweep == "none":
        check.phase(name, "skipped (--sweep none)", 0.0)
        return
    if window <= 0:
        check.phase(name, "skipped (no time left)", 0.0)
        return
    rows_path, child_log = tmp / f"{name}.jsonl", tmp / f"{name}.log"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--bench-child", name, "--rows", str(rows_path),
           "--sweep", sweep] + (["--dry-run"] if dry_run else [])
    p = run_once(name, cmd, child_log, child_env(), window)
    with open(out / "bench.log", "a") as f:
        f.write(f"\n===== {name} (exit {p.rc}, timed out: {p.timed_out})\n{p.text()}")
    cap_log(out / "bench.log")
    items = read_rows(rows_path)
    for item in items:
        check.record["headline"].update(item.get("headline", {}))
        check.record["headline_targets"].update(item.get("targets", {}))
        check.record["cases"].extend(item.get("rows", []))
        check.record["notes"].extend(item.get("notes", []))
    status = _proc_status(p)
    if name == "headline" and status == "ok" and not any("headline" in i for i in items):
        status = "failed (no headline written)"
    if name == "headline" and p.timed_out and any("headline" in i for i in items):
        check.note("headline: the compiled PEFT variants did not finish in time (speedup_vs_peft_compiled missing)")
    if name == "sweep" and p.timed_out:
        check.note(f"sweep cut short by the time budget after {len(items)} cases")
    check.phase(name, status, time.time() - t, steps=len(items))


def bench_child(name: str, rows_path: str, sweep: str, dry_run: bool) -> int:
    """Runs in the bench subprocess; appends one JSON line per finished step to rows_path."""
    import dataclasses

    import torch

    from lorafa_ext import bench as lbench

    def emit(item):
        with open(rows_path, "a") as f:
            f.write(json.dumps(_finite(item)) + "\n")

    device = "cpu" if dry_run else "cuda"
    case = lbench.headline_case(device)
    if dry_run:  # tiny shapes
        case = dataclasses.replace(case, N=48, in_features=40, out_features=24, r=4)
    timing = lbench.timing_config(device, "quick" if dry_run else "default")
    notes: list = []
    variants = lbench.available_variants(lbench.ALL_VARIANTS, notes)
    plain = [v for v in variants if not lbench.VARIANTS[v].compiled]
    compiled = [v for v in variants if lbench.VARIANTS[v].compiled]
    if name == "headline":
        headline, rows = lbench.headline_ratios(device, case=case, variants=plain, timing=timing, notes=notes)
        headline["shape"] = case.label
        emit({"headline": headline, "targets": lbench.HEADLINE_TARGETS, "rows": rows, "notes": notes})
        if dry_run and compiled:
            emit({"notes": ["dry run: the compiled PEFT variants are left out (torch.compile on the CPU takes "
                            "minutes)"]})
        elif compiled:
            key = "speedup_vs_peft_compiled"
            h2, rows2 = lbench.headline_ratios(device, case=case, variants=["lorafa", *compiled], timing=timing)
            emit({"headline": {key: h2[key], "spread": {**headline["spread"], key: h2["spread"][key]},
                               "noisy": headline["noisy"] + [k for k in h2["noisy"] if k == key]},
                  "rows": [r for r in rows2 if r["variant"] in compiled],
                  "notes": ["headline: speedup_vs_peft_compiled and the compiled variants' rows come from a second "
                            "side-by-side run with lorafa"]})
        return 0
    if dry_run:
        cases = [dataclasses.replace(case, N=16)]
    else:
        cases = {"quick": lbench.gpu_sweep(dtypes=("bf16",), ranks=(16,)), "full": lbench.gpu_sweep()}[sweep]
    timing = lbench.timing_config(device, "quick")
    cases = sorted((c for c in cases if c != case), key=lambda c: (c.N * c.in_features * c.out_features, c.r))
    for c in cases:
        res = lbench.run_sweep([c], plain, torch.device(device), timing, compile_for=lambda _: False)
        emit({"rows": res["cases"],
              "notes": [f"sweep {s['case']} {s['variant']}: {s['reason']}" for s in res["skipped"]]})
    return 0


def sanitizer_stand_in(argv: list) -> int:
    """The dry run's compute-sanitizer: runs the program after the options (each option takes one value)
    and prints the tool's summary line."""
    opts = {}
    while argv and argv[0].startswith("--"):
        opts[argv[0]], argv = argv[1], argv[2:]
    print("========= COMPUTE-SANITIZER (dry-run stand-in)", flush=True)
    rc = subprocess.call(argv)
    if opts.get("--tool") == "racecheck":
        print("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)")
    else:
        print("========= ERROR SUMMARY: 0 errors")
    return rc


def markdown(record: dict) -> str:
    h = record.get("headline") or {}
    lines = [
        f"# GPU check {record['date']}",
        "",
        f"device: {record['device']}, torch {record['torch']}, CUDA {record['cuda']}, backend {record['backend']}, "
        f"csrc_sha `{record['csrc_sha'][:16]}`, wall {record['wall_s']} s of a {record['budget_s']} s budget",
        "",
        f"tests: {record['tests']}; sanitizer errors: {record['sanitizer_errors']}",
        "",
        "| phase | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in record["phases"].items()]
    lines += ["", f"## Headline ({h.get('shape') or 'not measured'})", "", "| ratio | value | target |",
              "|---|---|---|"]
    def num(v, digits):
        return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"

    targets = record.get("headline_targets") or {}
    lines += [f"| {key} | {num(h.get(key), 3)} | {targets.get(key, 'n/a')} |" for key in HEADLINE_KEYS]
    if record["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in record["notes"]]
    lines += ["", "## Cases (median times, us)", "", "| case | variant | fwd_us | bwd_us | fwdbwd_us |",
              "|---|---|---|---|---|"]
    lines += [f"| {c.get('case', '')} | {c.get('variant', '')} | "
              + " | ".join(num(c.get(k), 1) for k in ("fwd_us", "bwd_us", "fwdbwd_us")) + " |"
              for c in record["cases"]]
    return "\n".join(lines) + "\n"


def _phase_limit(s: str) -> tuple:
    name, _, seconds = s.partition("=")
    if name not in PHASE_CAPS or not seconds:
        raise argparse.ArgumentTypeError(f"expected NAME=SECONDS with NAME one of {', '.join(PHASES)}, got {s!r}")
    return name, float(seconds)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"), help="results folder")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for the whole check (default {DEFAULT_BUDGET_S:.0f})")
    ap.add_argument("--sweep", choices=("none", "quick", "full"), default="quick",
                    help="after the headline: no sweep, bf16 r=16 (default) or the whole CUDA sweep, as time allows")
    ap.add_argument("--phase-limit", type=_phase_limit, action="append", default=[], metavar="NAME=S",
                    help="cap one phase (build, tests, sanitizer, headline, sweep) at S seconds; repeatable")
    ap.add_argument("--tests", nargs="+", default=["tests"], metavar="PATH", help="pytest paths (default: tests)")
    ap.add_argument("--skip-build", action="store_true", help="use the library already built")
    ap.add_argument("--dry-run", action="store_true", help="run everything on the CPU with quick stand-ins")
    ap.add_argument("--bench-child", choices=("headline", "sweep"), help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    return ap


def main(argv: list | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--sanitizer-stand-in"]:
        return sanitizer_stand_in(argv[1:])
    args = build_parser().parse_args(argv)
    if args.bench_child:
        return bench_child(args.bench_child, args.rows, args.sweep, args.dry_run)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("build.log", "tests.log", "sanitizer.log", "bench.log"):
        (out / name).write_text("")
    check = Check(out, args.budget, dict(args.phase_limit))
    if args.dry_run:
        check.note("dry run: every GPU step replaced by a CPU stand-in; no number here is a GPU measurement")
    check.save()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        gpu = probe_gpu(check, tmp, args.dry_run)
        if gpu is None:
            check.skip_rest("no GPU")
            return 1
        if not build(check, out, tmp, gpu, args.dry_run, args.skip_build):
            log(f"the build did not succeed, see {out / 'build.log'}")
            check.skip_rest("the build did not succeed")
            return 1
        tests_and_sanitizer(check, out, tmp, args.tests, args.dry_run)
        bench(check, "headline", out, tmp, args.sweep, args.dry_run)
        bench(check, "sweep", out, tmp, args.sweep, args.dry_run)
    check.save()
    print(markdown(_finite(check.record)).split("## Cases")[0])
    log(f"done in {check.record['wall_s']} s")
    return 0 if check.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
