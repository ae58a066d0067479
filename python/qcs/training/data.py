"""The data of a run: the train / test datasets a config names, and the loaders that feed
them to the loop (tuple sampling, DDP shards, mid-epoch resume)."""

from __future__ import annotations

import itertools
import logging
import signal
from dataclasses import dataclass

import torch

from ..config import Config, parse_val_split
from ..data import (
    DataError,
    ImageDataset,
    ImageList,
    SynthParams,
    TupleSampler,
    ensure_synth,
    load_split,
    screen_data,
    test_transform,
    train_transform,
)
from ..data.datasets import screen_images
from ..data.splits import stratified_holdout
from ..distributed import DistContext, ShardedIndices, ShardedTupleSampler
from ..families import DataNeeds
from ..logs import Ticker

__all__ = ["Data", "Loaders", "ResumableSampler", "build_loaders", "prepare_data"]

log = logging.getLogger("qcs")


@dataclass
class Data:
    """The datasets of a run, their class names in label order and the dataset root;
    ``val`` is the validation split (``None`` without ``data.val_split``)."""

    train: ImageDataset
    test: ImageDataset
    classes: tuple[str, ...]
    root: str
    val: ImageDataset | None = None


def _synth_root(cfg: Config, cache_dir: str | None, show_progress: bool) -> str:
    """The built-in data of ``cfg.data`` (generated once into the cache)."""
    d = cfg.data
    params = SynthParams(seed=d.synth_seed, train_per_class=d.synth_train_per_class,
                         test_per_class=d.synth_test_per_class, size=d.synth_size,
                         bias=d.synth_bias, bias_strength=d.synth_bias_strength)
    ticker = Ticker("built-in data", enabled=show_progress)
    root = str(ensure_synth(params, cache_dir, progress=ticker))
    ticker.close()
    log.info("built-in data (%s): %s", params.tag(), root)
    return root


def _validation(cfg: Config, root: str, train_list: ImageList
                ) -> tuple[ImageList, ImageList | None]:
    """``data.val_split``: the official validation split (FERPlus) or a seeded stratified
    hold-out of the training list; returns ``(train, val or None)``."""
    d = cfg.data
    split = parse_val_split(d.val_split)
    if split == "none":
        return train_list, None
    if split == "official":
        if d.format != "ferplus":
            raise DataError(f"data.val_split=official: only FERPlus has an official validation "
                            f"split (data.format is {d.format!r}); give a fraction such as 0.1")
        return train_list, load_split(d.format, root, "valid", "", d.skip_bad)
    keep, held = stratified_holdout(train_list.labels, split, d.val_seed)
    val = train_list.subset(held)
    val.source = f"{train_list.source} held out ({split:g} per class, seed {d.val_seed})"
    return train_list.subset(keep), val


def _lists(cfg: Config, root: str, needs: DataNeeds,
           show_progress: bool) -> tuple[ImageList, ImageList, ImageList | None]:
    d = cfg.data
    train_list = load_split(d.format, root, "train", d.train_list, d.skip_bad)
    test_list = load_split(d.format, root, "test", d.test_list, d.skip_bad)
    if train_list.classes != test_list.classes:
        raise DataError(f"train and test class lists differ: {train_list.classes} vs "
                        f"{test_list.classes}")
    train_list, val_list = _validation(cfg, root, train_list)
    # --check-data / --skip-bad decode every image up front (so no sampler draws a bad one)
    train_list, test_list = screen_data(train_list, test_list, decode=d.check or d.skip_bad,
                                        skip_bad=d.skip_bad, show_progress=show_progress,
                                        min_per_class=needs.min_per_class)
    if val_list is not None and (d.check or d.skip_bad):
        val_list, bad = screen_images(val_list, d.skip_bad)
        if bad and not d.skip_bad:
            raise DataError(f"{len(bad)} unreadable validation images (--skip-bad leaves them "
                            "out):\n  " + "\n  ".join(bad))
    for lst in (train_list, val_list, test_list):
        if lst is not None:
            log.info("%s: %d images, per class %s%s", lst.source, len(lst), lst.counts(),
                     "".join(f"; {n}" for n in lst.notes))
    return train_list, test_list, val_list


def recipe_transforms(cfg: Config):
    """``(train transform, test transform)`` of ``cfg.data`` (the recipe's resize / crop,
    rotation, colour jitter and erasing range)."""
    d = cfg.data
    train = train_transform(d.image_size, resize=d.resize, rotation=d.rotation,
                            color_jitter=d.color_jitter, erasing=tuple(d.erasing))
    return train, test_transform(d.image_size, resize=d.resize)


