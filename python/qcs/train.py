"""The training loop: data, model, SAM, per-epoch evaluation, checkpoints, logs, plots.

A run directory holds ``config.toml`` (the resolved config, reusable with ``--config``),
``metrics.jsonl`` (one JSON object per epoch), ``train.log``, ``last.*`` and ``best.*``
checkpoints (see :mod:`qcs.checkpoint`) and PNG plots.

Reproducibility: everything random in epoch ``e`` (sampling, augmentation, dropout,
worker seeds) is seeded from ``(seed, e)`` at the start of the epoch, so ``--resume``
continues exactly as an uninterrupted run would, and ``deterministic=True`` (which also
asks torch for deterministic kernels) makes two runs give identical weights.

Interruptions: ``last.*`` is saved at every epoch end and, with ``train.checkpoint_every
= N``, every ``N`` steps; a mid-epoch checkpoint also holds the RNG states and the epoch's
running sums, so a resumed run (``data.num_workers = 0``) ends with bit-identical weights.
SIGINT / SIGTERM let the current step finish, save ``last.*`` and raise
:class:`TrainingInterrupted` (the CLI exits 130 / 143); a second signal acts as usual.
A run killed before its first checkpoint restarts from its ``config.toml`` on ``--resume``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import plots
from .checkpoint import (CheckpointError, checkpoint_base, load_state, load_weights,
                         read_metadata, recover_checkpoint, save_checkpoint, write_text_atomic)
from .config import Config, config_from_dict, load_config, to_toml
from .distributed import DistContext, ShardedIndices, ShardedTupleSampler, init_distributed
from .data import (DataError, ImageDataset, SynthParams, TupleSampler, ensure_synth,
                   load_split, screen_data, test_transform, train_transform)
from .models import BRANCHES, QCSNet, build_model, load_backbone_weights, qcs_loss
from .optim import SAM, build_optimizer, build_scheduler
from .progress import Progress

__all__ = ["train", "evaluate", "resolve_device", "prepare_data", "seed_everything", "RunResult",
           "TrainingInterrupted"]

log = logging.getLogger("qcs")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available on this machine")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    if on:
        # cuBLAS needs this before its first use to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = not on


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % 2**62


@dataclass
class Data:
    train: ImageDataset
    test: ImageDataset
    classes: tuple[str, ...]
    root: str


def prepare_data(cfg: Config, cache_dir: str | None = None, show_progress: bool = True) -> Data:
    """Read the train / test lists of ``cfg.data`` (generating the built-in data if the
    format is ``synth`` and no root is given), optionally check every image, and wrap them
    in datasets with the paper's transforms at ``cfg.data.image_size``."""
    d = cfg.data
    root = d.root
    if d.format == "synth" and not root:
        params = SynthParams(seed=d.synth_seed, train_per_class=d.synth_train_per_class,
                             test_per_class=d.synth_test_per_class, size=d.synth_size,
                             bias=d.synth_bias, bias_strength=d.synth_bias_strength)
        bar = Progress(1, "built-in data", unit="img", enabled=show_progress)
        def tick(done: int, total: int) -> None:
            bar.total = total
            bar.update(done, items=1)
        root = str(ensure_synth(params, cache_dir, progress=tick))
        if bar.done:
            bar.close()
        log.info("built-in data (%s): %s", params.tag(), root)
    if not root:
        raise DataError(f"data.format={d.format!r} needs a dataset root: pass --data-root DIR")
    train_list = load_split(d.format, root, "train", d.train_list, d.skip_bad)
    test_list = load_split(d.format, root, "test", d.test_list, d.skip_bad)
    if train_list.classes != test_list.classes:
        raise DataError(f"train and test class lists differ: {train_list.classes} vs "
                        f"{test_list.classes}")
    # --check-data / --skip-bad decode every image up front (so no sampler draws a bad one)
    # QCS / DCS draw a positive that is another image of the anchor's class
    paired = cfg.model.family == "qcs" and cfg.model.variant in ("qcs", "dcs")
    train_list, test_list = screen_data(train_list, test_list, decode=d.check or d.skip_bad,
                                        skip_bad=d.skip_bad, show_progress=show_progress,
                                        min_per_class=2 if paired else 1)
    for lst in (train_list, test_list):
        log.info("%s: %d images, per class %s%s", lst.source, len(lst), lst.counts(),
                 "".join(f"; {n}" for n in lst.notes))
    size = d.image_size
    heatmaps = cfg.model.family == "pcd" and cfg.model.landmarks == "heatmap"
    if heatmaps:  # PCD's landmark source: maps stored beside the images (qcs.data.landmarks)
        from .data.landmarks import HeatmapDataset, HeatmapTransform, ensure_heatmaps
        for lst in (train_list, test_list):
            ensure_heatmaps(lst, root)

    def dataset(lst, transform):
        bar = Progress(len(lst), f"decoding {lst.source}", unit="img",
                       enabled=show_progress and d.cache_in_memory)
        if heatmaps:
            ds = HeatmapDataset(lst, size, HeatmapTransform(transform is train_tf),
                                cache=d.cache_in_memory, channels=cfg.model.heatmap_channels,
                                progress=lambda i, n: bar.update(i, items=1))
        else:
            ds = ImageDataset(lst, size, transform, cache=d.cache_in_memory,
                              progress=lambda i, n: bar.update(i, items=1))
        if d.cache_in_memory:
            bar.close()
        return ds

    train_tf = train_transform(size)
    return Data(dataset(train_list, train_tf), dataset(test_list, test_transform(size)),
                train_list.classes, root)


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _frozen_bn_stats(model: nn.Module):
    """SAM's second pass runs at perturbed weights: keep it out of BN running stats."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum


@torch.no_grad()
def evaluate(model: QCSNet, loader, device: torch.device, num_classes: int, amp: str = "none",
             show_progress: bool = True, desc: str = "eval", reduce=None) -> dict[str, Any]:
    """Base-network evaluation: ``loss``, ``acc``, per-class ``recall`` / ``f1`` (lists of
    ``K``), ``mean_recall`` and the ``confusion`` matrix (``K x K``, rows = true class).
    ``reduce`` (DDP: a sum over ranks of a float64 tensor) combines per-rank shards."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum, count = 0.0, 0
    bar = Progress(len(loader), desc, unit="img", enabled=show_progress)
    for step, (x, y) in enumerate(loader, 1):
        x, y = x.to(device, non_blocking=True), y.to(device)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        count += len(y)
        pred = logits.argmax(dim=1)
        confusion += torch.bincount((y * num_classes + pred).cpu(),
                                    minlength=num_classes ** 2).view(num_classes, num_classes)
        bar.update(step, items=len(y))
    bar.close()
    if reduce is not None:  # each rank saw its shard of the test set: sum counts and losses
        tot = reduce(torch.cat([confusion.flatten().double(),
                                torch.tensor([loss_sum, count], dtype=torch.float64)]))
        confusion = tot[:-2].round().long().view(num_classes, num_classes)
        loss_sum, count = float(tot[-2]), int(tot[-1])
    cm = confusion.double()
    tp = cm.diag()
    recall = tp / cm.sum(1).clamp(min=1)
    precision = tp / cm.sum(0).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {"loss": loss_sum / max(count, 1), "acc": float(tp.sum() / max(count, 1)),
            "recall": recall.tolist(), "f1": f1.tolist(), "mean_recall": float(recall.mean()),
            "confusion": confusion.tolist()}


