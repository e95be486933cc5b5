"""The GPU check: one command that builds the extension, runs the whole test suite on CUDA, runs
compute-sanitizer (memcheck, racecheck) over every kernel, runs the microbenchmarks and writes the
results record, within a time budget (8 minutes by default, the build included).

    python benchmarks/gpu_check.py [--out DIR] [--budget S] [--sweep none|quick|full] [--skip-build]

Phases: build (pip install -e . for this GPU's architecture only); then, side by side, the test suite
(sharded over a few pytest processes) and compute-sanitizer; then, alone on the GPU, the headline case
and as much of the sweep as the time left allows. Each phase has a deadline taken from what is left
of the budget; a phase that runs out is killed (its whole process group) and recorded as "timeout".
The record is rewritten after every phase, so a check cut short still leaves one.

Writes DIR/latest.json (fields of ../shared/DESIGN.md: date, device, torch, cuda, csrc_sha, tests,
sanitizer_errors, headline, cases; plus phases, notes, wall_s), DIR/<date>.json, DIR/latest.md and the
logs build.log, tests.log, sanitizer.log, bench.log (seven files). DIR defaults to
benchmarks/results/gpu. Exit status 1 when a test fails, the sanitizer reports errors or a phase
does not finish.
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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `import lorafa_ext` from the checkout, installed or not

TEST_SHARDS = 4
HEADLINE_TARGETS = {"fwd_vs_cublas": "<= 1.05", "fwdbwd_vs_frozen": "<= 1.06",
                    "fwdbwd_dropout_vs_frozen": "<= 1.10", "speedup_vs_peft": ">= 1.35",
                    "speedup_vs_peft_compiled": ">= 1.15"}


def csrc_sha(root: pathlib.Path) -> str:
    """sha256 over the files under csrc/, sorted by relative path: relpath, NUL, bytes, NUL."""
    h = hashlib.sha256()
    for path in sorted(p for p in (root / "csrc").rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


class Proc:
    """A child process in its own session (so a timeout kills its whole tree), output to a log."""

    def __init__(self, name: str, cmd: list, log_file, env: dict):
        self.name, self.log_file = name, log_file
        log(f"{name}: {' '.join(map(str, cmd))}")
        self.popen = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        self.rc: int | None = None
        self.timed_out = False

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.rc = self.popen.wait()
        self.timed_out = True


def wait_all(procs: list, deadline: float) -> None:
    """Wait for every process until the deadline (time.time()), then kill what is left."""
    for p in procs:
        try:
            p.rc = p.popen.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            log(f"{p.name}: killed at the phase deadline")


class Check:
    def __init__(self, out: pathlib.Path, budget: float):
        self.out, self.t0, self.budget = out, time.time(), budget
        self.record = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "device": None, "torch": None, "cuda": None, "csrc_sha": csrc_sha(ROOT),
            "tests": {"passed": 0, "failed": 0, "skipped": 0}, "sanitizer_errors": None,
            "headline": {}, "cases": [], "phases": {}, "notes": [], "budget_s": budget, "wall_s": 0.0,
        }

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def phase(self, name: str, status: str, seconds: float, **extra) -> None:
        self.record["phases"][name] = {"status": status, "seconds": round(seconds, 1), **extra}
        log(f"phase {name}: {status} ({seconds:.0f} s)")
        self.save()

    def save(self) -> None:
        self.record["wall_s"] = round(time.time() - self.t0, 1)
        record = _finite(self.record)
        text = json.dumps(record, indent=1, allow_nan=False)
        (self.out / "latest.json").write_text(text)
        (self.out / f"{record['date'][:10]}.json").write_text(text)
        (self.out / "latest.md").write_text(markdown(record))

    def ok(self) -> bool:
        r = self.record
        return (r["tests"]["failed"] == 0 and r["sanitizer_errors"] == 0
                and all(p["status"] == "ok" for p in r["phases"].values()))


def _finite(v):
    """The record with NaN and inf as None (strict JSON)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


# ------------------------------------------------------------------------------------------------
# phases


