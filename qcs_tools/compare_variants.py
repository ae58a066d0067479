"""Train baseline, dcs, qcs, dan and pcd on the built-in data (unbiased and --bias) with
their tiny presets over several seeds, and write a markdown table.

Every run is a plain ``python -m qcs train`` command (printed in the table); results are
read back from each run's ``metrics.jsonl``. Runs are appended to ``RUNS/results.jsonl`` as
they finish, so an interrupted comparison keeps what it has and ``--table-only`` rebuilds
the table from it.

    python -m qcs_tools.compare_variants --runs runs/compare --out docs/comparison.md \
        --seeds 0 1 --epochs 3 --train-per-class 80 --test-per-class 40 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODELS = ("baseline", "dcs", "qcs", "dan", "pcd")


def command(model: str, bias: bool, seed: int, args, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "qcs", "train", "--model", model, "--seed", str(seed),
           "--epochs", str(args.epochs), "--threads", str(args.threads), "--quiet",
           "--set", f"data.synth_train_per_class={args.train_per_class}",
           "--set", f"data.synth_test_per_class={args.test_per_class}",
           "--out", str(run_dir)]
    if bias:
        cmd.insert(4, "--bias")
    return cmd


def shown(cmd: list[str]) -> str:
    """The command as a user would type it (``qcs`` for ``python -m qcs``)."""
    return "qcs " + " ".join(shlex.quote(c) for c in cmd[3:])


def run_one(job) -> dict:
    model, bias, seed, args = job
    run_dir = Path(args.runs) / f"{'bias' if bias else 'plain'}-{model}-s{seed}"
    cmd = command(model, bias, seed, args, run_dir)
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    row = {"model": model, "bias": bias, "seed": seed, "command": shown(cmd), "wall_s": wall,
           "rc": proc.returncode}
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode == 0 and metrics.is_file():
        hist = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        row.update(final_acc=hist[-1]["test_acc"], best_acc=max(h["test_acc"] for h in hist),
                   epoch_s=sum(h["train_time_s"] for h in hist) / len(hist),
                   train_loss=[round(h["train_loss"], 4) for h in hist])
        log = (run_dir / "train.log").read_text()
        for line in log.splitlines():
            if "M parameters" in line:
                row["params_m"] = float(line.split(": ", 1)[1].split("M")[0])
    else:
        row["error"] = (proc.stderr or proc.stdout)[-2000:]
    with open(Path(args.runs) / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"{row['command']}: rc {proc.returncode}, acc {row.get('final_acc')}, "
          f"{wall:.0f} s", flush=True)
    return row


def exact_params(row: dict) -> int:
    """Trainable + frozen parameters of the run's network, rebuilt from its config.toml."""
    from qcs.config import load_config
    from qcs.families import build_model
    run_dir = Path(row["command"].split("--out ", 1)[1].split()[0])
    cfg = load_config(run_dir / "config.toml", legacy=True)
    return sum(p.numel() for p in build_model(cfg).parameters())


def stats(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, sd


def table(rows: list[dict], args) -> str:
    out = ["| data | model | params | test acc % (last epoch), mean ± sd | min-max | "
           "train CE, epoch 1 -> 3 (mean) | train s / epoch, mean (fastest run) | seeds | "
           "command (S = seed) |",
           "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for bias in (False, True):
        for model in MODELS:
            rs = [r for r in rows if r["model"] == model and r["bias"] == bias and r["rc"] == 0]
            if not rs:
                continue
            accs = [100 * r["final_acc"] for r in rs]
            m, sd = stats(accs)
            ep, _ = stats([r["epoch_s"] for r in rs])
            ce0, _ = stats([r["train_ce"][0] for r in rs])
            ce1, _ = stats([r["train_ce"][-1] for r in rs])
            seed = rs[0]["seed"]
            cmd = rs[0]["command"].replace(f"--seed {seed}", "--seed S").replace(
                f"-s{seed}", "-sS")
            params = f"{exact_params(rs[0]):,}"
            out.append(f"| {'bias' if bias else 'unbiased'} | {model} | {params} | "
                       f"{m:.1f} ± {sd:.1f} | {min(accs):.1f}-{max(accs):.1f} | "
                       f"{ce0:.2f} -> {ce1:.2f} | "
                       f"{ep:.1f} ({min(r['epoch_s'] for r in rs):.1f}) | "
                       f"{','.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} | "
                       f"`{cmd}` |")
    failed = [r for r in rows if r["rc"] != 0]
    if failed:
        out.append("")
        out += [f"- failed: `{r['command']}` (rc {r['rc']})" for r in failed]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="runs/compare")
    p.add_argument("--out", default="docs/comparison-table.md")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-per-class", type=int, default=80)
    p.add_argument("--test-per-class", type=int, default=40)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (1: on a busy machine more threads only spin)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    results = Path(args.runs) / "results.jsonl"
    if not args.table_only:
        # seed-major, so a cut-short comparison has every model for the first seeds;
        # the biased and unbiased queues alternate so both data caches are built early
        jobs = [(m, b, s, args) for s in args.seeds for m in args.models for b in (False, True)]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run_one, jobs))
    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    for r in rows:  # the base cross-entropy per epoch, read back from the run
        if r["rc"] == 0:
            run_dir = Path(r["command"].split("--out ", 1)[1].split()[0])
            hist = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            r["train_ce"] = [h["train_loss_base"] for h in hist]
    text = table(rows, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
