"""The per-step learning-rate schedule (qcs.optim.schedule) against torch's schedulers
and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
from qcs.optim.schedule import LRSchedule


def _opt(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(sched: LRSchedule, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.step()
    return out


def test_exponential_matches_torch_exponential_lr_stepped_per_epoch():
    spe, epochs, gamma = 5, 4, 0.9
    ours = _lrs(LRSchedule(_opt(), "exponential", spe, spe * epochs, gamma=gamma), spe * epochs)
    opt = _opt()
    ref = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=gamma)
    want = []
    for _ in range(epochs):
        want += [opt.param_groups[0]["lr"]] * spe
        opt.step()
        ref.step()
    assert ours == pytest.approx(want, rel=1e-12)


def test_warmup_then_cosine_by_hand():
    # peak 0.1, 2 warm-up steps, 6 steps in all, floor 10%: warm-up 0.05, 0.1 (cosine t = 0
    # at step 2), then t = (s - 2) / 4 for s = 2..5
    s = LRSchedule(_opt(0.1), "cosine", steps_per_epoch=3, total_steps=6, warmup_steps=2,
                   min_lr_ratio=0.1)
    got = _lrs(s, 7)
    cos = [0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * t)) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    # step 1 (the last warm-up step) is at t < 0, clamped to the peak
    assert got == pytest.approx([0.05, 0.1] + cos, rel=1e-12)
    assert got[-1] == pytest.approx(0.01)  # ends at min_lr_ratio * lr


def test_warmup_with_exponential_decay():
    s = LRSchedule(_opt(1.0), "exponential", steps_per_epoch=2, total_steps=8, warmup_steps=4,
                   gamma=0.5)
    assert _lrs(s, 6) == pytest.approx([0.25, 0.5, 0.75 * 0.5, 1.0 * 0.5, 0.25, 0.25])


def test_resume_continues_the_same_schedule():
    full = _lrs(LRSchedule(_opt(), "cosine", 4, 12, warmup_steps=3), 12)
    a = LRSchedule(_opt(), "cosine", 4, 12, warmup_steps=3)
    _lrs(a, 7)
    b = LRSchedule(_opt(), "cosine", 4, 12, warmup_steps=3)
    b.load_state_dict(a.state_dict())
    assert _lrs(b, 5) == pytest.approx(full[7:], rel=1e-12)
    c = LRSchedule(_opt(), "cosine", 4, 12, warmup_steps=3)
    c.seek(7)
    assert _lrs(c, 5) == pytest.approx(full[7:], rel=1e-12)


def test_reads_an_exponential_lr_state_as_whole_epochs():
    opt = _opt()
    ref = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    opt.step()
    ref.step()
    ref.step()  # two epochs done
    s = LRSchedule(_opt(), "exponential", steps_per_epoch=10, total_steps=100, gamma=0.5)
    s.load_state_dict(ref.state_dict())
    assert s.state_dict() == {"step": 20}
    assert s.get_last_lr()[0] == pytest.approx(0.1 * 0.25)


@pytest.mark.parametrize("kwargs, match", [
    ({"schedule": "linear"}, "schedule must be one of"),
    ({"steps_per_epoch": 0}, "steps_per_epoch must be >= 1"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio must be in"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = {"schedule": "cosine", "steps_per_epoch": 5, "total_steps": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LRSchedule(_opt(), **args)
    with pytest.raises(ValueError, match="not a learning-rate schedule state"):
        LRSchedule(_opt(), "cosine", 5, 10).load_state_dict({"epoch": 3})


@pytest.mark.parametrize("name", ["paper-qcs", "paper-dcs", "paper-baseline", "paper-dan",
                                  "paper-pcd"])
def test_paper_presets_keep_the_published_recipe(name):
    from qcs.config import load_config
    cfg = load_config(name)
    # no warm-up, the per-epoch exponential decay, the constructors' initialisation
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.model.init) == (
        "exponential", 0, "default")


def test_tiny_preset_trains_from_scratch_with_warmup_and_cosine():
    from qcs.config import load_config
    cfg = load_config("tiny")
    assert (cfg.optim.schedule, cfg.optim.warmup_steps, cfg.model.init, cfg.optim.sam) == (
        "cosine", 20, "torch", False)
