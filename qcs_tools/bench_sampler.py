"""Quadruplet sampling cost against the dataset size (the O(1)-per-item claim, measured).

    .venv/bin/python -m qcs_tools.bench_sampler

Draws a fixed number of quadruplets from label tables of growing size and prints the time
per item; O(1) sampling keeps it flat while the table grows 1000-fold, apart from the
per-epoch set-up, which is O(N) and here spread over a fixed 20,000 items (over a real epoch
of N items it is O(1) per item too). A benchmark, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import itertools
import time

import torch

from qcs.data.sampling import TupleSampler

ITEMS = 20_000


def time_per_item(dataset_size: int, balanced: bool) -> float:
    labels = torch.randint(0, 7, (dataset_size,), generator=torch.Generator().manual_seed(0))
    sampler = TupleSampler(labels, 7, branches=4, seed=0, balanced=balanced, num_items=ITEMS)
    start = time.perf_counter()
    for _ in itertools.islice(iter(sampler), ITEMS):
        pass
    return (time.perf_counter() - start) / ITEMS


def main() -> None:
    time_per_item(1_000, False)  # warm-up (first-call costs)
    print("| dataset size | us per quadruplet | us per quadruplet (balanced) |")
    print("|---:|---:|---:|")
    for size in (1_000, 10_000, 100_000, 1_000_000):
        plain, balanced = time_per_item(size, False), time_per_item(size, True)
        print(f"| {size:,} | {plain * 1e6:.2f} | {balanced * 1e6:.2f} |")


if __name__ == "__main__":
    main()
