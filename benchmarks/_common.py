"""The helper every script in benchmarks/ shares: import the package from this checkout, run one
suite of ``lorafa_ext.bench`` (or a custom measurement) and write one results file per run.

Each run writes exactly one JSON file (``--out FILE``, default ``bench_out/<script>.json``): the
run's metadata, notes and results, as ``python -m lorafa_ext.bench`` writes them into results.json.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import lorafa_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)

from lorafa_ext import bench  # noqa: E402


def results_path(script: str) -> str:
    return os.path.join("bench_out", os.path.splitext(os.path.basename(script))[0] + ".json")


def write_results(path: str, results: dict) -> str:
    """Write the one results file of a run (strict JSON, NaN and inf as null); returns its path."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    bench.write_json(path, results)
    print(f"wrote {path}")
    return path


def run_suite(script: str, suite: str, defaults=(), argv=None) -> int:
    """Run one suite of lorafa_ext.bench with its options, print its tables, write one results file."""
    parser = bench.build_parser(prog=f"benchmarks/{os.path.basename(script)}", out_default=results_path(script),
                                out_help=f"results file (default: {results_path(script)})")
    args = parser.parse_args(["--suites", suite, *defaults, *(sys.argv[1:] if argv is None else argv)])
    results = bench.collect(args)
    results["plots"] = []
    bench.print_summary(results)
    write_results(args.out, results)
    return 0
