"""Lets the scripts in benchmarks/ run from a source checkout without installing the package."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import lorafa_ext  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)
