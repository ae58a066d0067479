"""The data of a run: the train / test datasets a config names, and the loaders that feed
them to the loop (tuple sampling, DDP shards, mid-epoch resume)."""

from __future__ import annotations

import itertools
import logging
import signal
from dataclasses import dataclass

import torch

from ..config import Config
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
from ..distributed import DistContext, ShardedIndices, ShardedTupleSampler
from ..families import DataNeeds
from ..logs import Ticker

__all__ = ["Data", "Loaders", "ResumableSampler", "build_loaders", "prepare_data"]

log = logging.getLogger("qcs")


@dataclass
class Data:
    """The datasets of a run, their class names in label order and the dataset root."""

    train: ImageDataset
    test: ImageDataset
    classes: tuple[str, ...]
    root: str


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


def _lists(cfg: Config, root: str, needs: DataNeeds,
           show_progress: bool) -> tuple[ImageList, ImageList]:
    d = cfg.data
    train_list = load_split(d.format, root, "train", d.train_list, d.skip_bad)
    test_list = load_split(d.format, root, "test", d.test_list, d.skip_bad)
    if train_list.classes != test_list.classes:
        raise DataError(f"train and test class lists differ: {train_list.classes} vs "
                        f"{test_list.classes}")
    # --check-data / --skip-bad decode every image up front (so no sampler draws a bad one)
    train_list, test_list = screen_data(train_list, test_list, decode=d.check or d.skip_bad,
                                        skip_bad=d.skip_bad, show_progress=show_progress,
                                        min_per_class=needs.min_per_class)
    for lst in (train_list, test_list):
        log.info("%s: %d images, per class %s%s", lst.source, len(lst), lst.counts(),
                 "".join(f"; {n}" for n in lst.notes))
    return train_list, test_list


def _dataset(lst: ImageList, cfg: Config, train: bool, needs: DataNeeds,
             show_progress: bool) -> ImageDataset:
    """One split as a dataset with the paper's transforms (and heat maps when needed)."""
    d, size = cfg.data, cfg.data.image_size
    ticker = Ticker(f"decoding {lst.source}", enabled=show_progress and d.cache_in_memory)
    transform = train_transform(size) if train else test_transform(size)
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
    train_list, test_list = _lists(cfg, root, needs, show_progress)
    if needs.heatmap_channels:
        from ..data.landmarks import ensure_heatmaps
        for lst in (train_list, test_list):
            ensure_heatmaps(lst, root)
    return Data(_dataset(train_list, cfg, True, needs, show_progress),
                _dataset(test_list, cfg, False, needs, show_progress),
                train_list.classes, root)


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
    single images; ``steps`` is the number of training steps per epoch."""

    train: torch.utils.data.DataLoader
    test: torch.utils.data.DataLoader
    sampler: ResumableSampler
    generator: torch.Generator
    steps: int


def build_loaders(cfg: Config, data: Data, dctx: DistContext, device: torch.device) -> Loaders:
    """Tuple sampling (class-balanced anchors on AffectNet unless ``data.balanced`` says
    otherwise), sharded across DDP ranks, and the test loader (each rank its shard)."""
    tc, workers = cfg.train, cfg.data.num_workers
    branches = cfg.family.data_needs(cfg.net).branches
    balanced = cfg.data.balanced
    if balanced is None:
        balanced = cfg.data.format.startswith("affectnet")
    sampler = TupleSampler(data.train.labels, len(data.classes), branches, seed=tc.seed,
                           balanced=balanced)
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
    test = torch.utils.data.DataLoader(
        data.test, batch_size=max(tc.batch_size * branches, 32), shuffle=False,
        num_workers=workers, pin_memory=pin, worker_init_fn=worker_ignores_sigint,
        sampler=ShardedIndices(len(data.test), dctx.rank, dctx.world) if dctx.enabled else None)
    steps = len(train)
    if tc.max_steps_per_epoch:
        steps = min(steps, tc.max_steps_per_epoch)
    return Loaders(train, test, sampler, generator, steps)
