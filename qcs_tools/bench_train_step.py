"""Time of one QCS training step (SAM: two forward/backward passes + the Adam step) on CPU,
for the ``tiny`` and ``paper-qcs`` models, and the share of it spent in CSA.

The CSA share is measured two ways:

- ablation: the same step with the CSA maps replaced by a constant uniform map (no CSA
  forward or backward); ``share = (t_step - t_without_csa) / t_step``;
- profiler (fused backend only): self CPU time of the ``qcs_ext`` similarity ops.

Usage: ``.venv/bin/python -m qcs_tools.bench_train_step [--presets tiny paper-qcs]
[--paper-batch 2] [--tiny-batch 32] [--repeats 3] [--threads N]``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qcs.config import load_config
from qcs.families import build_model
from qcs.families.qcs import QCSConfig
from qcs.models import qcs_loss
from qcs.optim import SAM, build_optimizer


_LOSS = QCSConfig()  # plain cross-entropy (no distillation)


def _step(model, sam, xs, ys):
    out = model.forward_branches(xs)
    loss, _ = qcs_loss(out.logits, out.cross, ys, _LOSS)
    loss.backward()
    sam.first_step()
    out = model.forward_branches(xs)
    loss, _ = qcs_loss(out.logits, out.cross, ys, _LOSS)
    loss.backward()
    sam.second_step()


def _uniform_maps(self, qk, fused):  # CSA ablated: every token weighted 1/N
    return torch.full(qk.shape[:-1], 1.0 / qk.shape[2], dtype=qk.dtype)


def bench(preset: str, batch: int, repeats: int, backend: str) -> dict:
    cfg = load_config(preset)
    cfg.model.num_classes = 7
    cfg.net.backend = backend
    torch.manual_seed(0)
    model = build_model(cfg)
    sam = SAM(build_optimizer(model, cfg.optim), cfg.optim.sam_rho)
    size = cfg.data.image_size
    xs = torch.randn(model.branches, batch, 3, size, size)
    ys = torch.randint(0, 7, (model.branches, batch))

    def timed() -> float:
        _step(model, sam, xs, ys)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            _step(model, sam, xs, ys)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_full = timed()
    prof_share = None
    if backend != "reference" and model.cross[0]._use_fused(xs):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _step(model, sam, xs, ys)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        csa = sum(e.self_cpu_time_total for e in events if "similarity" in e.key)
        prof_share = csa / total if total else None
    cls = type(model.cross[0])
    original = cls._maps
    cls._maps = _uniform_maps
    try:
        t_ablated = timed()
    finally:
        cls._maps = original
    return {"preset": preset, "batch": batch, "images": batch * model.branches,
            "backend": "fused" if model.cross[0]._use_fused(xs) and backend != "reference"
            else "reference", "step_s": t_full, "no_csa_s": t_ablated,
            "share": max(t_full - t_ablated, 0.0) / t_full, "prof_share": prof_share}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["tiny", "paper-qcs"])
    p.add_argument("--tiny-batch", type=int, default=32, help="quadruplets per step (tiny)")
    p.add_argument("--paper-batch", type=int, default=2,
                   help="quadruplets per step for paper-qcs (the paper uses 24; CPU memory "
                   "and time make a smaller batch practical here)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--backends", nargs="+", default=["auto", "reference"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| model | quadruplets (images) | CSA backend | step (s) | step without CSA (s) "
          "| CSA share (ablation) | CSA share (profiler) |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        batch = args.tiny_batch if preset == "tiny" else args.paper_batch
        for backend in args.backends:
            r = bench(preset, batch, args.repeats, backend)
            prof = f"{100 * r['prof_share']:.1f}%" if r["prof_share"] is not None else "-"
            print(f"| {preset} | {r['batch']} ({r['images']}) | {r['backend']} | "
                  f"{r['step_s']:.3f} | {r['no_csa_s']:.3f} | {100 * r['share']:.1f}% | {prof} |",
                  flush=True)


if __name__ == "__main__":
    main()
