"""Data-parallel training (DDP): ``torchrun --nproc-per-node K -m qcs train ...``.

:func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); without it (a plain ``qcs train``)
everything here is a no-op and training is single-process as before.

What changes under DDP, and why:

- **Sampling.** Every rank draws the *same* epoch of tuples from a
  :class:`qcs.data.TupleSampler` seeded by ``(seed, epoch)`` and keeps every K-th one
  (:class:`ShardedTupleSampler`), so each anchor is used at most once per epoch across all
  ranks; the ``N mod K`` tuples left over at the end of an epoch's permutation are
  dropped (the permutation changes each epoch, so different ones each time). Positives and
  negatives are still drawn from the whole training set.
- **Batch size.** ``train.batch_size`` is per process: a step sees ``K x batch_size``
  tuples. The learning rate is not rescaled.
- **Gradients.** The training forward (the network's ``forward_branches`` and the family's
  loss, :class:`qcs.training.step.TrainForward`) is wrapped in ``DistributedDataParallel``;
  both SAM passes go through the wrapper, so the SAM perturbation is computed from
  all-reduced gradients and is identical on every rank.
- **BatchNorm.** Running statistics are per rank during an epoch (DDP broadcasts rank 0's
  buffers at each forward) and rank 0's are copied to all ranks before evaluation, so the
  evaluated and saved network is the same everywhere. No SyncBatchNorm: batch statistics
  are per process.
- **CSA extremes.** With ``model.csa_scope = "batch"`` the min / max that normalise the
  cross-similarity maps are taken over the *process's* batch, not the global one, so a run
  on K processes with batch b is not the same computation as one process with batch K*b.
  ``csa_scope = "sample"`` normalises each quadruplet on its own and is independent of
  the batch (and of the number of processes).
- **Metrics.** Training losses are averaged over ranks; each rank evaluates its shard of
  the test set (each image exactly once) and the confusion matrix, loss sum and count are
  summed across ranks before accuracy / recall / F1 are computed.
- **Files.** Only rank 0 writes the run directory (config, metrics, logs, checkpoints,
  plots); other ranks log warnings only. ``--resume`` works the same: every rank reads the
  checkpoint.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .data.sampling import TupleSampler
from .errors import DeviceError

__all__ = ["DistContext", "ShardedIndices", "ShardedTupleSampler", "init_distributed"]


@dataclass
class DistContext:
    """This process's place in the job (``world == 1``: not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    owns_group: bool = field(default=False, repr=False)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. generating cached data), then the others."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def from_main(self, value):
        """Rank 0's ``value`` (any picklable object) on every rank, e.g. a run directory
        named after the start time, which ranks started a second apart would differ on."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over ranks (a new tensor; ``t`` itself when not distributed)."""
        if not self.enabled:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean_of(self, values: dict[str, float]) -> dict[str, float]:
        """Average a dict of floats over ranks."""
        if not self.enabled:
            return values
        keys = sorted(values)
        t = self.all_reduce_sum(torch.tensor([float(values[k]) for k in keys],
                                             dtype=torch.float64))
        return {k: float(v) / self.world for k, v in zip(keys, t)}

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.enabled:
            for b in model.buffers():
                dist.broadcast(b.data, src=0)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` DDP-wrapped when distributed (itself otherwise)."""
        if not self.enabled:
            return module
        ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    @staticmethod
    def backend() -> str:
        """The process group's backend (``gloo``, ``nccl``), or ``none``."""
        return dist.get_backend() if dist.is_initialized() else "none"

    def shutdown(self) -> None:
        """Leave the process group this context created (after a barrier)."""
        if self.owns_group and dist.is_initialized():
            dist.barrier()  # nobody leaves while rank 0 still writes its last files
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun job described by the environment (gloo on CPU, NCCL on CUDA);
    a :class:`DistContext` with ``world == 1`` when not launched by torchrun.

    ``device``: ``auto`` / ``cuda`` give each process ``cuda:LOCAL_RANK`` when CUDA is
    available, ``cpu`` keeps every process on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except KeyError:
        raise RuntimeError("WORLD_SIZE is set but RANK is not: launch with torchrun "
                           "--nproc-per-node K -m qcs train ...") from None
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: CUDA is not available on this machine")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
        owns = True
    return DistContext(rank, world, local, dev, owns)


class ShardedTupleSampler(torch.utils.data.Sampler):
    """Rank ``rank``'s share of ``base``'s tuples: rows ``rank, rank + K, ...`` of the
    epoch's ``[N, R]`` tuples, ``N // K`` of them (see the module docstring)."""

    def __init__(self, base: TupleSampler, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.base, self.rank, self.world = base, rank, world

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def items(self) -> torch.Tensor:
        """``[N // K, R]`` index tuples of this rank for the current epoch."""
        rows = self.base.items()
        return rows[self.rank: len(self) * self.world: self.world]

    def __iter__(self):
        for row in self.items().tolist():
            yield tuple(row)

    def __len__(self) -> int:
        return len(self.base) // self.world


class ShardedIndices(torch.utils.data.Sampler):
    """Indices ``rank, rank + K, ...`` of ``range(n)``: each index on exactly one rank
    (shards differ in length by at most one; evaluation has no collectives per batch)."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))
