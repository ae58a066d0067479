#!/usr/bin/env python
"""Fault injection for ``qcs train``: kill it at random moments, resume, repeat, and check
that every resume finds a valid checkpoint and that the run ends bit-identical to an
uninterrupted one.

    .venv/bin/python -m qcs_tools.fault_injection --kills 24        # the long profile
    .venv/bin/python -m qcs_tools.fault_injection --kills 6 --seed 3 --work /tmp/fi --keep

What it does (all in ``--work``, a temporary directory by default):

1. an uninterrupted ``--deterministic`` reference run of a micro QCS network on small
   built-in data (seconds per epoch), timed: start-up until the first checkpoint, and the
   rest;
2. the same command again, interrupted by a seeded plan of events, each followed by
   ``qcs train --resume RUN`` (or the original command while the run directory holds no
   ``config.toml`` yet):

   * ``kill``: SIGKILL after a random delay (a quarter of them inside start-up, one of those
     first, before the run's first checkpoint; the others counted from the start of
     training and spread over it: steps, mid-epoch saves, evaluation, epoch-end saves);
   * ``kill-in-save PHASE NAME``: SIGKILL while the process sits inside a save of checkpoint
     ``NAME`` (``last``/``best``) at ``PHASE`` (``staging``, ``staged``, ``committing``),
     placed there by the test hook ``QCS_TEST_CHECKPOINT_PAUSE`` of ``qcs.checkpoint``;
   * ``term`` / ``int``: SIGTERM / SIGINT once the process has saved a checkpoint itself;
     it must exit by itself with 143 / 130 after saving;

   after every event the checkpoints are checked as a resume would read them (JSON,
   weights and optimizer state from one save, never a torn file; never older than before);
3. when the run completes, ``last.*`` and ``best.*`` (weights and optimizer state) must
   equal the reference's exactly (``torch.equal``) and ``metrics.jsonl`` must match except
   for timings; no staged or temporary file may be left. If the run completes before all
   kills are spent, a new round starts in a fresh run directory.

Exit status 0 when every check passed, 1 otherwise; ``--json FILE`` writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A micro QCS network (same structure as the tiny preset) on 16 + 4 images per class at
# 32 px: start-up dominates, training takes a few seconds.
MICRO = [
    "qcs.backbone_depths=[1, 1, 1]", "qcs.backbone_widths=[8, 8, 16]",
    "qcs.backbone_size=32", "qcs.tokens_side=4", "qcs.embed_dim=16", "qcs.heads=2",
    "qcs.vit_depth=1", "data.image_size=32", "data.synth_size=32",
    "data.synth_train_per_class=16", "data.synth_test_per_class=4", "train.batch_size=4",
    "optim.lr=3e-3",
]
PHASES = ("staging", "staged", "committing")
TIMING_KEYS = ("train_time_s", "train_images_per_s")


@dataclass
class Options:
    """What to train and how hard to hit it."""

    kills: int = 6
    seed: int = 0
    epochs: int = 3
    max_steps: int = 24
    checkpoint_every: int = 4
    signals: bool = True             # include one SIGTERM and one SIGINT event
    save_kills: int | None = None    # kills placed inside saves (default: about a third)
    timeout: float = 180.0           # per process
    python: str = sys.executable
    verbose: bool = True


@dataclass
class Event:
    kind: str                        # kill | kill-in-save | term | int
    delay: float = 0.0               # kill: seconds after start (or after training began)
    in_training: bool = False        # kill: count the delay from the 'model ...' log line
    phase: str = ""                  # kill-in-save
    name: str = "last"               # kill-in-save: checkpoint name


@dataclass
class Report:
    ok: bool = True
    failures: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    rounds: int = 0
    kills: int = 0
    kills_in_save: int = 0           # placed by the hook
    kills_mid_commit: int = 0        # kills that left a commit record or staged files
    kills_before_first_checkpoint: int = 0
    signals: int = 0
    resume_processes: int = 0        # processes started with --resume
    resumes: int = 0                 # of which reported what they resumed from (or restarted)
    reference_s: float = 0.0
    startup_s: float = 0.0
    total_s: float = 0.0

    def fail(self, msg: str) -> None:
        self.ok = False
        self.failures.append(msg)


def _said_model(log: str) -> bool:
    """Whether a run's log has its 'model NAME: ...M parameters' line, printed once the
    network is built (a line may follow a progress bar's carriage return)."""
    return re.search(r"(^|[\r\n])model \S+: [0-9.]+M parameters", log) is not None


def train_args(out: Path, opt: Options) -> list[str]:
    """The ``qcs train`` arguments of both the reference and the faulted runs."""
    # not --quiet: the harness reads the info lines ('model ...', 'resumed from ...')
    args = ["train", "--out", str(out), "--deterministic", "--threads", "1",
            "--epochs", str(opt.epochs), "--max-steps", str(opt.max_steps), "--seed", "0",
            "--set", f"train.checkpoint_every={opt.checkpoint_every}"]
    for item in MICRO:
        args += ["--set", item]
    return args


def make_plan(opt: Options, rng: random.Random, startup: float, work: float) -> list[Event]:
    """``opt.kills`` SIGKILL events (some inside saves) plus, with ``opt.signals``, one
    SIGTERM and one SIGINT, in a seeded random order."""
    n_save = opt.save_kills if opt.save_kills is not None else max(1, opt.kills // 3)
    n_save = min(n_save, opt.kills)
    combos = [(p, n) for n in ("last", "best") for p in PHASES]
    rng.shuffle(combos)
    events = [Event("kill-in-save", phase=combos[i % len(combos)][0],
                    name=combos[i % len(combos)][1]) for i in range(n_save)]
    per_kill = 2 * work / max(opt.kills, 1)  # mean progress per kill: about half the run
    for _ in range(opt.kills - n_save):
        if rng.random() < 0.25:  # inside start-up: imports, data, model, before any save
            events.append(Event("kill", delay=rng.uniform(0.05, 1.0) * startup))
        else:  # once training has begun (start-up times differ: the first run makes data)
            events.append(Event("kill", delay=rng.uniform(0.0, per_kill), in_training=True))
    if opt.signals:
        events += [Event("term"), Event("int")]
    rng.shuffle(events)
    early = [e for e in events if e.kind == "kill" and not e.in_training]
    if early:  # one of them first: the first run dies before its first checkpoint
        events.remove(early[0])
        events.insert(0, early[0])
    return events


def _position(meta: dict[str, Any]) -> tuple[int, int]:
    """(epoch, steps done in it); an epoch's end counts after all its steps."""
    step = meta.get("step", 0)
    return (meta["epoch"], 10**9 if meta.get("epoch_complete", True) else step)


def check_checkpoints(run: Path, before: tuple[int, int] | None) -> tuple[
        tuple[int, int] | None, bool, list[str]]:
    """Read ``last`` and ``best`` of ``run`` the way a resume does (read-only). Returns
    ``last``'s position, whether an unfinished save was found, and the problems."""
    from qcs.checkpoint import CheckpointError, load_state, load_weights, read_metadata
    problems: list[str] = []
    unfinished = _unfinished(run)
    position = None
    for name in ("last", "best"):
        base = run / name
        has_any = (base.with_name(name + ".json").exists()
                   or (run / f".{name}.commit").exists())
        if not has_any:
            if name == "last" and before is not None:
                problems.append(f"{base}: the checkpoint seen before ({before}) vanished")
            continue
        try:
            meta = read_metadata(base)
            weights = load_weights(base, expect_epoch=meta["epoch"],
                                   expect_save_id=meta.get("save_id"))
            if not weights:
                problems.append(f"{base}.safetensors holds no tensors")
            if name == "last":
                load_state(base, expect_save_id=meta.get("save_id"))
                position = _position(meta)
        except CheckpointError as exc:
            problems.append(f"{name}: {exc}")
    if position is not None and before is not None and position < before:
        problems.append(f"last went back from {before} to {position}")
    return position, unfinished, problems


def _unfinished(run: Path) -> bool:
    """Whether ``run`` holds a staged file or a commit record (a save cut short)."""
    return any(p.name.endswith((".staged", ".commit")) for p in run.glob(".*"))


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir()
                  if p.name.endswith((".staged", ".commit")) or ".tmp" in p.name)


def compare_runs(ref: Path, run: Path) -> list[str]:
    """Differences between the finished faulted run and the reference (empty: identical)."""
    import torch
    from qcs.checkpoint import load_state, load_weights
    problems = []
    for name in ("last", "best"):
        a, b = load_weights(ref / name), load_weights(run / name)
        if a.keys() != b.keys():
            problems.append(f"{name}: tensor names differ")
            continue
        bad = [k for k in a if not torch.equal(a[k], b[k])]
        if bad:
            problems.append(f"{name}: {len(bad)} of {len(a)} tensors differ from the "
                            f"uninterrupted run's, e.g. {bad[0]}")
    sa, sb = load_state(ref / "last"), load_state(run / "last")
    ta, tb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    if ta.keys() != tb.keys() or any(
            not torch.equal(ta[i][k], tb[i][k]) for i in ta for k in ta[i]
            if torch.is_tensor(ta[i][k])):
        problems.append("last: optimizer state differs from the uninterrupted run's")

    def rows(path: Path) -> list[dict[str, Any]]:
        out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in out]
    if rows(ref / "metrics.jsonl") != rows(run / "metrics.jsonl"):
        problems.append("metrics.jsonl differs from the uninterrupted run's (timings aside)")
    left = _leftovers(run)
    if left:
        problems.append(f"leftover files after the run: {left}")
    return problems


