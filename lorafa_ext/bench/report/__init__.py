"""Reporting: tables (console and markdown share their rows), results.md, results.json, PNG plots."""
from .console import print_summary
from .format import fmt, fmt_spread, fmt_x, md_table, text_table
from .jsonio import sanitize, write_json
from .markdown import markdown
from .plots import plot_e2e, plot_saved_vs_seqlen, plot_speedup_vs_n
from .tables import (COMPARE_HEADERS, E2E_HEADERS, HEADLINE_HEADERS, MEMORY_HEADERS, MICRO_HEADERS, SUMMARY_HEADERS,
                     compare_table_rows, e2e_table_rows, headline_rows, memory_table_rows, micro_table_rows,
                     summary_rows)

