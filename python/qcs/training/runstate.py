"""The state of a run outside the model: where it starts (a fresh run or a checkpoint to
resume), the lock on its directory, stop signals, seeds and RNG states, and the
process-wide torch settings a config may ask for."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import checkpoint_base, read_metadata, recover_checkpoint
from ..config import Config, TrainConfig, config_of_checkpoint, load_config
from ..errors import CheckpointError, DeviceError

__all__ = [
    "ResumePoint",
    "StopSignals",
    "TrainingInterrupted",
    "epoch_seed",
    "lock_run_dir",
    "process_settings",
    "resolve_device",
    "resolve_resume",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` must
    name a device this machine has. Raises :class:`DeviceError` (one line: the argument,
    what is wrong and what exists)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"--device {name}: not a device name; use auto, cpu, cuda or "
                          "cuda:N") from None
    if device.type == "cpu" and device.index in (None, 0):
        return device
    if device.type != "cuda":
        raise DeviceError(f"--device {name}: not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "no CUDA device visible"
        raise DeviceError(f"--device {name}: CUDA is not available on this machine ({build}); "
                          "use --device cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {name}: this machine has {count} CUDA device"
                          f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in epoch ``epoch`` (sampling, augmentation, dropout)."""
    return (seed * 1_000_003 + epoch * 7919) % 2**62


@contextlib.contextmanager
def process_settings(tc: TrainConfig) -> Iterator[None]:
    """Apply the process-wide torch settings ``tc`` asks for (``threads > 0``,
    ``deterministic = true``) for the duration of the block, then put the previous ones
    back; settings not asked for are left alone."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            # cuBLAS needs this before its first use to be deterministic
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`qcs.training.train` after SIGINT or SIGTERM once ``last.*`` holds
    the state reached (a ``KeyboardInterrupt``, so code that handles Ctrl-C handles it).
    ``exit_code`` is ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopSignals:
    """SIGINT / SIGTERM handlers that only record the request, so the loop can finish its
    step and save; the first signal puts the previous handler back, so a second one acts
    as usual (Ctrl-C: KeyboardInterrupt; SIGTERM: terminate). Installed only when
    ``enabled`` and in the main thread (Python allows signal handlers nowhere else);
    otherwise :attr:`signum` stays None and the process's handlers are untouched."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.signal(sig, self._handle)
                # None: a handler installed outside Python, which cannot be put back
                self._previous[sig] = signal.SIG_DFL if previous is None else previous
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous[signum])
        # os.write: logging from a signal handler could re-enter a handler's lock
        os.write(2, f"\nqcs: {signal.Signals(signum).name} received: finishing the current "
                    f"step, then saving a checkpoint (send it again to stop at once)\n".encode())

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def lock_run_dir(run_dir: Path):
    """An exclusive lock on ``run_dir`` for this process (released when it exits, even by
    SIGKILL): two trainers writing one run's checkpoints would corrupt each other's.
    Returns the open lock file (close it to release), or None where there is no ``fcntl``."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    fh = open(run_dir / ".train.lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise CheckpointError(f"run directory {run_dir} is in use by another training "
                              f"process (pid {holder})") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain values (``weights_only``)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class ResumePoint:
    """Where a run starts: epoch and step (``step > 0``: inside that epoch), the best
    accuracy so far, the checkpoint to load (None: fresh weights), notes for the log and,
    once the checkpoint is loaded, its mid-epoch progress."""

    epoch: int = 1
    step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    checkpoint: Path | None = None
    notes: list[str] = field(default_factory=list)
    progress: dict[str, Any] | None = None  # mid-epoch state, once the checkpoint is read


def _has_checkpoint(base: Path) -> bool:
    return (base.with_name(base.name + ".json").exists()
            or base.with_name(f".{base.name}.commit").exists())


def _recover(run_dir: Path, notes: list[str]) -> None:
    """Finish or discard saves a kill interrupted (the owner of the run directory only)."""
    for name in ("last", "best"):
        done = recover_checkpoint(run_dir / name)
        if done:
            notes.append(done)


def resolve_resume(resume: str | Path, owner: bool) -> tuple[Config, Path, ResumePoint, Any]:
    """Read the run that ``resume`` (a run directory or a checkpoint) names.

    Returns its config, its directory, the :class:`ResumePoint` and the directory's lock
    (taken when ``owner``, i.e. rank 0, which also repairs interrupted saves). A run killed
    before its first checkpoint restarts from its ``config.toml``."""
    base = checkpoint_base(resume)
    run_dir, point, lock = base.parent, ResumePoint(), None
    if owner and run_dir.is_dir():
        lock = lock_run_dir(run_dir)
        _recover(run_dir, point.notes)
    fresh = run_dir / "config.toml"
    if Path(resume).is_dir() and not _has_checkpoint(base):
        if not fresh.is_file():
            raise CheckpointError(f"{run_dir} holds no checkpoint and no config.toml (the run "
                                  "stopped before training began): start it again with its "
                                  "original command")
        point.notes.append(f"{run_dir} has no checkpoint yet: starting it from the beginning "
                           f"with its {fresh.name}")
        return load_config(fresh, legacy=True), run_dir, point, lock
    meta = read_metadata(base)
    cfg = config_of_checkpoint(meta, f"{base}.json")
    if meta.get("epoch_complete", True):
        point.epoch = meta["epoch"] + 1
    else:  # a mid-epoch checkpoint (train.checkpoint_every, or SIGINT / SIGTERM)
        point.epoch, point.step = meta["epoch"], meta["step"]
    point.best_acc, point.best_epoch = meta.get("best_acc", -1.0), meta.get("best_epoch", 0)
    point.checkpoint = base
    return cfg, run_dir, point, lock