def _dataset(lst: ImageList, cfg: Config, train: bool, needs: DataNeeds,
             show_progress: bool) -> ImageDataset:
    """One split as a dataset with the paper's transforms (and heat maps when needed)."""
    d, size = cfg.data, cfg.data.image_size
    ticker = Ticker(f"decoding {lst.source}", enabled=show_progress and d.cache_in_memory)
    transform = recipe_transforms(cfg)[0 if train else 1]
    if needs.heatmap_channels:  # PCD's landmark source: maps stored beside the images
        from ..data.landmarks import HeatmapDataset, HeatmapTransform
        ds = HeatmapDataset(lst, size, HeatmapTransform(train), cache=d.cache_in_memory,
                            channels=needs.heatmap_channels, progress=ticker)
    else:
        ds = ImageDataset(lst, size, transform, cache=d.cache_in_memory, progress=ticker)
    ticker.close()
    return ds


def prepare_data(cfg: Config, cache_dir: str | None = None, show_progress: bool = True) -> Data:
    """Read the train / test lists of ``cfg.data`` (generating the built-in data if the
    format is ``synth`` and no root is given), optionally check every image, and wrap them
    in datasets with the paper's transforms at ``cfg.data.image_size``; what the family
    needs (tuples of a class, heat maps) comes from ``cfg.family.data_needs``."""
    root = cfg.data.root
    if cfg.data.format == "synth" and not root:
        root = _synth_root(cfg, cache_dir, show_progress)
    if not root:
        raise DataError(f"data.format={cfg.data.format!r} needs a dataset root: pass "
                        "--data-root DIR")
    needs = cfg.family.data_needs(cfg.net)
    train_list, test_list, val_list = _lists(cfg, root, needs, show_progress)
    if needs.heatmap_channels:
        from ..data.landmarks import ensure_heatmaps
        for lst in (train_list, test_list, val_list):
            if lst is not None:
                ensure_heatmaps(lst, root)
    val = None if val_list is None else _dataset(val_list, cfg, False, needs, show_progress)
    return Data(_dataset(train_list, cfg, True, needs, show_progress),
                _dataset(test_list, cfg, False, needs, show_progress),
                train_list.classes, root, val)


class ResumableSampler(torch.utils.data.Sampler):
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


def worker_ignores_sigint(worker_id: int) -> None:
    """DataLoader workers ignore Ctrl-C (the terminal sends it to the whole process group):
    the main process stops them after saving; a worker that died of it would fail the
    batch being fetched instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class Loaders:
    """The loaders of a run: ``train`` yields ``[B, R, ...]`` tuples drawn by ``sampler``
    (seed it with ``sampler.set_epoch`` and the workers with ``generator``), ``test``
    single images (``val`` too, when there is a validation split); ``steps`` is the number
    of training steps per epoch."""

    train: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    sampler: ResumableSampler
    generator: torch.Generator
    steps: int
    val: torch.utils.data.DataLoader | None = None


def _eval_loader(dataset, batch_size: int, workers: int, pin: bool,
                 dctx: DistContext) -> torch.utils.data.DataLoader:
    """Single images in order (each DDP rank its shard)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin,
        worker_init_fn=worker_ignores_sigint,
        sampler=ShardedIndices(len(dataset), dctx.rank, dctx.world) if dctx.enabled else None)


def build_loaders(cfg: Config, data: Data, dctx: DistContext, device: torch.device) -> Loaders:
    """Tuple sampling (class-balanced anchors on AffectNet unless ``data.balanced`` says
    otherwise), sharded across DDP ranks, and the test loader (each rank its shard)."""
    tc, workers = cfg.train, cfg.data.num_workers
    branches = cfg.family.data_needs(cfg.net).branches
    balanced = cfg.data.balanced
    if balanced is None:
        balanced = cfg.data.format.startswith("affectnet")
    items = len(data.train.labels) // cfg.data.epoch_divisor  # AffectNet scripts: N/12, N/8
    if items < 1:
        raise DataError(f"data.epoch_divisor={cfg.data.epoch_divisor} leaves no item of the "
                        f"{len(data.train.labels)} training images per epoch")
    sampler = TupleSampler(data.train.labels, len(data.classes), branches, seed=tc.seed,
                           balanced=balanced, num_items=items)
    if dctx.enabled:
        log.info("DDP: %d processes (%s), %d tuples per process per step", dctx.world,
                 dctx.backend(), tc.batch_size)
        sampler = ShardedTupleSampler(sampler, dctx.rank, dctx.world)
    sampler = ResumableSampler(sampler)
    generator = torch.Generator()
    pin = device.type == "cuda"
    train = torch.utils.data.DataLoader(
        data.train, batch_size=tc.batch_size, sampler=sampler, num_workers=workers,
        drop_last=len(sampler) >= tc.batch_size, generator=generator, pin_memory=pin,
        persistent_workers=False, worker_init_fn=worker_ignores_sigint)
    eval_batch = max(tc.batch_size * branches, 32)
    test = _eval_loader(data.test, eval_batch, workers, pin, dctx)
    val = None if data.val is None else _eval_loader(data.val, eval_batch, workers, pin, dctx)
    steps = len(train)
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)
    return Loaders(train, test, sampler, generator, steps, val)
