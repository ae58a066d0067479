"""A small progress bar for long loops (no extra dependency).

On a terminal it redraws one line in place; otherwise (logs, CI) it prints a line every
``every`` seconds and at the end, so piped output stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class Progress:
    """``Progress(total, desc)``; ``update(done, **stats)``; ``close()``."""

    def __init__(self, total: int, desc: str, unit: str = "it", stream: TextIO | None = None,
                 every: float = 30.0, enabled: bool = True) -> None:
        self.total, self.desc, self.unit = max(total, 1), desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every, self.enabled = every, enabled
        self.start = self._last = time.perf_counter()
        self.done, self.items, self.stats = 0, 0, {}

    def update(self, done: int, items: int = 0, **stats: float | str) -> None:
        """Mark ``done`` steps complete; ``items`` adds to the throughput count."""
        self.done, self.items = done, self.items + items
        self.stats.update(stats)
        now = time.perf_counter()
        if not self.enabled:
            return
        if self.tty and (now - self._last > 0.2 or done >= self.total):
            self.stream.write("\r" + self._line(now) + "\x1b[K")
            self.stream.flush()
            self._last = now
        elif not self.tty and now - self._last > self.every:
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()
            self._last = now

    def tick(self, done: int, total: int) -> None:
        """A progress callback ``(done, total)``: sets the total, counts one item."""
        self.total = max(total, 1)
        self.update(done, items=1)

    def _line(self, now: float) -> str:
        elapsed = now - self.start
        frac = min(self.done / self.total, 1.0)
        width = 20
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        rate = f" {self.items / elapsed:.1f} {self.unit}/s" if self.items and elapsed > 0 else ""
        stats = "".join(f" {k}={v:.4f}" if isinstance(v, float) else f" {k}={v}"
                        for k, v in self.stats.items())
        return (f"{self.desc} [{bar}] {self.done}/{self.total} "
                f"{_fmt_time(elapsed)}<{_fmt_time(eta)}{rate}{stats}")

    def close(self) -> None:
        """Print the final line (a no-op when disabled)."""
        if not self.enabled:
            return
        line = self._line(time.perf_counter())
        self.stream.write(("\r" + line + "\x1b[K\n") if self.tty else line + "\n")
        self.stream.flush()
