"""The training loop: data, model, SAM, per-epoch evaluation, checkpoints, logs, plots.

A run directory holds ``config.toml`` (the resolved config, reusable with ``--config``),
``metrics.jsonl`` (one JSON object per epoch), ``train.log``, ``last.*`` and ``best.*``
checkpoints (see :mod:`qcs.checkpoint`) and PNG plots.

Reproducibility: everything random in epoch ``e`` (sampling, augmentation, dropout,
worker seeds) is seeded from ``(seed, e)`` at the start of the epoch, so ``--resume``
continues exactly as an uninterrupted run would, and ``deterministic=True`` (which also
asks torch for deterministic kernels) makes two runs give identical weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import plots
from .checkpoint import (checkpoint_base, load_state, load_weights, read_metadata,
                         save_checkpoint)
from .config import Config, config_from_dict, to_toml
from .distributed import DistContext, ShardedIndices, ShardedTupleSampler, init_distributed
from .data import (DataError, ImageDataset, SynthParams, TupleSampler, ensure_synth,
                   load_split, screen_data, test_transform, train_transform)
from .models import BRANCHES, QCSNet, build_model, load_backbone_weights, qcs_loss
from .optim import SAM, build_optimizer, build_scheduler
from .progress import Progress

__all__ = ["train", "evaluate", "resolve_device", "prepare_data", "seed_everything", "RunResult"]

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
    train_list, test_list = screen_data(train_list, test_list, decode=d.check or d.skip_bad,
                                        skip_bad=d.skip_bad, show_progress=show_progress)
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
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fix_none(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    return {s: {k: v for k, v in vals.items() if v is not None} for s, vals in cfg_dict.items()}


def train(cfg: Config, run_dir: str | Path, *, resume: str | Path | None = None,
          cache_dir: str | None = None, show_progress: bool = True,
          epochs: int | None = None) -> RunResult:
    """Train ``cfg`` into ``run_dir`` (or continue the run of checkpoint ``resume``, whose
    saved config is used; ``epochs`` may then extend it). Returns the best test accuracy
    and the last epoch's metrics."""
    start_epoch, best_acc, best_epoch = 1, -1.0, 0
    if resume is not None:
        base = checkpoint_base(resume)
        meta = read_metadata(base)
        cfg = config_from_dict(_fix_none(meta["config"]), f"{base}.json").validate()
        run_dir = base.parent
        start_epoch = meta["epoch"] + 1
        best_acc, best_epoch = meta.get("best_acc", -1.0), meta.get("best_epoch", 0)
    if epochs is not None:
        cfg.train.epochs = epochs
    dctx = init_distributed(cfg.train.device)  # torchrun: DDP (see qcs.distributed)
    run_dir = Path(dctx.from_main(str(run_dir)))  # one directory, even if named by the time
    run_dir.mkdir(parents=True, exist_ok=True)
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
        return _train(cfg, run_dir, resume, start_epoch, best_acc, best_epoch, cache_dir,
                      show_progress and dctx.is_main, dctx)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
        log.setLevel(level)
        dctx.shutdown()


