"""A progress bar: tqdm when it is installed, else a plain counter on stderr."""
from __future__ import annotations

import sys
import time


class _Plain:
    def __init__(self, total, desc, disable):
        self.total = total
        self.n = 0
        self.desc = desc
        self.disable = disable
        self._last = 0.0
        self._t0 = time.perf_counter()

    def set_description(self, desc, refresh=True):
        self.desc = desc
        self._print()

    def update(self, n=1):
        self.n += n
        self._print()

    def _print(self, force=False):
        if self.disable:
            return
        now = time.perf_counter()
        if not force and now - self._last < 1.0 and self.n < self.total:
            return
        self._last = now
        sys.stderr.write(f"\r[{self.n}/{self.total}] {now - self._t0:6.1f}s {self.desc[:60]:<60}")
        sys.stderr.flush()

    def write(self, msg):
        if not self.disable:
            sys.stderr.write("\r" + " " * 80 + "\r")
        print(msg, file=sys.stderr)

    def close(self):
        if not self.disable:
            self._print(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress(total: int, desc: str = "", enabled: bool = True):
    """Return a bar with update(n), set_description(str), write(str) and close()."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - depends on the environment
        return _Plain(total, desc, disable=not enabled)
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")


class NullBar:
    """A bar that shows nothing (for library calls without a caller-supplied bar)."""

    n = 0

    def update(self, n=1):
        self.n += n

    def set_description(self, desc, refresh=True):
        pass

    def write(self, msg):
        print(msg, file=sys.stderr)

    def close(self):
        pass