@dataclass
class RunResult:
    run_dir: Path
    best_acc: float
    best_epoch: int
    last: dict[str, Any]


def _read_history(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # written atomically since the checkpoint rework; a torn line is from an older run
            log.warning("%s line %d is not JSON (a torn write?); dropped", path, n)
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def _atomic_output(path: Path, write) -> None:
    """``write(tmp)`` then rename to ``path``: a kill never leaves a half-written plot."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix picks the format
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after SIGINT or SIGTERM once ``last.*`` holds the state
    reached (a ``KeyboardInterrupt``, so code that handles Ctrl-C handles it).
    ``exit_code`` is ``128 + signal number``: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class _StopSignals:
    """SIGINT / SIGTERM handlers that only record the request, so the loop can finish its
    step and save; the first signal puts the previous handler back, so a second one acts
    as usual (Ctrl-C: KeyboardInterrupt; SIGTERM: terminate). Installed only in the main
    thread (Python allows signal handlers nowhere else)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
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


class _ResumableSampler(torch.utils.data.Sampler):
    """Wraps the epoch's tuple sampler; ``skip`` items are left out at the start of the next
    iteration (a mid-epoch resume draws the same epoch and continues where it stopped)."""

    def __init__(self, inner) -> None:
        self.inner, self.skip = inner, 0

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner)


