"""Quadruplet / pair sampling invariants (O(1) timing lives in benchmarks/, not here)."""

from __future__ import annotations

import pytest
import torch
from qcs.data import TupleSampler


def labels_with_counts(counts, seed=0):
    lab = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return lab[torch.randperm(len(lab), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("balanced", [False, True])
def test_quadruplet_rules(balanced):
    labels = labels_with_counts([2, 5, 30, 3, 10])
    s = TupleSampler(labels, 5, 4, seed=3, balanced=balanced, num_items=4000)
    items = s.items()
    assert items.shape == (4000, 4)
    a, p, n, n2 = items.T
    la, lp, ln, ln2 = labels[a], labels[p], labels[n], labels[n2]
    assert torch.equal(la, lp) and torch.equal(ln, ln2)     # positive / negatives share a class
    assert (la != ln).all()                                 # negatives are of another class
    assert (a != p).all() and (n != n2).all()               # never the same image
    # every member of a class can be drawn as positive (class 0 has exactly 2)
    zero = la == 0
    assert set(p[zero].tolist()) == set(torch.nonzero(labels == 0).flatten().tolist())
    if balanced:  # anchor classes roughly uniform despite 2 vs 30 images
        freq = torch.bincount(la, minlength=5).double() / 4000
        assert (freq - 0.2).abs().max() < 0.04
    else:  # negatives of anchor class 2 follow the sizes of the other classes: 2:5:3:10
        neg = torch.bincount(ln[la == 2], minlength=5).double()
        share = neg / neg.sum()
        torch.testing.assert_close(share, torch.tensor([2, 5, 0, 3, 10]) / 20.0,
                                   atol=0.05, rtol=0, check_dtype=False)


def test_epoch_covers_every_anchor_once_and_is_seeded():
    labels = labels_with_counts([4, 6, 5])
    s = TupleSampler(labels, 3, 4, seed=1)
    s.set_epoch(2)
    first = s.items()
    assert sorted(first[:, 0].tolist()) == list(range(15))
    assert torch.equal(first, s.items())                      # same (seed, epoch): same items
    assert list(s) == [tuple(r) for r in first.tolist()]
    s.set_epoch(3)
    assert not torch.equal(first, s.items())
    other = TupleSampler(labels, 3, 4, seed=2)
    other.set_epoch(2)
    assert not torch.equal(first, other.items())


def test_pairs_and_singles():
    labels = labels_with_counts([3, 4])
    pairs = TupleSampler(labels, 2, 2, seed=0).items()
    assert pairs.shape == (7, 2)
    assert torch.equal(labels[pairs[:, 0]], labels[pairs[:, 1]])
    assert (pairs[:, 0] != pairs[:, 1]).all()
    singles = TupleSampler(labels, 2, 1, seed=0).items()
    assert sorted(singles[:, 0].tolist()) == list(range(7))


def test_sampler_errors():
    with pytest.raises(ValueError, match=r"classes \[1\] have fewer than 2"):
        TupleSampler(torch.tensor([0, 0, 1]), 2, 4)
    with pytest.raises(ValueError, match="at least 2 classes"):
        TupleSampler(torch.tensor([0, 0, 0]), 3, 4)
    TupleSampler(torch.tensor([0, 0, 1]), 2, 1)  # singles need no partner
