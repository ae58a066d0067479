"""Checkpoints: weights as safetensors, metadata as JSON, optimizer / scheduler state as a
tensors-only ``torch.save`` file read back with ``weights_only=True``.

A checkpoint ``NAME`` in a directory is three files::

    NAME.safetensors   model weights (its metadata repeats the epoch and the save id)
    NAME.json          config, class names in label order, epoch, step, metrics, save id
    NAME.state.pt      optimizer, scheduler (and AMP scaler) state, mid-epoch progress
                       (RNG states, running sums): only tensors and plain values

The three files are replaced together, as one set, so a process killed at any moment (even
``SIGKILL`` in the middle of a save) leaves either the previous checkpoint or the new one:

1. the new files are written to hidden *staged* names (``.NAME.safetensors.staged``, ...)
   and ``fsync``-ed; a kill here leaves the old set untouched (the staged files are
   leftovers, removed by the next save or resume);
2. a commit record ``.NAME.commit`` naming the staged files is written atomically
   (temporary name, ``fsync``, rename, ``fsync`` of the directory): from this moment the new
   set is the checkpoint;
3. each staged file is renamed over its final name (JSON last), then the record is removed.

A kill during step 3 leaves a mix of new and old final files, but the record says what to
finish: :func:`recover_checkpoint` (run by the trainer before a resume and before every
save) completes the renames. Readers never modify anything: they read through the record
(a staged file still present stands for its final name), and every file carries the save's
id, so a set that is inconsistent after all is reported as an error naming the file, never
loaded silently.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import fsync_dir as _fsync_dir
from .atomic import write_text_atomic
from .errors import CheckpointError

__all__ = [
    "CheckpointError",
    "checkpoint_base",
    "load_state",
    "load_weights",
    "read_metadata",
    "recover_checkpoint",
    "save_checkpoint",
    "write_text_atomic",
]

FORMAT = "qcs-checkpoint-v1"
_SUFFIXES = (".safetensors", ".state.pt", ".json")  # rename order: the JSON last


def checkpoint_base(path: str | Path) -> Path:
    """``run/last``, ``run/last.json`` or ``run/last.safetensors`` -> ``run/last``; a run
    directory -> ``run/last``."""
    path = Path(path)
    if path.is_dir():
        return path / "last"
    for suffix in _SUFFIXES:
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def _final(base: Path, suffix: str) -> Path:
    return base.with_name(base.name + suffix)


def _staged(final: Path) -> Path:
    return final.with_name(f".{final.name}.staged")


def _record(base: Path) -> Path:
    return base.with_name(f".{base.name}.commit")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


_paused: set[str] = set()


def _test_pause(phase: str, base: Path) -> None:
    """Fault-injection hook for tests (``qcs_tools/fault_injection.py``): with
    ``QCS_TEST_CHECKPOINT_PAUSE=PHASE[,PHASE...]`` the first save reaching ``PHASE``
    (``staging``: weights staged, state and JSON not yet; ``staged``: all staged, no commit
    record; ``committing``: record written, weights renamed, JSON not yet) writes
    ``$QCS_TEST_CHECKPOINT_PAUSE_FILE`` and sleeps ``$QCS_TEST_CHECKPOINT_PAUSE_S`` seconds
    (default 60) so the harness can kill the process exactly there;
    ``QCS_TEST_CHECKPOINT_PAUSE_NAME=best`` limits it to one checkpoint name. Unset: does
    nothing."""
    wanted = os.environ.get("QCS_TEST_CHECKPOINT_PAUSE", "")
    if not wanted or phase not in wanted.split(",") or phase in _paused:
        return
    only = os.environ.get("QCS_TEST_CHECKPOINT_PAUSE_NAME")
    if only and base.name != only:
        return
    _paused.add(phase)
    flag = os.environ.get("QCS_TEST_CHECKPOINT_PAUSE_FILE")
    if flag:
        write_text_atomic(flag, json.dumps({"phase": phase, "checkpoint": str(base),
                                            "pid": os.getpid()}))
    time.sleep(float(os.environ.get("QCS_TEST_CHECKPOINT_PAUSE_S", "60")))


def _read_record(base: Path) -> dict[str, Any] | None:
    """The commit record of ``base``, or None (none, or unreadable: then never committed,
    since the record is written atomically)."""
    try:
        record = json.loads(_record(base).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        return None
    return record


def _roll_forward(base: Path, record: dict[str, Any], hook: bool = False) -> None:
    for i, suffix in enumerate(record["files"]):
        final = _final(base, suffix)
        try:
            os.replace(_staged(final), final)
        except FileNotFoundError:
            pass  # renamed already (by the interrupted save, or by an earlier recovery)
        if hook and i == 0:
            _test_pause("committing", base)
    for suffix in record.get("remove", []):
        _final(base, suffix).unlink(missing_ok=True)
    _fsync_dir(base.parent)
    _record(base).unlink(missing_ok=True)
    _fsync_dir(base.parent)


def recover_checkpoint(base: str | Path) -> str | None:
    """Finish or discard an interrupted save of checkpoint ``base`` (only the process that
    owns the run directory may call this: it renames and deletes files). A committed save
    (its record exists) is completed; staged and temporary leftovers of an uncommitted one
    are deleted. Returns what was done, or None if there was nothing to do."""
    base = checkpoint_base(base)
    if not base.parent.is_dir():
        return None
    record = _read_record(base)
    if record is not None:
        _roll_forward(base, record)
        done = f"completed the interrupted save {record.get('save_id')} of {base}"
    else:
        done = None
    leftovers = [_record(base)] if _record(base).exists() else []
    leftovers += [p for p in base.parent.glob(f".{base.name}.*")
                  if p.name.endswith((".staged", ".tmp")) or ".tmp-" in p.name]
    for p in leftovers:
        p.unlink(missing_ok=True)
    if leftovers:
        names = ", ".join(sorted(p.name for p in leftovers))
        done = (done + "; " if done else "") + f"removed leftovers of an unfinished save: {names}"
    return done


def save_checkpoint(base: str | Path, model: torch.nn.Module, meta: dict[str, Any],
                    state: dict[str, Any] | None = None) -> str:
    """Write ``base.safetensors``, ``base.state.pt`` (if ``state``; without it an older
    state file is removed) and ``base.json`` as one atomic set (see the module docstring).
    Returns the save id stored in all three files."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(base)  # a save interrupted earlier is finished before this one
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    epoch = str(meta.get("epoch", ""))
    save_id = f"{epoch}.{meta.get('step', '')}-{uuid.uuid4().hex[:12]}"
    writers: list[tuple[str, Callable[[Path], None]]] = [
        (".safetensors", lambda p: save_file(tensors, str(p), metadata={
            "format": FORMAT, "epoch": epoch, "save_id": save_id}))]
    if state is not None:
        writers.append((".state.pt", lambda p: torch.save({**state, "save_id": save_id}, p)))
    text = json.dumps({"format": FORMAT, **meta, "save_id": save_id}, indent=2)
    writers.append((".json", lambda p: p.write_text(text)))
    for suffix, write in writers:
        staged = _staged(_final(base, suffix))
        write(staged)
        _fsync_file(staged)
        if suffix == ".safetensors":
            _test_pause("staging", base)
    _test_pause("staged", base)
    record = {"format": FORMAT, "save_id": save_id, "files": [s for s, _ in writers],
              "remove": [] if state is not None else [".state.pt"]}
    write_text_atomic(_record(base), json.dumps(record))  # the commit point
    _roll_forward(base, record, hook=True)
    return save_id