def _worker_ignores_sigint(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C (the terminal sends it to the whole process group):
    the main process stops them after saving; a worker that died of it would fail the
    batch being fetched instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _rng_state(device: torch.device) -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _lock_run_dir(run_dir: Path):
    """An exclusive lock on ``run_dir`` for this process (released when it exits, even by
    SIGKILL): two trainers writing one run's checkpoints would corrupt each other's."""
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


def _fix_none(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return {s: {k: v for k, v in vals.items() if v is not None} for s, vals in cfg_dict.items()}


def train(cfg: Config, run_dir: str | Path, *, resume: str | Path | None = None,
          cache_dir: str | None = None, show_progress: bool = True,
          epochs: int | None = None) -> RunResult:
    """Train ``cfg`` into ``run_dir`` (or continue the run of checkpoint ``resume``, whose
    saved config is used; ``epochs`` may then extend it). Returns the best test accuracy
    and the last epoch's metrics."""
    start_epoch, start_step, best_acc, best_epoch = 1, 0, -1.0, 0
    lock, notes = None, []
    try:
        main_rank = os.environ.get("RANK", "0") == "0"  # before init_distributed: torchrun's env
        if resume is not None:
            base = checkpoint_base(resume)
            run_dir = base.parent
            if main_rank and run_dir.is_dir():
                lock = _lock_run_dir(run_dir)
                for name in ("last", "best"):  # a save killed half-way is finished or discarded
                    done = recover_checkpoint(run_dir / name)
                    if done:
                        notes.append(done)
            fresh = run_dir / "config.toml"
            if (Path(resume).is_dir() and not base.with_name(base.name + ".json").exists()
                    and not (run_dir / f".{base.name}.commit").exists() and fresh.is_file()):
                # killed before its first checkpoint: start the run again from its resolved config
                cfg = load_config(fresh)
                notes.append(f"{run_dir} has no checkpoint yet: starting it from the beginning "
                             f"with its {fresh.name}")
                resume = None
            else:
                if Path(resume).is_dir() and not fresh.is_file() and not (
                        base.with_name(base.name + ".json").exists()
                        or (run_dir / f".{base.name}.commit").exists()):
                    raise CheckpointError(f"{run_dir} holds no checkpoint and no config.toml (the "
                                          "run stopped before training began): start it again "
                                          "with its original command")
                meta = read_metadata(base)
                cfg = config_from_dict(_fix_none(meta["config"]), f"{base}.json").validate()
                if meta.get("epoch_complete", True):
                    start_epoch = meta["epoch"] + 1
                else:  # a mid-epoch checkpoint (train.checkpoint_every, or SIGINT / SIGTERM)
                    start_epoch, start_step = meta["epoch"], meta["step"]
                best_acc, best_epoch = meta.get("best_acc", -1.0), meta.get("best_epoch", 0)
        if epochs is not None:
            cfg.train.epochs = epochs
        dctx = init_distributed(cfg.train.device)  # torchrun: DDP (see qcs.distributed)
        run_dir = Path(dctx.from_main(str(run_dir)))  # one directory, even if named by the time
        run_dir.mkdir(parents=True, exist_ok=True)
        if lock is None and dctx.is_main:
            lock = _lock_run_dir(run_dir)
        return _train_logged(cfg, run_dir, resume, start_epoch, start_step, best_acc,
                             best_epoch, cache_dir, show_progress, dctx, notes)
    finally:
        if lock is not None:
            lock.close()


def _train_logged(cfg: Config, run_dir: Path, resume, start_epoch: int, start_step: int,
                  best_acc: float, best_epoch: int, cache_dir, show_progress: bool,
                  dctx: DistContext, notes: list[str]) -> RunResult:
    level = log.level
    if dctx.is_main:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        handler.setLevel(logging.INFO)
        if level == logging.NOTSET:  # the run log is complete even if no one set up logging
            log.setLevel(logging.INFO)
        log.addHandler(handler)
    else:
        handler = None
        log.setLevel(logging.WARNING)
    try:
        for note in notes:
            log.info("%s", note)
        with _StopSignals() as stop:
            return _train(cfg, run_dir, resume, start_epoch, start_step, best_acc, best_epoch,
                          cache_dir, show_progress and dctx.is_main, dctx, stop)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(level)
        dctx.shutdown()


def _train(cfg: Config, run_dir: Path, resume, start_epoch: int, start_step: int,
           best_acc: float, best_epoch: int, cache_dir, show_progress: bool,
           dctx: DistContext | None = None, stop: _StopSignals | None = None) -> RunResult:
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    set_deterministic(tc.deterministic)
    seed_everything(tc.seed)
    dctx = dctx or DistContext()
    device = dctx.device if dctx.enabled else resolve_device(tc.device)
    with dctx.main_first():  # rank 0 generates / checks cached data before the others read it
        data = prepare_data(cfg, cache_dir, show_progress)
    if cfg.model.num_classes == 0:
        cfg.model.num_classes = len(data.classes)
    elif cfg.model.num_classes != len(data.classes):
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the dataset has "
                         f"{len(data.classes)} classes {data.classes}")
    if cfg.model.family == "pcd" and cfg.model.neutral_class < 0:  # NeAA: by class name
        names = [c.lower() for c in data.classes]
        cfg.model.neutral_class = names.index("neutral") if "neutral" in names else -1
    if dctx.is_main:
        write_text_atomic(run_dir / "config.toml", to_toml(cfg))
    balanced = cfg.data.balanced
    if balanced is None:
        balanced = cfg.data.format.startswith("affectnet")

    seed_everything(tc.seed)  # the model's initial weights depend on the seed only
    model = build_model(cfg.model)
    if resume is None and tc.pretrained:
        if hasattr(model, "load_pretrained"):  # DAN (ResNet) / PCD (IR50)
            log.info("%s", model.load_pretrained(tc.pretrained))
        else:
            log.info("%s", load_backbone_weights(model.ir_back, tc.pretrained))
    if resume is None and getattr(cfg.model, "landmark_weights", ""):
        log.info("%s", model.load_landmark_weights(cfg.model.landmark_weights))
    model.to(device)
    base_opt = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(base_opt, cfg.optim)
    sam = SAM(base_opt, cfg.optim.sam_rho, cfg.optim.sam_adaptive) if cfg.optim.sam else None
    scaler = torch.amp.GradScaler(device.type) if tc.amp == "fp16" else None
    progress = None  # mid-epoch state of the checkpoint resumed from
    resumed_meta = None
    if resume is not None:
        base = checkpoint_base(resume)
        meta = resumed_meta = read_metadata(base)
        save_id = meta.get("save_id")
        model.load_state_dict(load_weights(base, expect_epoch=meta["epoch"],
                                           expect_save_id=save_id))
        state = load_state(base, expect_save_id=save_id)
        base_opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        progress = state.get("progress")
        if start_step and progress is None:
            raise CheckpointError(f"{base}.state.pt has no mid-epoch progress but its JSON "
                                  f"says epoch {meta['epoch']} step {start_step}")
        log.info("resumed from %s (epoch %d%s) at epoch %d step %d", base, meta["epoch"],
                 "" if meta.get("epoch_complete", True) else f", step {meta['step']}",
                 start_epoch, start_step + 1)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters (%s), device %s, %s", model.variant, n_params / 1e6,
             "fused CSA" if _uses_fused(model, device) else "reference CSA", device,
             f"amp {tc.amp}" if tc.amp != "none" else "fp32")

    branches = model.branches  # items per sampled tuple: 4 QCS, 2 DCS, 1 baseline / DAN / PCD
    sampler = TupleSampler(data.train.labels, len(data.classes), branches, seed=tc.seed,
                           balanced=balanced)
    if dctx.enabled:
        log.info("DDP: %d processes (%s), %d tuples per process per step", dctx.world,
                 dist_backend(), tc.batch_size)
        sampler = ShardedTupleSampler(sampler, dctx.rank, dctx.world)
    sampler = _ResumableSampler(sampler)
    net = dctx.wrap(model)  # forward_branches (DDP-wrapped when distributed)
    loader_gen = torch.Generator()
    workers = cfg.data.num_workers
    train_loader = torch.utils.data.DataLoader(
        data.train, batch_size=tc.batch_size, sampler=sampler, num_workers=workers,
        drop_last=len(sampler) >= tc.batch_size, generator=loader_gen,
        pin_memory=device.type == "cuda", persistent_workers=False,
        worker_init_fn=_worker_ignores_sigint)
    test_loader = torch.utils.data.DataLoader(
        data.test, batch_size=max(tc.batch_size * branches, 32), shuffle=False,
        num_workers=workers, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_ignores_sigint,
        sampler=ShardedIndices(len(data.test), dctx.rank, dctx.world) if dctx.enabled else None)
    history = _read_history(run_dir / "metrics.jsonl", start_epoch - 1)
    if dctx.is_main:
        write_text_atomic(run_dir / "metrics.jsonl",
                          "".join(json.dumps(h) + "\n" for h in history))
        if resumed_meta is not None:
            _repair_best(run_dir, model, resumed_meta, history, list(data.classes))
    steps = len(train_loader)
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)

    def meta_at(epoch: int, step: int, complete: bool) -> dict[str, Any]:
        done = history[-1] if history else {}
        return {"config": cfg.to_dict(), "classes": list(data.classes), "epoch": epoch,
                "step": step, "epoch_complete": complete,
                "metrics": {k: v for k, v in done.items() if k != "test_confusion"},
                "best_acc": best_acc, "best_epoch": best_epoch, "data_root": data.root}

    def train_state(progress: dict[str, Any] | None = None) -> dict[str, Any]:
        state = {"optimizer": base_opt.state_dict(), "scheduler": scheduler.state_dict()}
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if progress is not None:
            state["progress"] = progress
        return state

    def save_mid_epoch(epoch: int, step: int, sums: dict[str, Any], train_time: float) -> None:
        """``last.*`` in the middle of epoch ``epoch`` after ``step`` steps: weights,
        optimizer, the epoch's running sums and every rank's RNG states."""
        rng = [_rng_state(device)]
        if dctx.enabled:  # every rank's own augmentation / dropout stream
            import torch.distributed as dist
            rng = [None] * dctx.world
            dist.all_gather_object(rng, _rng_state(device))
        if dctx.is_main:
            save_checkpoint(run_dir / "last", model, meta_at(epoch, step, False),
                            train_state({"sums": dict(sums), "train_time_s": train_time,
                                         "rng": rng}))

    def stop_requested() -> int | None:
        """The signal to stop for (agreed by all ranks: they must stop at the same step)."""
        local = stop.signum if stop is not None else None
        if not dctx.enabled:
            return local
        flag = dctx.all_reduce_sum(torch.tensor([float(local or 0)], device=device))
        return (local or signal.SIGTERM) if float(flag) > 0 else None

    def interrupted(signum: int, epoch: int, step: int, saved: bool) -> TrainingInterrupted:
        name = signal.Signals(signum).name
        where = (f"epoch {epoch} step {step}" if step < steps else f"the end of epoch {epoch}")
        if saved:
            what = f"checkpoint saved at {where} in {run_dir / 'last'}"
        elif (run_dir / "last.json").exists():
            what = f"nothing new since the checkpoint in {run_dir / 'last'}"
        else:
            what = "no checkpoint yet"
        msg = f"stopped by {name}: {what}; continue with: qcs train --resume {run_dir}"
        if dctx.is_main:  # the other ranks stopped at the same step; one report suffices
            log.warning("%s", msg)
        return TrainingInterrupted(signum, msg)

    def loss_of(xs, ys):
        with _autocast(device, tc.amp):
            out = net(xs)
        if hasattr(model, "training_loss"):  # DAN / PCD: their own auxiliary losses
            return model.training_loss(out, ys, cfg.loss)
        base_logits, cross_logits = out
        return qcs_loss(base_logits.float(),
                        None if cross_logits is None else cross_logits.float(), ys, cfg.loss)

    def backward(loss):
        (scaler.scale(loss) if scaler is not None else loss).backward()

    epoch = start_epoch - 1
    last: dict[str, Any] = history[-1] if history else {}
    signum = stop_requested()
    if signum is not None:  # signalled while loading: the checkpoint on disk is current
        raise interrupted(signum, start_epoch, start_step, saved=False)
    try:
        for epoch in range(start_epoch, tc.epochs + 1):
            es = _epoch_seed(tc.seed, epoch)
            seed_everything(es + dctx.rank)  # augmentation and dropout (own per rank)
            loader_gen.manual_seed(es)  # worker seeds of this epoch
            sampler.set_epoch(epoch)
            model.train()
            sums = {"loss": 0.0, "base": 0.0, "cross": 0.0, "correct": 0, "seen": 0}
            skip, time_before = 0, 0.0
            if epoch == start_epoch and start_step:  # continue a mid-epoch checkpoint
                skip = min(start_step, steps)
                sums.update(progress["sums"])
                time_before = float(progress.get("train_time_s", 0.0))
                rng = progress["rng"]
                if len(rng) == dctx.world:
                    _set_rng_state(rng[dctx.rank], device)
                else:  # other process count: the rest of the epoch draws a new random stream
                    log.warning("the checkpoint holds RNG states of %d processes, this run has "
                                "%d: the rest of epoch %d is not bit-identical to an "
                                "uninterrupted run", len(rng), dctx.world, epoch)
                    seed_everything(es + dctx.rank + 7919 * skip)
            sampler.skip = skip * tc.batch_size
            lr = base_opt.param_groups[0]["lr"]
            bar = Progress(steps, f"epoch {epoch}/{tc.epochs}", unit="img",
                           enabled=show_progress)
            t0 = time.perf_counter() - time_before
            done_steps = skip

            def optimizer_step() -> None:
                """The base optimizer's step (through the AMP scaler when there is one)."""
                if scaler is not None:
                    scaler.step(base_opt)
                    scaler.update()
                else:
                    base_opt.step()
                base_opt.zero_grad(set_to_none=True)

            for step, (x, y) in enumerate(train_loader if skip < steps else (), skip + 1):
                if step > steps:
                    break
                # [B, R, ...] from the loader -> branch-major [R, B, ...]
                xs = x.transpose(0, 1).to(device, non_blocking=True)
                ys = y.transpose(0, 1).to(device)
                loss, parts = loss_of(xs, ys)
                backward(loss)
                if sam is None:
                    optimizer_step()
                else:
                    skip = False
                    if scaler is not None:
                        scaler.unscale_(base_opt)
                        skip = not math.isfinite(float(sam.grad_norm()))
                        scaler.update()  # lowers the scale after an overflow
                    if skip:
                        base_opt.zero_grad(set_to_none=True)
                    else:
                        sam.first_step()
                        with _frozen_bn_stats(model):
                            loss2, _ = loss_of(xs, ys)
                            backward(loss2)
                        sam.restore()
                        optimizer_step()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"training loss is {loss_value} at epoch {epoch} "
                                             f"step {step}; lower optim.lr or use fp32")
                sums["loss"] += loss_value
                sums["base"] += parts["base"]
                sums["cross"] += parts.get("cross", 0.0)
                done_steps = step
                bar.update(step, items=xs.shape[0] * xs.shape[1], loss=sums["loss"] / step)
                signum = stop_requested()
                if signum is not None:
                    bar.close()
                    save_mid_epoch(epoch, step, sums, time.perf_counter() - t0)
                    raise interrupted(signum, epoch, step, saved=True)
                if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < steps:
                    save_mid_epoch(epoch, step, sums, time.perf_counter() - t0)
            bar.close()
            train_time = time.perf_counter() - t0
            scheduler.step()
            dctx.sync_buffers(model)  # rank 0's BN statistics everywhere
            ev = evaluate(model, test_loader, device, len(data.classes), tc.amp, show_progress,
                          desc=f"test {epoch}/{tc.epochs}",
                          reduce=dctx.all_reduce_sum if dctx.enabled else None)
            sums.update(dctx.mean_of({k: sums[k] for k in ("loss", "base", "cross")}))
            n = max(done_steps, 1)
            last = {"epoch": epoch, "lr": lr, "train_loss": sums["loss"] / n,
                    "train_loss_base": sums["base"] / n,
                    "train_loss_cross": sums["cross"] / n if branches > 1 else None,
                    "train_time_s": round(train_time, 2),
                    "train_images_per_s": round(n * tc.batch_size * branches / train_time, 1),
                    "test_loss": ev["loss"], "test_acc": ev["acc"],
                    "test_mean_recall": ev["mean_recall"], "test_recall": ev["recall"],
                    "test_f1": ev["f1"], "test_confusion": ev["confusion"]}
            history.append(last)
            improved = ev["acc"] > best_acc
            if improved:
                best_acc, best_epoch = ev["acc"], epoch
            if dctx.is_main:  # rank 0 alone writes metrics, checkpoints and plots
                # metrics first: a resume drops rows newer than its checkpoint
                write_text_atomic(run_dir / "metrics.jsonl",
                                  "".join(json.dumps(h) + "\n" for h in history))
                meta = meta_at(epoch, done_steps, True)
                save_checkpoint(run_dir / "last", model, meta, train_state())
                if improved:  # after last: a resume repairs a best.* that missed this save
                    save_checkpoint(run_dir / "best", model, meta)
                    _plot_best_confusion(run_dir, ev["confusion"], list(data.classes), epoch,
                                         ev["acc"])
                _atomic_output(run_dir / "loss_curves.png",
                               lambda p: plots.plot_losses(history, p))
                _atomic_output(run_dir / "accuracy.png", lambda p: plots.plot_accuracy(history, p))
                log.info("epoch %d/%d: train loss %.4f (base %.4f%s), test loss %.4f, test "
                         "acc %.2f%% (best %.2f%% @%d), %.1f img/s", epoch, tc.epochs,
                         last["train_loss"], last["train_loss_base"],
                         f", cross {last['train_loss_cross']:.4f}" if branches > 1 else "",
                         ev["loss"], 100 * ev["acc"], 100 * best_acc, best_epoch,
                         last["train_images_per_s"])
            signum = stop_requested()
            if signum is not None:
                raise interrupted(signum, epoch, steps, saved=True)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: no save; the last checkpoint stands
        log.warning("interrupted in epoch %d; the last checkpoint is %s; continue with: qcs "
                    "train --resume %s", epoch, run_dir / "last", run_dir)
        raise
    return RunResult(run_dir, best_acc, best_epoch, last)