def _train(cfg: Config, run_dir: Path, resume, start_epoch: int, best_acc: float,
           best_epoch: int, cache_dir, show_progress: bool,
           dctx: DistContext | None = None) -> RunResult:
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
        _write_text_atomic(run_dir / "config.toml", to_toml(cfg))
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
    if resume is not None:
        base = checkpoint_base(resume)
        meta = read_metadata(base)
        model.load_state_dict(load_weights(base, expect_epoch=meta["epoch"]))
        state = load_state(base)
        base_opt.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        log.info("resumed from %s (epoch %d) at epoch %d", base, meta["epoch"], start_epoch)
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
    net = dctx.wrap(model)  # forward_branches (DDP-wrapped when distributed)
    loader_gen = torch.Generator()
    workers = cfg.data.num_workers
    train_loader = torch.utils.data.DataLoader(
        data.train, batch_size=tc.batch_size, sampler=sampler, num_workers=workers,
        drop_last=len(sampler) >= tc.batch_size, generator=loader_gen,
        pin_memory=device.type == "cuda", persistent_workers=False)
    test_loader = torch.utils.data.DataLoader(
        data.test, batch_size=max(tc.batch_size * branches, 32), shuffle=False,
        num_workers=workers, pin_memory=device.type == "cuda",
        sampler=ShardedIndices(len(data.test), dctx.rank, dctx.world) if dctx.enabled else None)
    history = _read_history(run_dir / "metrics.jsonl", start_epoch - 1)
    if dctx.is_main:
        _write_text_atomic(run_dir / "metrics.jsonl",
                           "".join(json.dumps(h) + "\n" for h in history))
    steps = len(train_loader)
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)

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
    try:
        for epoch in range(start_epoch, tc.epochs + 1):
            es = _epoch_seed(tc.seed, epoch)
            seed_everything(es + dctx.rank)  # augmentation and dropout (own per rank)
            loader_gen.manual_seed(es)  # worker seeds of this epoch
            sampler.set_epoch(epoch)
            model.train()
            sums = {"loss": 0.0, "base": 0.0, "cross": 0.0, "correct": 0, "seen": 0}
            lr = base_opt.param_groups[0]["lr"]
            bar = Progress(steps, f"epoch {epoch}/{tc.epochs}", unit="img",
                           enabled=show_progress)
            t0 = time.perf_counter()

            def optimizer_step() -> None:
                """The base optimizer's step (through the AMP scaler when there is one)."""
                if scaler is not None:
                    scaler.step(base_opt)
                    scaler.update()
                else:
                    base_opt.step()
                base_opt.zero_grad(set_to_none=True)

            for step, (x, y) in enumerate(train_loader, 1):
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
                bar.update(step, items=xs.shape[0] * xs.shape[1], loss=sums["loss"] / step)
            bar.close()
            train_time = time.perf_counter() - t0
            scheduler.step()
            dctx.sync_buffers(model)  # rank 0's BN statistics everywhere
            ev = evaluate(model, test_loader, device, len(data.classes), tc.amp, show_progress,
                          desc=f"test {epoch}/{tc.epochs}",
                          reduce=dctx.all_reduce_sum if dctx.enabled else None)
            sums.update(dctx.mean_of({k: sums[k] for k in ("loss", "base", "cross")}))
            n = max(min(step, steps), 1)
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
            if not dctx.is_main:
                continue  # rank 0 alone writes metrics, checkpoints and plots
            with open(run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(last) + "\n")
            meta = {"config": cfg.to_dict(), "classes": list(data.classes), "epoch": epoch,
                    "metrics": {k: v for k, v in last.items() if k != "test_confusion"},
                    "best_acc": best_acc, "best_epoch": best_epoch,
                    "data_root": data.root}
            state = {"optimizer": base_opt.state_dict(), "scheduler": scheduler.state_dict()}
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            save_checkpoint(run_dir / "last", model, meta, state)
            if improved:
                save_checkpoint(run_dir / "best", model, meta)
                plots.plot_confusion(ev["confusion"], list(data.classes),
                                     run_dir / "confusion_best.png",
                                     f"best epoch {epoch}: accuracy {100 * ev['acc']:.2f}%")
            plots.plot_losses(history, run_dir / "loss_curves.png")
            plots.plot_accuracy(history, run_dir / "accuracy.png")
            log.info("epoch %d/%d: train loss %.4f (base %.4f%s), test loss %.4f, test acc "
                     "%.2f%% (best %.2f%% @%d), %.1f img/s", epoch, tc.epochs, last["train_loss"],
                     last["train_loss_base"],
                     f", cross {last['train_loss_cross']:.4f}" if branches > 1 else "",
                     ev["loss"], 100 * ev["acc"], 100 * best_acc, best_epoch,
                     last["train_images_per_s"])
    except KeyboardInterrupt:
        log.warning("interrupted in epoch %d; the last complete epoch is saved in %s; continue "
                    "with: qcs train --resume %s", epoch, run_dir / "last", run_dir)
        raise
    return RunResult(run_dir, best_acc, best_epoch, last)


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
