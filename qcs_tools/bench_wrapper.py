"""The Python wrapper's own cost per call of the fused CSA ops, on the CPU.

At a tiny shape (B = N = C = 1, where the kernel itself costs almost nothing) times, in
one run and alternating rounds: the registered op called directly
(``torch.ops.qcs_ext.cross_similarity_forward.default``), the public wrapper
(``qcs_ext.ops.cross_similarity_maps``: argument checks, kernel-image check, dtype
dispatch) and the wrapper with autograd (forward + backward). The wrapper's overhead is
the difference of the first two medians.

    python -m qcs_tools.bench_wrapper [--calls 2000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def per_call_us(fn, calls: int) -> float:
    """Mean microseconds per call of ``fn`` over ``calls`` calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    from qcs_ext import ops
    torch.set_num_threads(1)
    qk = torch.randn(4, 1, 1, 1)
    theta = torch.zeros(())
    qk_grad = qk.clone().requires_grad_()
    op = torch.ops.qcs_ext.cross_similarity_forward.default

    def train_step():
        ops.cross_similarity_maps(qk_grad, theta).sum().backward()

    cases = {"op called directly": lambda: op(qk, theta, 1.0, "sd", "batch"),
             "cross_similarity_maps": lambda: ops.cross_similarity_maps(qk, theta),
             "cross_similarity_maps + backward": train_step}
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode(False):
        for _ in range(args.rounds):
            for name, fn in cases.items():
                times[name].append(per_call_us(fn, args.calls))
    print("| call | median us per call (min) |\n|---|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.1f} ({min(ts):.1f}) |")
    overhead = [w - d for w, d in zip(times["cross_similarity_maps"], times["op called directly"])]
    print(f"\nwrapper overhead: {statistics.median(overhead):.1f} us per call (median of "
          f"{args.rounds} paired rounds of {args.calls} calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