def _plot_best_confusion(run_dir: Path, confusion, classes: list[str], epoch: int,
                         acc: float) -> None:
    _atomic_output(run_dir / "confusion_best.png", lambda p: plots.plot_confusion(
        confusion, classes, p, f"best epoch {epoch}: accuracy {100 * acc:.2f}%"))


def _repair_best(run_dir: Path, model: nn.Module, meta: dict[str, Any],
                 history: list[dict[str, Any]], classes: list[str]) -> None:
    """``best.*`` is saved right after ``last.*``; a kill in between leaves ``best`` one
    improvement behind. When the checkpoint resumed from is itself the best epoch, write
    ``best.*`` from it (the weights just loaded)."""
    epoch = meta.get("best_epoch", 0)
    if not (epoch and meta.get("epoch_complete", True) and meta["epoch"] == epoch):
        return
    try:
        if read_metadata(run_dir / "best").get("epoch") == epoch:
            return
    except CheckpointError:
        pass  # missing (the first improvement was the save that got interrupted)
    save_checkpoint(run_dir / "best", model, {k: v for k, v in meta.items()
                                               if k not in ("format", "save_id")})
    log.info("best.* brought up to epoch %d (its save had been interrupted)", epoch)
    row = next((h for h in history if h["epoch"] == epoch), None)
    if row is not None:
        _plot_best_confusion(run_dir, row["test_confusion"], classes, epoch, row["test_acc"])


def dist_backend() -> str:
    import torch.distributed as dist
    return dist.get_backend() if dist.is_initialized() else "none"


def _uses_fused(model: QCSNet, device: torch.device) -> bool:
    if model.cross is None:
        return False
    try:
        return bool(model.cross[0]._use_fused(torch.empty(0, device=device)))
    except RuntimeError:
        return False
