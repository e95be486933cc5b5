"""The GPU check: one command that builds the extension, runs the whole test suite on CUDA, runs
compute-sanitizer (memcheck, racecheck) over every kernel, runs the microbenchmarks and writes the
results record.

    python benchmarks/gpu_check.py [--out DIR] [--skip-build] [--quick]

Writes DIR/latest.json (fields in README's status section: date, device, torch, cuda, csrc_sha, tests,
sanitizer_errors, headline, cases), DIR/<date>.json (a dated copy) and DIR/latest.md (tables).
DIR defaults to benchmarks/results/gpu. Exit status 1 when a test fails or the sanitizer reports errors.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]


def csrc_sha(root: pathlib.Path) -> str:
    """sha256 over the files under csrc/, sorted by relative path: relpath, NUL, bytes, NUL."""
    h = hashlib.sha256()
    for path in sorted(p for p in (root / "csrc").rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, log_path: pathlib.Path, env=None, timeout=None) -> int:
    log(" ".join(map(str, cmd)))
    with open(log_path, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    return proc.returncode


def build(out: pathlib.Path) -> None:
    import torch

    env = dict(os.environ)
    if "TORCH_CUDA_ARCH_LIST" not in env and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    rc = run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
             out / "build.log", env=env)
    if rc != 0:
        sys.exit(f"build failed, see {out / 'build.log'}")


def tests(out: pathlib.Path, quick: bool) -> dict:
    junit = out / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "tests", f"--junitxml={junit}"] + (["-x"] if quick else [])
    run(cmd, out / "tests.log", timeout=1800)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        total = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts = {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}
    else:
        counts["failed"] = 1
    log(f"tests: {counts}")
    return counts


def sanitizer(out: pathlib.Path) -> int:
    exe = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    errors = 0
    for tool in ("memcheck", "racecheck"):
        log_path = out / f"sanitizer_{tool}.log"
        rc = run([exe, "--tool", tool, "--error-exitcode", "99", sys.executable,
                  str(ROOT / "benchmarks" / "sanitizer_cases.py")], log_path, timeout=900)
        text = log_path.read_text(errors="replace")
        found = [int(m) for m in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
        n = sum(found) if found else (0 if rc == 0 else 1)
        if rc != 0 and n == 0:
            n = 1  # the run itself failed
        log(f"compute-sanitizer {tool}: {n} errors (exit {rc})")
        errors += n
    return errors


def bench(quick: bool):
    from lorafa_ext import bench as lbench

    cases = [] if quick else lbench.gpu_sweep()
    headline, rows = lbench.headline_ratios("cuda", cases=cases)
    return headline, rows


def markdown(record: dict) -> str:
    h = record["headline"]
    lines = [
        f"# GPU check {record['date']}",
        "",
        f"device: {record['device']}, torch {record['torch']}, CUDA {record['cuda']}, csrc_sha `{record['csrc_sha'][:16]}`",
        "",
        f"tests: {record['tests']}; sanitizer errors: {record['sanitizer_errors']}",
        "",
        f"## Headline ({h.get('shape')})",
        "",
        "| ratio | value | target |",
        "|---|---|---|",
    ]
    targets = {"fwd_vs_cublas": "<= 1.05", "fwdbwd_vs_frozen": "<= 1.06", "fwdbwd_dropout_vs_frozen": "<= 1.10",
               "speedup_vs_peft": ">= 1.35", "speedup_vs_peft_compiled": ">= 1.15"}
    for key, target in targets.items():
        v = h.get(key)
        lines.append(f"| {key} | {v:.3f} | {target} |" if isinstance(v, (int, float)) else f"| {key} | n/a | {target} |")
    lines += ["", "## Cases (median times, us)", "", "| case | variant | fwd_us | bwd_us | fwdbwd_us |", "|---|---|---|---|---|"]
    for c in record["cases"]:
        def f(k):
            v = c.get(k)
            return f"{v:.1f}" if isinstance(v, (int, float)) else "n/a"
        lines.append(f"| {c.get('case', '')} | {c.get('variant', '')} | {f('fwd_us')} | {f('bwd_us')} | {f('fwdbwd_us')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"), help="results folder")
    ap.add_argument("--skip-build", action="store_true", help="use the extension already built")
    ap.add_argument("--quick", action="store_true", help="headline case only, stop tests at the first failure")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not args.skip_build:
        build(out)
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA GPU")
    import lorafa_ext

    if lorafa_ext.backend() != "cuda":
        sys.exit(f"the compiled CUDA backend is not active (backend: {lorafa_ext.backend()})")
    counts = tests(out, args.quick)
    errors = sanitizer(out)
    headline, rows = bench(args.quick)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "csrc_sha": csrc_sha(ROOT),
        "tests": counts,
        "sanitizer_errors": errors,
        "headline": headline,
        "cases": rows,
        "wall_s": round(time.time() - t0, 1),
    }
    text = json.dumps(record, indent=1, default=str)
    (out / "latest.json").write_text(text)
    (out / f"{record['date'][:10]}.json").write_text(text)
    (out / "latest.md").write_text(markdown(record))
    print(markdown(record).split("## Cases")[0])
    log(f"done in {record['wall_s']} s")
    return 0 if counts["failed"] == 0 and errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
