"""Print the CSA speed table: the fused op against its baselines, all measured in one run.

    .venv/bin/python -m qcs_tools.compare                 # every shape, forward and fwd+bwd
    .venv/bin/python -m qcs_tools.compare --shapes 24x49x768 --min-run-time 1
    python -m qcs_tools.compare --device cuda --dtypes float32 bfloat16   # GPU table

Machines are noisy, so the table reports ratios against baselines measured in the same run,
not absolute targets. Each cell is measured in several rounds, and every round times every
implementation once (torch.utils.benchmark's blocked autorange) before the next round starts,
so a burst of load from elsewhere lands on all of them alike. A time is the median over the
rounds; a speed-up is the median over the rounds of that round's ratio. On a GPU each time
comes from CUDA events around a block of calls (no host synchronisation inside the block).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch
from torch.utils import benchmark

from qcs_tools.ops_cases import IMPLEMENTATIONS, SHAPES, case, saved_bytes_ratio


def _parse_shape(text: str):
    try:
        b, n, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 24x49x768, got {text!r}") from None
    return b, n, c


def measure(fn, min_run_time: float) -> float:
    """Median seconds per call over blocks of at least ``min_run_time`` in all."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def measure_cuda(fn, min_run_time: float) -> float:
    """Seconds per call on the current CUDA stream, from CUDA events around blocks of calls:
    the block grows until it lasts ``min_run_time / 4``; the median of four blocks."""
    calls, times = 1, []
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end) / 1e3
        if elapsed >= min_run_time / 4 or calls >= 1 << 16:
            times.append(elapsed / calls)
            if len(times) == 4:
                return statistics.median(times)
        else:
            calls *= 2


def measure_interleaved(fns: dict, min_run_time: float, rounds: int, device: str = "cpu") -> dict:
    """Per implementation, its seconds per call in each round (``rounds`` values): every
    round times every implementation once, ``min_run_time / rounds`` seconds each."""
    timer = measure_cuda if device == "cuda" else measure
    for fn in fns.values():
        fn()  # warm up (and compile, for torch.compile)
    per_round = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            per_round[name].append(timer(fn, min_run_time / rounds))
    return per_round


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=SHAPES,
                        help="B x N x C shapes (default: %(default)s)")
    parser.add_argument("--impls", nargs="+", choices=IMPLEMENTATIONS,
                        default=list(IMPLEMENTATIONS))
    parser.add_argument("--min-run-time", type=float, default=2.0,
                        help="seconds of timing per cell, over all rounds (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds per cell (default: %(default)s)")
    parser.add_argument("--skip-compiled-above", type=int, default=784,
                        help="skip torch.compile of the reference for N above this")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=("float32", "bfloat16", "float16", "float64"),
        default=["float32"],
        help="one table per dtype (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); 1 is the least "
        "sensitive to other load on a shared machine",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.min_run_time <= 0:
        parser.error(f"--min-run-time must be positive, got {args.min_run_time}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    for dtype in args.dtypes:
        _table(args, getattr(torch, dtype))
    return 0


def _table(args, dtype: torch.dtype) -> None:
    """Print the speed table of one dtype (and, on the CPU, the saved-bytes table)."""
    where = (
        f"{torch.cuda.get_device_name()}, CUDA events"
        if args.device == "cuda"
        else f"{torch.get_num_threads()} threads, CPU kernels: {torch.ops.qcs_ext.cpu_isa()}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"# CSA benchmark ({str(dtype).replace('torch.', '')}): torch {torch.__version__}, "
        f"{where}; "
        f"medians of {args.rounds} interleaved rounds"
    )
    header = (
        "| B x N x C | pass | "
        + " | ".join(args.impls)
        + " | fused speed-up vs eager | vs compiled | vs sdpa | fused / gemms |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in args.shapes:
        for backward in (False, True):
            # (the CPU float32 defaults are left implicit: the table's tests stub these calls)
            gpu = {"device": args.device} if args.device != "cpu" else {}
            kw = {"dtype": dtype, **gpu} if gpu or dtype != torch.float32 else {}
            fns = {
                impl: case(impl, shape, backward, **kw)
                for impl in args.impls
                if not (impl == "compiled" and shape[1] > args.skip_compiled_above)
            }
            per_round = measure_interleaved(fns, args.min_run_time, args.rounds, **gpu)
            times = {impl: statistics.median(v) for impl, v in per_round.items()}
            for impl, values in per_round.items():
                print(
                    f"  measured {impl} {shape} {'fwd+bwd' if backward else 'fwd'}: "
                    + ", ".join(f"{v * 1e3:.2f}" for v in values)
                    + " ms",
                    file=sys.stderr,
                )
            cells = [f"{times[i] * 1e3:.2f} ms" if i in times else "-" for i in args.impls]
            fused = per_round.get("fused")

            def round_ratio(num, den):
                return statistics.median(a / b for a, b in zip(per_round[num], per_round[den]))

            def ratio(base):
                return f"{round_ratio(base, 'fused'):.2f}x" if fused and base in times else "-"

            gemms = f"{round_ratio('fused', 'gemms'):.2f}" if fused and "gemms" in times else "-"
            print(
                f"| {'x'.join(map(str, shape))} | {'fwd+bwd' if backward else 'fwd'} | "
                + " | ".join(cells)
                + f" | {ratio('eager')} | {ratio('compiled')} | {ratio('sdpa')} | {gemms} |"
            )
    print()
    if args.device != "cpu":
        return
    print("| B x N x C | saved for backward beyond the input: fused | eager reference |")
    print("|---|---|---|")
    for shape in args.shapes:
        print(
            f"| {'x'.join(map(str, shape))} | {saved_bytes_ratio('fused', shape):.3f}x input "
            f"| {saved_bytes_ratio('eager', shape):.3f}x input |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
