"""Train baseline, dcs, qcs, dan and pcd on the built-in data (unbiased and --bias) with
their tiny presets over several seeds, and write a markdown table and learning curves.

Every family gets the same optimizer steps (an epoch is one item per training image for
all of them, 16 items per step); the table also gives each family's accuracy at equal
wall-clock: at the training time the fastest family needed for the whole run.

Every run is a plain ``python -m qcs train`` command (printed in the table); results are
read back from each run's ``metrics.jsonl``. Runs are appended to ``RUNS/results.jsonl`` as
they finish, so an interrupted comparison keeps what it has and ``--table-only`` rebuilds
the table from it.

    python -m qcs_tools.compare_variants --runs runs/compare --seeds 0 1 2 --epochs 8 \
        --train-per-class 100 --test-per-class 50 --out docs/comparison-table.md \
        --curves docs/comparison-curves.png
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
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    row = {"model": model, "bias": bias, "seed": seed, "command": shown(cmd), "wall_s": wall,
           "rc": proc.returncode}
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode == 0 and metrics.is_file():
        hist = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        row.update(final_acc=hist[-1]["test_acc"], best_acc=max(h["test_acc"] for h in hist),
                   epoch_s=sum(h["train_time_s"] for h in hist) / len(hist),
                   train_loss=[round(h["train_loss"], 4) for h in hist],
                   curve=curve(run_dir, hist))
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


def curve(run_dir: Path, hist: list[dict]) -> list[dict]:
    """Per-epoch points of a run: optimizer steps done, cumulative training seconds, the
    base network's training cross-entropy and its test accuracy. Steps per epoch follow
    from the run's config.toml (one item per training image, ``batch_size`` items a step,
    the last short batch dropped)."""
    import tomllib
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    n_train = len(hist[0]["test_recall"]) * cfg["data"]["synth_train_per_class"]
    per_epoch = max(n_train // cfg["train"]["batch_size"], 1)
    points, seconds = [], 0.0
    for h in hist:
        seconds += h["train_time_s"]
        points.append({"steps": h["epoch"] * per_epoch, "train_s": round(seconds, 2),
                       "train_ce": round(h["train_loss_base"], 4), "test_acc": h["test_acc"]})
    return points


def acc_at_time(points: list[dict], seconds: float) -> float | None:
    """Test accuracy after the last epoch that ended within ``seconds`` of training (None
    when even the first took longer)."""
    done = [p["test_acc"] for p in points if p["train_s"] <= seconds]
    return done[-1] if done else None


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


def _group(rows: list[dict], model: str, bias: bool) -> list[dict]:
    return sorted((r for r in rows if r["model"] == model and r["bias"] == bias
                   and r["rc"] == 0 and r.get("curve")), key=lambda r: r["seed"])


def equal_time(rows: list[dict], bias: bool) -> float:
    """The wall-clock budget of the equal-time column: the smallest mean total training
    time among the models (the fastest model's whole run)."""
    totals = [stats([r["curve"][-1]["train_s"] for r in rs])[0]
              for m in MODELS if (rs := _group(rows, m, bias))]
    return min(totals) if totals else 0.0


def table_row(rs: list[dict], model: str, bias: bool, budget: float) -> str:
    """One markdown row: a model on one dataset over its seeds."""
    accs = [100 * r["curve"][-1]["test_acc"] for r in rs]
    m, sd = stats(accs)
    ce0 = stats([r["curve"][0]["train_ce"] for r in rs])[0]
    ce1 = stats([r["curve"][-1]["train_ce"] for r in rs])[0]
    halved = sum(r["curve"][-1]["train_ce"] <= r["curve"][0]["train_ce"] / 2 for r in rs)
    total = [r["curve"][-1]["train_s"] for r in rs]
    at_t = [acc_at_time(r["curve"], budget) for r in rs]
    at_t_text = ("-" if any(a is None for a in at_t)
                 else "{:.1f} ± {:.1f}".format(*stats([100 * a for a in at_t])))
    seed = rs[0]["seed"]
    cmd = rs[0]["command"].replace(f"--seed {seed}", "--seed S").replace(f"-s{seed}", "-sS")
    return (f"| {'bias' if bias else 'unbiased'} | {model} | {exact_params(rs[0]):,} | "
            f"{rs[0]['curve'][-1]['steps']} | {m:.1f} ± {sd:.1f} | "
            f"{min(accs):.1f}-{max(accs):.1f} | {ce0:.2f} -> {ce1:.2f} ({halved}/{len(rs)}) | "
            f"{stats(total)[0]:.0f} ({min(total):.0f}) | {at_t_text} | "
            f"{','.join(str(r['seed']) for r in rs)} | `{cmd}` |")


def table(rows: list[dict], args) -> str:
    """The markdown table: per dataset and model, accuracy at equal steps and at equal
    wall-clock, the training cross-entropy's fall, training time and the command."""
    out = [("| data | model | params | steps | test acc % at equal steps, mean ± sd | "
            "min-max | train CE, first -> last epoch (runs halved) | train s, mean "
            "(fastest run) | test acc % at equal time | seeds | command (S = seed) |"),
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    budgets = {bias: equal_time(rows, bias) for bias in (False, True)}
    for bias in (False, True):
        for model in MODELS:
            if rs := _group(rows, model, bias):
                out.append(table_row(rs, model, bias, budgets[bias]))
    out += ["", (f"Equal time: the accuracy after the last epoch that ended within "
                 f"{budgets[False]:.0f} s (unbiased) / {budgets[True]:.0f} s (bias) of "
                 f"training, the fastest model's mean training time; '-' where a seed's "
                 f"first epoch took longer.")]
    failed = [r for r in rows if r["rc"] != 0]
    if failed:
        out.append("")
        out += [f"- failed: `{r['command']}` (rc {r['rc']})" for r in failed]
    return "\n".join(out) + "\n"


def _mean_curve(rs: list[dict], key: str, x: str) -> tuple[list[float], list[float]]:
    """Mean over seeds of ``key`` against ``x`` (the seeds share the epochs)."""
    n = min(len(r["curve"]) for r in rs)
    xs = [stats([r["curve"][i][x] for r in rs])[0] for i in range(n)]
    ys = [stats([r["curve"][i][key] for r in rs])[0] for i in range(n)]
    return xs, ys


def plot_curves(rows: list[dict], path: Path) -> None:
    """Learning curves (mean over seeds) as one PNG: for unbiased and biased data, test
    accuracy against optimizer steps and against training seconds, and the training
    cross-entropy against steps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(15, 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    panels = (("test_acc", "steps", "test accuracy", "optimizer steps"),
              ("test_acc", "train_s", "test accuracy", "training seconds"),
              ("train_ce", "steps", "training cross-entropy", "optimizer steps"))
    for row, bias in enumerate((False, True)):
        for col, (key, x, ylabel, xlabel) in enumerate(panels):
            ax = axes[row][col]
            for model in MODELS:
                if rs := _group(rows, model, bias):
                    ax.plot(*_mean_curve(rs, key, x), marker="o", ms=3, label=model)
            if key == "test_acc":  # on a 0-1 scale, with chance (7 classes) dotted
                ax.axhline(1 / 7, ls=":", color="grey", label="chance")
                ax.set_ylim(0, 1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{'biased' if bias else 'unbiased'} training data")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


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
    p.add_argument("--curves", metavar="PNG", help="also write the learning curves here")
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
    # a run done twice (a rerun, or two comparisons sharing RUNS) counts once: the latest
    rows = list({(r["model"], r["bias"], r["seed"]): r for r in rows}.values())
    for r in rows:  # the base cross-entropy per epoch, read back from the run
        if r["rc"] == 0:
            run_dir = Path(r["command"].split("--out ", 1)[1].split()[0])
            hist = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
            r.setdefault("curve", curve(run_dir, hist))
    text = table(rows, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    if args.curves:
        plot_curves(rows, Path(args.curves))
    return 0


if __name__ == "__main__":
    sys.exit(main())