def build(check: Check, log_file) -> bool:
    import torch

    extra = {}
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        extra["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    extra.setdefault("MAX_JOBS", os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    t = time.time()
    p = Proc("build", [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
             log_file, child_env(**extra))
    wait_all([p], time.time() + max(60.0, check.left() - 200))
    status = "timeout" if p.timed_out else ("ok" if p.rc == 0 else f"failed (exit {p.rc})")
    check.phase("build", status, time.time() - t, arch=extra.get("TORCH_CUDA_ARCH_LIST"))
    return status == "ok"


def _test_shards(n: int) -> list:
    """Test files dealt round-robin by size (largest first) into n shards."""
    files = sorted((ROOT / "tests").glob("test_*.py"), key=lambda f: -f.stat().st_size)
    shards = [[] for _ in range(n)]
    for i, f in enumerate(files):
        shards[i % n].append(str(f.relative_to(ROOT)))
    return [s for s in shards if s]


def _junit_counts(path: pathlib.Path):
    if not path.exists():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total = int(suite.get("tests", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def _progress_counts(text: str) -> dict:
    """Counts from pytest -q's progress lines (for a shard killed before it wrote its junit report)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for line in text.splitlines():
        m = re.fullmatch(r"([.FEsxX]+)\s*(\[\s*\d+%\])?", line.strip())
        if m:
            counts["passed"] += m.group(1).count(".") + m.group(1).count("X")
            counts["failed"] += m.group(1).count("F") + m.group(1).count("E")
            counts["skipped"] += m.group(1).count("s") + m.group(1).count("x")
    return counts


def _sanitizer_errors(text: str) -> int:
    """Errors in compute-sanitizer's summaries (memcheck: ERROR SUMMARY; racecheck: RACECHECK SUMMARY)."""
    found = [int(m) for m in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    found += [int(m) for m in re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text)]
    return sum(found)


def _append(dst, src: pathlib.Path) -> str:
    """Append a child's log to one of the check's logs; returns its text."""
    text = src.read_text(errors="replace") if src.exists() else ""
    dst.write(text)
    dst.flush()
    return text


def tests_and_sanitizer(check: Check, tests_log, san_log, tmp: pathlib.Path) -> None:
    """The test suite (sharded) and compute-sanitizer side by side: neither is timed."""
    t = time.time()
    deadline = time.time() + max(60.0, check.left() - 150)  # keep about 2.5 min for the benchmarks
    shards = []
    for i, files in enumerate(_test_shards(TEST_SHARDS)):
        junit, shard_log = tmp / f"junit{i}.xml", tmp / f"tests{i}.log"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
        shards.append((Proc(f"tests[{i}]", cmd, open(shard_log, "w"), child_env()), junit, shard_log))
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    cases = str(ROOT / "benchmarks" / "sanitizer_cases.py")
    # No caching allocator: out-of-bounds accesses inside torch's pooled segments would go unseen.
    san_env = child_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    tools = [["--tool", "memcheck"],  # every kernel, cuBLAS's too: a wrong leading dimension shows
             ["--tool", "racecheck", "--kernel-name", "kns=lorafa"]]  # our shared-memory kernels only
    san_errors, san_status = 0, "ok"
    if not os.path.exists(exe):
        san_errors, san_status = 1, "failed (compute-sanitizer not found)"
        tools = []
    for tool in tools:  # one tool after the other, beside the tests
        tool_log = tmp / f"sanitizer_{tool[1]}.log"
        with open(tool_log, "w") as f:
            san = Proc(f"sanitizer {tool[1]}", [exe, *tool, "--report-api-errors", "no", "--error-exitcode", "99",
                                                 sys.executable, cases], f, san_env)
            wait_all([san], deadline)
        san_log.write(f"\n===== compute-sanitizer {' '.join(tool)} (exit {san.rc}, timed out: {san.timed_out})\n")
        text = _append(san_log, tool_log)
        n = _sanitizer_errors(text)
        if "Device not supported" in text:  # e.g. under gVisor: the tool cannot run, which is no verdict
            san_errors, san_status = None, "unavailable (compute-sanitizer: Device not supported)"
            break
        if san.timed_out:
            san_status = "timeout"
        elif san.rc != 0 and n == 0:
            n, san_status = 1, f"failed (exit {san.rc}, no summary)"
        elif "sanitizer cases done" not in text and san_status == "ok":
            san_status = "failed (cases did not finish)"
        log(f"compute-sanitizer {tool[1]}: {n} errors (exit {san.rc})")
        san_errors += n
    check.record["sanitizer_errors"] = san_errors
    check.phase("sanitizer", san_status, time.time() - t)
    wait_all([p for p, _, _ in shards], deadline)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    status = "ok"
    for p, junit, shard_log in shards:
        p.log_file.close()
        tests_log.write(f"\n===== {p.name} (exit {p.rc}, timed out: {p.timed_out})\n")
        text = _append(tests_log, shard_log)
        c = _junit_counts(junit)
        if p.timed_out:
            status = "timeout"
        if c is None:  # killed or crashed before its report: count its progress, and one failure
            c = _progress_counts(text)
            c["failed"] += 1
            check.record["notes"].append(f"{p.name}: no junit report (exit {p.rc}, timed out: {p.timed_out}); "
                                         f"counted from its progress lines, plus one failure")
        elif not p.timed_out and p.rc not in (0, 1, 5):  # pytest: interrupted, internal error, usage error
            c["failed"] += 1
            status = f"failed (pytest exit {p.rc})"
            check.record["notes"].append(f"{p.name}: pytest exited with {p.rc} (see tests.log), counted as a failure")
        for k in counts:
            counts[k] += c[k]
    check.record["tests"] = counts
    check.phase("tests", status, time.time() - t)


def bench(check: Check, log_file, sweep: str) -> None:
    """Headline and sweep in a child process that appends each case's rows to a JSON-lines file."""
    t = time.time()
    rows_path = pathlib.Path(tempfile.gettempdir()) / f"gpu_check_rows_{os.getpid()}.jsonl"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--bench-child", str(rows_path), "--sweep", sweep]
    p = Proc("bench", cmd, log_file, child_env())
    wait_all([p], time.time() + max(30.0, check.left() - 10))
    headline, rows = {}, []
    if rows_path.exists():
        for line in rows_path.read_text().splitlines():
            item = json.loads(line)
            if "headline" in item:
                headline = item["headline"]
            rows.extend(item.get("rows", []))
            check.record["notes"].extend(item.get("notes", []))
        rows_path.unlink()
    check.record["headline"], check.record["cases"] = headline, rows
    status = "timeout" if p.timed_out and not headline else ("ok" if headline else f"failed (exit {p.rc})")
    if p.timed_out and headline:
        check.record["notes"].append("sweep cut short by the time budget (headline complete)")
    check.phase("bench", status, time.time() - t, cases=len({r.get("case") for r in rows}))


def bench_child(rows_path: str, sweep: str) -> int:
    """Runs in the bench subprocess: headline first, then the sweep one case at a time."""
    import torch

    from lorafa_ext import bench as lbench

    def emit(item):
        with open(rows_path, "a") as f:
            f.write(json.dumps(_finite(item)) + "\n")

    notes: list = []
    headline, rows = lbench.headline_ratios("cuda", notes=notes)
    emit({"headline": headline, "rows": rows, "notes": notes})
    cases = {"none": [], "quick": lbench.gpu_sweep(dtypes=("bf16",), ranks=(16,)), "full": lbench.gpu_sweep()}[sweep]
    timing = lbench.timing_config("cuda", "quick")
    variants = [v for v in lbench.available_variants(lbench.ALL_VARIANTS, []) if not lbench.VARIANTS[v].compiled]
    for case in cases:
        if case == lbench.headline_case("cuda"):
            continue
        res = lbench.run_sweep([case], variants, torch.device("cuda"), timing, compile_for=lambda c: False)
        emit({"rows": res["cases"]})
    return 0


def markdown(record: dict) -> str:
    h = record.get("headline") or {}
    lines = [
        f"# GPU check {record['date']}",
        "",
        f"device: {record['device']}, torch {record['torch']}, CUDA {record['cuda']}, "
        f"csrc_sha `{record['csrc_sha'][:16]}`, wall {record['wall_s']} s of a {record['budget_s']} s budget",
        "",
        f"tests: {record['tests']}; sanitizer errors: {record['sanitizer_errors']}",
        "",
        "| phase | status | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in record["phases"].items()]
    lines += ["", f"## Headline ({h.get('shape', 'not measured')})", "", "| ratio | value | target |", "|---|---|---|"]
    for key, target in HEADLINE_TARGETS.items():
        v = h.get(key)
        lines.append(f"| {key} | {v:.3f} | {target} |" if isinstance(v, (int, float)) else f"| {key} | n/a | {target} |")
    if record["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in record["notes"]]
    lines += ["", "## Cases (median times, us)", "", "| case | variant | fwd_us | bwd_us | fwdbwd_us |",
              "|---|---|---|---|---|"]
    for c in record["cases"]:
        def f(k):
            v = c.get(k)
            return f"{v:.1f}" if isinstance(v, (int, float)) else "n/a"
        lines.append(f"| {c.get('case', '')} | {c.get('variant', '')} | {f('fwd_us')} | {f('bwd_us')} | {f('fwdbwd_us')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"), help="results folder")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    ap.add_argument("--sweep", choices=("none", "quick", "full"), default="quick",
                    help="after the headline: no sweep, the bf16 r=16 sweep (default), or the issue's full sweep "
                         "(time-limited by the budget)")
    ap.add_argument("--skip-build", action="store_true", help="use the extension already built")
    ap.add_argument("--bench-child", metavar="ROWS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bench_child:
        return bench_child(args.bench_child, args.sweep)
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget)
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    check.record.update(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda)
    check.save()
    with open(out / "build.log", "w") as build_log:
        if not args.skip_build and not build(check, build_log):
            log(f"build did not succeed, see {out / 'build.log'}")
            return 1
    probe = subprocess.run([sys.executable, "-c", "import lorafa_ext; print(lorafa_ext.backend())"], cwd=ROOT,
                           env=child_env(), capture_output=True, text=True)
    backend = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else f"import failed: {probe.stderr[-500:]}"
    check.record["backend"] = backend
    if backend != "cuda":
        check.phase("backend", f"failed (backend: {backend})", 0.0)
        return 1
    with open(out / "tests.log", "w") as tests_log, open(out / "sanitizer.log", "w") as san_log, \
            tempfile.TemporaryDirectory() as tmp:
        tests_and_sanitizer(check, tests_log, san_log, pathlib.Path(tmp))
    with open(out / "bench.log", "w") as bench_log:
        bench(check, bench_log, args.sweep)
    check.save()
    print(markdown(_finite(check.record)).split("## Cases")[0])
    log(f"done in {check.record['wall_s']} s")
    return 0 if check.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
