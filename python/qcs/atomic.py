"""One way to write a file atomically: write a temporary sibling, ``fsync`` it, rename it
over the target, ``fsync`` the directory. A reader, or a process killed at any moment, sees
the old content or the new one, never a torn file."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "write_text_atomic"]


def fsync_dir(path: str | Path) -> None:
    """Make renames in directory ``path`` durable (a no-op where directories cannot be
    opened or synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the renames still happened
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    """A hidden sibling of ``path`` with the same suffix (writers such as matplotlib and
    PIL pick the format from it), unique per process."""
    stem = path.stem if path.name.startswith(".") else f".{path.stem}"
    return path.with_name(f"{stem}.tmp-{os.getpid()}{path.suffix}")


def atomic_write(path: str | Path, write: Callable[[Path], None], *, durable: bool = True
                 ) -> Path:
    """Call ``write(tmp)`` to fill a temporary file, then rename it to ``path``.

    ``durable`` also ``fsync``-s the file and the directory (checkpoints, metrics); plots
    and caches can skip it. The temporary file never outlives a failed ``write``.
    Returns ``path``."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` by ``text`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))
