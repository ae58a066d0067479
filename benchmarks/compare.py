"""Print the CSA speed table: the fused op against its baselines, all measured in one run.

    .venv/bin/python benchmarks/compare.py                 # every shape, forward and fwd+bwd
    .venv/bin/python benchmarks/compare.py --shapes 24x49x768 --min-run-time 1

Machines are noisy, so the table reports ratios against baselines measured in the same run
(interleaved, median of torch.utils.benchmark's blocked autorange), not absolute targets.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops_cases import (  # noqa: E402
    IMPLEMENTATIONS, SHAPES, case, saved_bytes_ratio,
)


def _parse_shape(text: str):
    try:
        b, n, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 24x49x768, got {text!r}") from None
    return b, n, c


def measure(fn, min_run_time: float) -> float:
    """Median seconds per call."""
    fn()  # warm up (and compile, for torch.compile)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=SHAPES,
                        help="B x N x C shapes (default: %(default)s)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS))
    parser.add_argument("--min-run-time", type=float, default=2.0,
                        help="seconds of timing per cell (default: %(default)s)")
    parser.add_argument("--skip-compiled-above", type=int, default=784,
                        help="skip torch.compile of the reference for N above this")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is the least "
                        "sensitive to other load on a shared machine")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"# CSA benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU kernels: {torch.ops.qcs_ext.cpu_isa()}, {platform.processor() or platform.machine()}")
    header = "| B x N x C | pass | " + " | ".join(args.impls) + " | fused speed-up vs eager | vs compiled | vs sdpa | fused / gemms |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in args.shapes:
        for backward in (False, True):
            times = {}
            for impl in args.impls:
                if impl == "compiled" and shape[1] > args.skip_compiled_above:
                    continue
                times[impl] = measure(case(impl, shape, backward), args.min_run_time)
                print(f"  measured {impl} {shape} {'fwd+bwd' if backward else 'fwd'}: "
                      f"{times[impl] * 1e3:.2f} ms", file=sys.stderr)
            cells = [f"{times[i] * 1e3:.2f} ms" if i in times else "-" for i in args.impls]
            fused = times.get("fused")

            def ratio(base):
                return f"{times[base] / fused:.2f}x" if fused and base in times else "-"

            gemms = f"{fused / times['gemms']:.2f}" if fused and "gemms" in times else "-"
            print(f"| {'x'.join(map(str, shape))} | {'fwd+bwd' if backward else 'fwd'} | "
                  + " | ".join(cells) + f" | {ratio('eager')} | {ratio('compiled')} | {ratio('sdpa')} | {gemms} |")
    print()
    print("| B x N x C | saved for backward beyond the input: fused | eager reference |")
    print("|---|---|---|")
    for shape in args.shapes:
        print(f"| {'x'.join(map(str, shape))} | {saved_bytes_ratio('fused', shape):.3f}x input "
              f"| {saved_bytes_ratio('eager', shape):.3f}x input |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
