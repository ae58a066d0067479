"""Validation splits: a seeded, stratified hold-out of a training list.

FERPlus ships a validation split (``FER2013Valid``); RAF-DB and AffectNet do not (AffectNet's
"validation" set is what everyone reports as the test set), so their validation images are
taken out of the training list: in every class the same fraction, chosen by a seeded
permutation, so the split depends on ``(labels, fraction, seed)`` only.
"""

from __future__ import annotations

import torch

from ..config import parse_val_split  # the config checks the same forms (torch-free there)

__all__ = ["parse_val_split", "stratified_holdout"]


def stratified_holdout(labels: list[int], fraction: float, seed: int,
                       min_train: int = 2) -> tuple[list[int], list[int]]:
    """``(train indices, validation indices)``, both sorted: in each class
    ``round(fraction * n)`` images (at least one, and never so many that fewer than
    ``min_train`` stay for training; a class too small for both keeps all its images)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(int(c), []).append(i)
    train, val = [], []
    for c in sorted(by_class):
        members = by_class[c]
        take = min(max(1, round(fraction * len(members))), len(members) - min_train)
        order = torch.randperm(len(members), generator=gen).tolist()
        chosen = {members[j] for j in order[:max(take, 0)]}
        val += sorted(chosen)
        train += [i for i in members if i not in chosen]
    return sorted(train), sorted(val)
