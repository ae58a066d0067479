"""SAM against a hand-worked example."""

from __future__ import annotations

import pytest
import torch
from qcs.config import OptimConfig
from qcs.optim import SAM, build_optimizer, build_scheduler


def _sam_steps(w0, loss_fn, steps, rho, lr, adaptive=False):
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    sam = SAM(torch.optim.SGD([w], lr=lr), rho=rho, adaptive=adaptive)
    trace = []
    for _ in range(steps):
        loss_fn(w).backward()
        sam.first_step()
        trace.append(w.detach().clone())   # the perturbed point
        loss_fn(w).backward()
        sam.second_step()
        trace.append(w.detach().clone())   # the new weights
    return trace


def test_sam_two_steps_by_hand():
    # f(w) = w1^2 + 3 w2^2, grad = (2 w1, 6 w2); rho = 0.5, lr = 0.1, w0 = (1, 1).
    # step 1: g = (2, 6), |g| = sqrt(40); e = 0.5 g/|g| = (0.158114, 0.474342)
    #   w+e = (1.158114, 1.474342); g(w+e) = (2.316228, 8.846050)
    #   w1 = (1, 1) - 0.1 g(w+e) = (0.768377, 0.115395)
    # step 2: g = (1.536754, 0.692370), |g| = 1.685524; e = (0.455869, 0.205387)
    #   w+e = (1.224246, 0.320782); g(w+e) = (2.448492, 1.924692)
    #   w2 = (0.523528, -0.077074)
    trace = _sam_steps([1.0, 1.0], lambda w: w[0] ** 2 + 3 * w[1] ** 2, 2, rho=0.5, lr=0.1)
    expected = [(1.158114, 1.474342), (0.768377, 0.115395),
                (1.224246, 0.320782), (0.523528, -0.077074)]
    for got, want in zip(trace, expected):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=2e-6, rtol=0)


def test_adaptive_sam_by_hand():
    # ASAM: e = rho w^2 g / |w g|. f = w1^2 + w2^2 at w = (2, 1): g = (4, 2), w g = (8, 2),
    # |w g| = sqrt(68); e = 0.1 (16, 2) / sqrt(68) = (0.194029, 0.024254)
    trace = _sam_steps([2.0, 1.0], lambda w: (w ** 2).sum(), 1, rho=0.1, lr=0.1, adaptive=True)
    torch.testing.assert_close(trace[0], torch.tensor([2.194029, 1.024254], dtype=torch.float64),
                               atol=2e-6, rtol=0)
    # the step uses the gradient at w+e: w - 0.1 * 2 (w + e)
    torch.testing.assert_close(trace[1], torch.tensor([2 - 0.4388058, 1 - 0.2048508],
                                                      dtype=torch.float64), atol=2e-6, rtol=0)


def test_rho_zero_is_the_base_optimizer():
    trace = _sam_steps([1.0, -2.0], lambda w: (w ** 4).sum(), 3, rho=0.0, lr=0.01)
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    for i in range(3):
        w = w - 0.01 * 4 * w ** 3
        torch.testing.assert_close(trace[2 * i + 1], w)
    with pytest.raises(ValueError, match="rho"):
        SAM(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1), rho=-1)


def test_builders():
    model = torch.nn.Linear(2, 2)
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                      ("sgd", torch.optim.SGD)):
        opt = build_optimizer(model, OptimConfig(name=name, lr=0.5, weight_decay=0.1))
        assert isinstance(opt, cls) and opt.param_groups[0]["weight_decay"] == 0.1
    sched = build_scheduler(opt, OptimConfig(lr_gamma=0.5))
    opt.step()
    sched.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.25)
