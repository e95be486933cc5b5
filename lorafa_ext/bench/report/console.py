"""The summary printed at the end of a run."""
from __future__ import annotations

import os
import sys

from .format import text_table
from .markdown import NOISE_TEXT
from .tables import (COMPARE_HEADERS, E2E_HEADERS, HEADLINE_HEADERS, MEMORY_HEADERS, SUMMARY_HEADERS,
                     compare_table_rows, e2e_table_rows, headline_rows, memory_table_rows, summary_rows)


def _micro_lines(micro: dict) -> list:
    lines = []
    if micro["cases"]:
        lines += ["", "Microbenchmarks (median, fwd+bwd; ratios are times, speedups are other/ours):",
                  text_table(SUMMARY_HEADERS, summary_rows(micro["cases"]))]
    h = micro.get("headline")
    if h:
        lines += ["", f"Headline ({h['shape']}):", text_table(HEADLINE_HEADERS, headline_rows(h))]
    if micro.get("skipped"):
        lines.append(f"({len(micro['skipped'])} variant runs skipped; see results.md)")
    return lines


def _e2e_lines(e2e: dict) -> list:
    c = e2e["config"]
    quant = f", {c['quant']} base" if c.get("quant", "none") != "none" else ""
    lines = ["", f"End-to-end training step ({c['model']}, {c['dtype']}{quant}):",
             text_table(E2E_HEADERS, e2e_table_rows(e2e["rows"]))]
    if e2e["comparisons"]:
        lines += ["", text_table(COMPARE_HEADERS, compare_table_rows(e2e["comparisons"]))]
    return lines


def print_summary(results: dict, out: str | None = None, file=None) -> None:
    meta = results["meta"]
    lines = [f"lorafa_ext bench on {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
             f"backend {meta['backend']}", NOISE_TEXT]
    if results.get("micro"):
        lines += _micro_lines(results["micro"])
    mem = results.get("memory")
    if mem and mem["cases"]:
        lines += ["", "Saved activations per layer:", text_table(MEMORY_HEADERS, memory_table_rows(mem["cases"]))]
    e2e = results.get("e2e")
    if e2e and e2e["rows"]:
        lines += _e2e_lines(e2e)
    lines += [f"note: {n}" for n in results.get("notes", [])]
    if out:
        files = ["results.json", "results.md"] + list(results.get("plots", []))
        lines.append(f"wrote {', '.join(os.path.join(out, f) for f in files)} in {meta.get('seconds', 0):.0f} s")
    print("\n".join(lines), file=file or sys.stdout)