class Harness:
    """Runs the reference and the faulted rounds in ``work``."""

    def __init__(self, work: Path, opt: Options) -> None:
        self.work, self.opt = work, opt
        self.env = dict(os.environ, QCS_CACHE=str(work / "cache"), PYTHONUNBUFFERED="1")
        self.report = Report()
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def say(self, msg: str) -> None:
        if self.opt.verbose:
            print(msg, flush=True)

    def _start(self, args: list[str], env: dict[str, str] | None = None):
        self.n += 1
        log = open(self.logs / f"{self.n:03d}.log", "w")
        log.write(" ".join(args) + "\n")
        log.flush()
        proc = subprocess.Popen([self.opt.python, "-m", "qcs", *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env or self.env)
        return proc, log

    def _wait(self, proc, until, limit: float) -> bool:
        """Poll until ``until()`` (True) or the process ends or ``limit`` s pass (False)."""
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if until():
                return True
            if proc.poll() is not None:
                return until()
            time.sleep(0.02)
        return False

    def reference(self) -> Path:
        """The uninterrupted run; measures start-up (to the first checkpoint) and total."""
        ref = self.work / "reference"
        t0 = time.monotonic()
        proc, log = self._start(train_args(ref, self.opt))
        self._wait(proc, lambda: (ref / "last.json").exists(), self.opt.timeout)
        startup = time.monotonic() - t0
        rc = proc.wait(timeout=self.opt.timeout)
        log.close()
        self.report.reference_s = time.monotonic() - t0
        self.report.startup_s = startup
        if rc != 0:
            raise RuntimeError(f"the reference run failed (exit {rc}); see {log.name}")
        self.say(f"reference: {self.report.reference_s:.1f} s ({startup:.1f} s to the first "
                 "checkpoint)")
        return ref

    def _segment_args(self, run: Path) -> list[str]:
        if (run / "config.toml").exists() or (run / "last.json").exists():
            return ["train", "--resume", str(run)]
        return train_args(run, self.opt)  # killed before the run wrote anything useful

    def run_event(self, run: Path, ev: Event, before) -> tuple[bool, Any]:
        """One process with one fault. Returns (finished, new position)."""
        r, opt = self.report, self.opt
        args = self._segment_args(run)
        resuming = args[1] == "--resume"
        env = None
        flag = self.work / f"pause-{self.n + 1:03d}.json"
        if ev.kind == "kill-in-save":
            env = dict(self.env, QCS_TEST_CHECKPOINT_PAUSE=ev.phase,
                       QCS_TEST_CHECKPOINT_PAUSE_NAME=ev.name,
                       QCS_TEST_CHECKPOINT_PAUSE_FILE=str(flag), QCS_TEST_CHECKPOINT_PAUSE_S="300")
        left_before = _unfinished(run) if run.is_dir() else False
        t0 = time.monotonic()
        proc, log = self._start(args, env)
        record: dict[str, Any] = {"event": ev.kind, "process": self.n, "resume": resuming}
        out = self.logs / f"{self.n:03d}.log"
        if ev.kind == "kill":
            record.update(delay_s=round(ev.delay, 2), in_training=ev.in_training)
            if ev.in_training:
                self._wait(proc, lambda: _said_model(out.read_text()), opt.timeout)
            self._wait(proc, lambda: False, min(ev.delay, opt.timeout))
            landed = proc.poll() is None
        elif ev.kind == "kill-in-save":
            record.update(phase=ev.phase, name=ev.name)
            landed = self._wait(proc, flag.exists, opt.timeout) and proc.poll() is None
            if not landed and proc.poll() is None:
                r.fail(f"process {self.n}: never reached the {ev.phase} phase of a {ev.name} "
                       "save")
        else:  # term / int: once the handlers are in place and this process saved once
            self._wait(proc, lambda: _said_model(out.read_text()), opt.timeout)
            mtime = _mtime(run / "last.json")
            landed = self._wait(proc, lambda: _mtime(run / "last.json") != mtime,
                                opt.timeout) and proc.poll() is None
        if landed:
            sig = {"term": signal.SIGTERM, "int": signal.SIGINT}.get(ev.kind, signal.SIGKILL)
            proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=opt.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            r.fail(f"process {self.n} did not exit within {opt.timeout} s of {ev.kind}")
        log.close()
        text = (self.logs / f"{self.n:03d}.log").read_text()
        if resuming:
            r.resume_processes += 1
            confirmed = "resumed from" in text or "starting it from the beginning" in text
            r.resumes += confirmed
            if _said_model(text) and not confirmed:  # got past loading without resuming
                r.fail(f"process {self.n}: resumed without saying from where")
            got = re.search(r"resumed from \S+ \(epoch (\d+)(?:, step (\d+))?\)", text)
            if got:  # it must load the newest checkpoint seen after the previous fault
                loaded = (int(got[1]), int(got[2]) if got[2] else 10**9)
                if loaded != before:
                    r.fail(f"process {self.n}: resumed from {loaded}, but the newest "
                           f"checkpoint was {before}")
            elif confirmed and before is not None:
                r.fail(f"process {self.n}: restarted from scratch beside checkpoint {before}")
        record.update(rc=rc, seconds=round(time.monotonic() - t0, 2), landed=landed)
        flag.unlink(missing_ok=True)
        finished = False
        if not landed:  # the run ended before the fault could land
            if rc != 0:
                r.fail(f"process {self.n} ({' '.join(args)}) failed with exit {rc}; see "
                       f"{self.logs / f'{self.n:03d}.log'}")
            finished = rc == 0
        elif ev.kind in ("kill", "kill-in-save"):
            r.kills += 1
            r.kills_in_save += ev.kind == "kill-in-save"
            if rc != -signal.SIGKILL:
                r.fail(f"process {self.n}: exit {rc} after SIGKILL")
        else:
            r.signals += 1
            want = 143 if ev.kind == "term" else 130
            if rc != want:
                r.fail(f"process {self.n}: exit {rc} after SIG{ev.kind.upper()}, expected "
                       f"{want}")
            if "stopped by SIG" not in text:
                r.fail(f"process {self.n}: no 'stopped by SIG...' message after {ev.kind}")
        position, unfinished, problems = check_checkpoints(run, before)
        for p in problems:
            r.fail(f"after process {self.n} ({ev.kind}): {p}")
        if landed and ev.kind in ("kill", "kill-in-save"):
            r.kills_mid_commit += unfinished and not left_before
            r.kills_before_first_checkpoint += position is None
        if landed and ev.kind in ("term", "int") and unfinished:
            r.fail(f"process {self.n}: a clean {ev.kind} stop left an unfinished save")
        record.update(position=None if position is None else list(position),
                      unfinished_save=unfinished)
        r.events.append(record)
        where = ("none" if position is None else f"epoch {position[0]} " + (
            "end" if position[1] == 10**9 else f"step {position[1]}"))
        self.say(f"  #{self.n:03d} {ev.kind:12s} {ev.phase + ' ' + ev.name if ev.phase else '':16s}"
                 f" rc={rc!s:4s} {record['seconds']:6.1f} s  last: {where}"
                 f"{'  (unfinished save left)' if unfinished else ''}")
        return finished, position

    def finish(self, run: Path, before) -> None:
        """Run ``run`` to completion (resumes until exit 0, at most 3 tries)."""
        for _ in range(3):
            finished, before = self.run_event(run, Event("kill", delay=self.opt.timeout),
                                              before)
            if finished:
                return
        self.report.fail(f"{run} did not complete")

    def run(self) -> Report:
        """Reference, then faulted rounds until ``opt.kills`` kills have landed."""
        t0 = time.monotonic()
        ref = self.reference()
        rng = random.Random(self.opt.seed)
        work = max(self.report.reference_s - self.report.startup_s, 0.5)
        plan = make_plan(self.opt, rng, self.report.startup_s, work)
        pending = list(plan)
        while pending and self.report.ok:
            self.report.rounds += 1
            run = self.work / f"faulted-{self.report.rounds}"
            self.say(f"round {self.report.rounds}: {run}")
            position, finished = None, False
            while pending and not finished:
                ev = pending.pop(0)
                finished, position = self.run_event(run, ev, position)
                if finished:
                    pending.insert(0, ev)  # the run ended first: this fault goes to the next
            if not finished:
                self.finish(run, position)
            for p in compare_runs(ref, run):
                self.report.fail(f"round {self.report.rounds}: {p}")
            if self.report.rounds > 3 * len(plan) + 3:
                self.report.fail("the runs keep finishing before the faults land")
                break
        self.report.total_s = time.monotonic() - t0
        return self.report


def main(argv: list[str] | None = None) -> int:
    """Command line: run the harness and print its report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=6, help="SIGKILLs to land (long profile: 20+)")
    p.add_argument("--save-kills", type=int, help="of which inside saves (default: a third)")
    p.add_argument("--no-signals", action="store_true", help="no SIGTERM / SIGINT events")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault plan")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=24, help="steps per epoch")
    p.add_argument("--checkpoint-every", type=int, default=4, help="steps between saves")
    p.add_argument("--work", type=Path, help="work directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    opt = Options(kills=args.kills, seed=args.seed, epochs=args.epochs,
                  max_steps=args.max_steps, checkpoint_every=args.checkpoint_every,
                  signals=not args.no_signals, save_kills=args.save_kills)
    work = args.work or Path(tempfile.mkdtemp(prefix="qcs-fault-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report = Harness(work, opt).run()
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = {k: v for k, v in report.__dict__.items() if k != "events"}
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report.__dict__, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
