"""How ``qcs`` talks to a person: log messages through the ``qcs`` logger on stderr and
progress bars through tqdm, so that stdout carries only a command's result.

The library only logs (``logging.getLogger("qcs")``) and draws bars with :func:`progress`;
what is shown is decided by whoever runs it: the command line calls :func:`console` with
its ``-q`` / ``-v`` count, a program embedding ``qcs`` configures logging as it likes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ["log", "setup_logging", "console", "progress", "Ticker", "LEVELS"]

log = logging.getLogger("qcs")

# verbosity (-q: -1, default 0, -v: 1, -vv: 2) -> level of the qcs logger
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class _Formatter(logging.Formatter):
    """Plain messages; warnings and errors say so (``warning: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {text}"
        return text


def setup_logging(verbosity: int = 0) -> logging.Logger:
    """Send the ``qcs`` logger to the current ``sys.stderr`` at the level of ``verbosity``
    (see :data:`LEVELS`; below -1 counts as -1, above 1 as 1). Replaces the handler an
    earlier call installed, so calling it again (tests, several commands in one process)
    never doubles lines."""
    for handler in [h for h in log.handlers if getattr(h, "_qcs_console", False)]:
        log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._qcs_console = True  # type: ignore[attr-defined]
    handler.setFormatter(_Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(LEVELS[max(-1, min(1, verbosity))])
    log.propagate = False
    return log


@contextlib.contextmanager
def console(verbosity: int = 0) -> Iterator[logging.Logger]:
    """:func:`setup_logging` for the duration of the block, with log lines written through
    tqdm so that they never break a progress bar; the logger is put back afterwards."""
    level, propagate = log.level, log.propagate
    setup_logging(verbosity)
    try:
        with logging_redirect_tqdm(loggers=[log]):
            yield log
    finally:  # leave the logger as it was (a later user's stderr may be another stream)
        for handler in [h for h in log.handlers if getattr(h, "_qcs_console", False)]:
            log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def progress(total: int, desc: str, *, unit: str = "img", initial: int = 0,
             enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr counting ``unit`` up to ``total`` (from ``initial``). On a
    terminal it redraws in place; elsewhere (a log file, CI) it writes a line at most every
    30 s. ``enabled=False`` (``-q``, other ranks) draws nothing."""
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=max(int(total), 0), desc=desc, unit=unit, initial=initial,
                disable=not enabled, file=sys.stderr, dynamic_ncols=tty,
                mininterval=0.2 if tty else 30.0)


class Ticker:
    """A ``(done, total)`` progress callback (the form the data generators and dataset
    decoders report in) that draws a :func:`progress` bar, created at the first call so that
    work that turns out to be cached draws nothing. :meth:`close` ends the bar, if any."""

    def __init__(self, desc: str, *, unit: str = "img", enabled: bool = True) -> None:
        self.desc, self.unit, self.enabled = desc, unit, enabled
        self.bar: tqdm | None = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        """Record that ``done`` of ``total`` items are finished."""
        if self.bar is None:
            self.bar = progress(total, self.desc, unit=self.unit, enabled=self.enabled)
        elif self.bar.total != total:
            self.bar.total = total
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        """End the bar (a no-op when nothing was reported)."""
        if self.bar is not None:
            self.bar.close()
