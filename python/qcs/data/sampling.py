"""Seeded quadruplet / pair / single sampling, O(1) per item.

Indices are grouped by class once (a class-sorted order plus each class's start and
size), so every draw is a constant number of random integers and table look-ups:

- anchor ``a``: each index once per epoch (a seeded permutation), or with ``balanced``
  a uniformly chosen class, then a uniform member of it;
- positive ``p``: another member of ``a``'s class (never ``a`` itself);
- negative ``n``: a uniform image outside ``a``'s class (so negative classes are drawn
  in proportion to their size); with ``balanced`` a uniform other class;
- second negative ``n2``: another member of ``n``'s class (never ``n`` itself).
"""

from __future__ import annotations

import torch

__all__ = ["ClassIndex", "TupleSampler"]


class ClassIndex:
    """Class-sorted view of ``labels [N]`` for O(1) draws."""

    def __init__(self, labels: torch.Tensor, num_classes: int) -> None:
        self.labels = labels.long()
        self.num_classes = num_classes
        self.order = torch.argsort(self.labels, stable=True)          # indices sorted by class
        self.count = torch.bincount(self.labels, minlength=num_classes)
        self.start = torch.cumsum(self.count, 0) - self.count
        self.position = torch.empty_like(self.order)                   # index -> slot in order
        self.position[self.order] = torch.arange(len(self.order))

    def other_member(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A uniform member of each ``idx``'s class other than ``idx`` (class size >= 2)."""
        c = self.labels[idx]
        size = self.count[c]
        r = (torch.rand(idx.shape, generator=gen) * (size - 1)).long()
        slot = self.position[idx] - self.start[c]
        r = r + (r >= slot).long()  # skip idx's own slot
        return self.order[self.start[c] + r]

    def outside_class(self, c: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A uniform image whose class is not ``c``."""
        n = len(self.order)
        r = (torch.rand(c.shape, generator=gen) * (n - self.count[c])).long()
        r = r + (r >= self.start[c]).long() * self.count[c]  # jump over class c's block
        return self.order[r]

    def member(self, c: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A uniform member of class ``c``."""
        r = (torch.rand(c.shape, generator=gen) * self.count[c]).long()
        return self.order[self.start[c] + r]

    def other_class(self, c: torch.Tensor, gen: torch.Generator,
                    allowed: torch.Tensor) -> torch.Tensor:
        """A uniform class among ``allowed`` (sorted class ids) other than ``c``."""
        k = len(allowed)
        r = (torch.rand(c.shape, generator=gen) * (k - 1)).long()
        slot = torch.searchsorted(allowed, c)  # c's slot (its own, or where it would be)
        own = allowed[slot.clamp(max=k - 1)] == c
        return allowed[r + ((r >= slot) & own).long()]


class TupleSampler(torch.utils.data.Sampler):
    """Yields ``branches``-tuples of dataset indices: ``(a, p, n, n2)`` for 4, ``(a, p)``
    for 2, ``(a,)`` for 1. ``set_epoch(e)`` reseeds: the items of epoch ``e`` depend only
    on ``(seed, e)``, so a resumed run draws exactly what the uninterrupted one would.

    Args:
        labels: ``[N]`` class index of every image.
        num_classes: ``K``.
        branches: 4, 2 or 1.
        seed: base seed.
        balanced: class-balanced anchors (and uniform negative classes).
        num_items: items per epoch (default ``N``).
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, branches: int, seed: int = 0,
                 balanced: bool = False, num_items: int | None = None) -> None:
        if branches not in (1, 2, 4):
            raise ValueError(f"branches must be 1, 2 or 4, got {branches}")
        self.index = ClassIndex(labels, num_classes)
        self.branches, self.seed, self.balanced = branches, seed, balanced
        self.num_items = len(labels) if num_items is None else num_items
        self.epoch = 0
        count = self.index.count
        present = torch.nonzero(count > 0).flatten()
        if branches >= 2:
            small = [int(c) for c in present if count[c] < 2]
            if small:
                raise ValueError(f"classes {small} have fewer than 2 images; a positive that is "
                                 "not the anchor itself cannot be drawn")
        if branches == 4 and len(present) < 2:
            raise ValueError("quadruplets need at least 2 classes with images")
        self._present = present

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def items(self) -> torch.Tensor:
        """``[num_items, branches]`` index tuples of the current epoch."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        ix = self.index
        if self.balanced:
            c = self._present[torch.randint(len(self._present), (self.num_items,), generator=gen)]
            a = ix.member(c, gen)
        else:
            n_all = len(ix.labels)
            reps = -(-self.num_items // n_all)
            a = torch.cat([torch.randperm(n_all, generator=gen) for _ in range(reps)])
            a = a[: self.num_items]
        cols = [a]
        if self.branches >= 2:
            cols.append(ix.other_member(a, gen))
        if self.branches == 4:
            ca = ix.labels[a]
            if self.balanced:
                n = ix.member(ix.other_class(ca, gen, self._present), gen)
            else:
                n = ix.outside_class(ca, gen)
            cols += [n, ix.other_member(n, gen)]
        return torch.stack(cols, dim=1)

    def __iter__(self):
        for row in self.items().tolist():
            yield tuple(row)

    def __len__(self) -> int:
        return self.num_items