def _view(base: Path, suffix: str) -> list[Path]:
    """Where the committed content of ``base + suffix`` is, in order of preference: the
    staged file while a commit record names it, then the final file."""
    final = _final(base, suffix)
    record = _read_record(base)
    if record is not None and suffix in record["files"]:
        return [_staged(final), final]
    return [final]


def _open_committed(base: Path, suffix: str, what: str, read: Callable[[Path], Any]) -> Any:
    candidates = _view(base, suffix)
    for path in candidates:
        try:
            return read(path)
        except FileNotFoundError:
            continue  # a staged file renamed meanwhile: its final name holds it now
    raise CheckpointError(f"{what} {candidates[-1]} not found")


def read_metadata(base: str | Path) -> dict[str, Any]:
    """The JSON metadata of checkpoint ``base``."""
    b = checkpoint_base(base)

    def read(path: Path) -> dict[str, Any]:
        try:
            meta = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise CheckpointError(f"{path} is not a qcs checkpoint (format {found!r})")
        return _with_trained_resize(meta)
    return _open_committed(b, ".json", "checkpoint metadata", read)


def _with_trained_resize(meta: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints written before ``backbone_resize`` existed were trained with the
    antialiased resize (converted ones are the published network: nearest); name it, so
    they keep computing what they were trained to compute. Either config layout: the flat
    ``[model]`` section of older checkpoints or the ``[qcs]`` / ``[pcd]`` section."""
    config = meta.get("config")
    if not isinstance(config, dict):
        return meta
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    sections = [config.get("qcs"), config.get("pcd")]
    if model.get("family", "qcs") in ("qcs", "pcd") and "backbone_size" in model:
        sections.append(model)  # the flat layout
    for sec in sections:
        if isinstance(sec, dict) and "backbone_resize" not in sec:
            sec["backbone_resize"] = "nearest" if "converted_from" in meta else "antialias"
    return meta


def load_weights(base: str | Path, expect_epoch: Any = None, *,
                 expect_save_id: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of checkpoint ``base`` (safetensors: tensors only, nothing executed).
    ``expect_epoch`` / ``expect_save_id`` (from the JSON) must match the file's own."""
    b = checkpoint_base(base)

    def read(path: Path) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise FileNotFoundError(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                file_meta = fh.metadata() or {}
                if expect_epoch is not None and file_meta.get("epoch") != str(expect_epoch):
                    raise CheckpointError(f"{path} holds epoch {file_meta.get('epoch')!r} but "
                                          f"its JSON says {expect_epoch!r} (a torn save?)")
                if expect_save_id is not None and file_meta.get("save_id") != expect_save_id:
                    raise CheckpointError(f"{path} is from save {file_meta.get('save_id')!r} "
                                          f"but its JSON is from save {expect_save_id!r} (a "
                                          "save in progress? try again)")
                return {k: fh.get_tensor(k) for k in fh.keys()}
        except (CheckpointError, FileNotFoundError):
            raise
        except Exception as exc:  # safetensors raises its own error type for a damaged file
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None
    return _open_committed(b, ".safetensors", "checkpoint weights", read)


def load_state(base: str | Path, expect_save_id: str | None = None) -> dict[str, Any]:
    """Optimizer / scheduler state of checkpoint ``base`` (``weights_only=True``);
    ``expect_save_id`` (from the JSON) must match the file's own."""
    b = checkpoint_base(base)

    def read(path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise FileNotFoundError(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a damaged file
            raise CheckpointError(f"{path} is not a readable state file: {exc}") from None
        if expect_save_id is not None and state.get("save_id") != expect_save_id:
            raise CheckpointError(f"{path} is from save {state.get('save_id')!r} but its JSON "
                                  f"is from save {expect_save_id!r} (a save in progress? try "
                                  "again)")
        return state
    return _open_committed(b, ".state.pt", "optimizer state", read)
