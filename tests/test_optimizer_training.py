"""End-to-end training: DASH beats AdamW on a small ill-conditioned regression, converges on a
quadratic and on Rosenbrock, and goes uphill with maximize=True."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from dash_shampoo import DASH


def _task():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=g) * torch.logspace(0, -1.5, 16)  # ill-conditioned inputs
    W = torch.randn(16, 16, generator=g) / 4
    Y = torch.tanh(X @ W) @ torch.randn(16, 4, generator=g)
    return X, Y


def _model(seed: int = 1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _train(make_optimizer, seed: int, steps: int = 150, tail: int = 50) -> float:
    """The mean training loss of the last ``tail`` of ``steps`` full-batch steps."""
    X, Y = _task()
    model = _model(seed)
    opt = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(X) - Y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-tail:]) / tail


def test_mlp_beats_adamw_at_equal_lr():
    # At lr 0.03 both optimizers sit near their edge of stability, so the final loss alone jumps
    # by up to 10x with the last bits of the CPU's kernels (two CPUs gave AdamW 2.1e-3 and 4.7e-3
    # from the same seed). The mean of the last 50 of 150 losses is stable to about 20%. lr 0.03
    # is AdamW's best of {1e-2, 3e-2} by that measure (geometric mean over seeds 1-6: 4.2e-3,
    # 3.0e-3). Measured at lr 0.03, seeds 1-3: DASH/AdamW 0.54, 0.61, 0.72 (geometric mean 0.62);
    # the assertion asks for every seed below 1 and the geometric mean below 0.8.
    ratios = []
    for seed in (1, 2, 3):
        adamw = _train(lambda p: torch.optim.AdamW(p, lr=0.03, betas=(0.9, 0.95), weight_decay=0.0), seed)
        dash = _train(lambda p: DASH(p, lr=0.03, block_size=32, precondition_frequency=5), seed)
        initial = _train(lambda p: torch.optim.SGD(p, lr=0.0), seed, steps=1, tail=1)
        assert adamw < 0.1 * initial  # AdamW itself trains
        ratios.append(dash / adamw)
    assert max(ratios) < 1.0, ratios
    assert math.prod(ratios) ** (1 / len(ratios)) < 0.8, ratios


def test_quadratic_converges():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 8, generator=g) @ torch.diag(torch.logspace(0, -1, 8))
    B = torch.randn(6, 6, generator=g)
    C = torch.randn(8, 6, generator=g)
    W = torch.zeros(8, 6, requires_grad=True)
    opt = DASH([W], lr=0.1, precondition_frequency=1)
    initial = C.pow(2).mean().item()  # 0.75
    for _ in range(200):
        opt.zero_grad()
        loss = (A @ W @ B - C).pow(2).mean()
        loss.backward()
        opt.step()
    # measured 0.0113 (the minimum is 0)
    assert loss.item() < 0.03 < 0.05 * initial


def _rosenbrock(xy):
    return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


def test_rosenbrock_converges():
    # The end point in the flat valley depends on the power-iteration start vectors (the seed):
    # measured final losses 1.5e-3, 5.2e-4, 3.3e-5, 1.2e-4 for seeds 0-3, all within 0.01 of (1, 1).
    losses = []
    for seed in range(4):
        p = torch.tensor([-1.5, 2.0], requires_grad=True)
        opt = DASH([p], lr=0.01, precondition_frequency=1, seed=seed)
        for _ in range(500):
            opt.zero_grad()
            _rosenbrock(p).backward()
            opt.step()
        losses.append(_rosenbrock(p).item())
        torch.testing.assert_close(p.detach(), torch.ones(2), rtol=0, atol=0.02)
    assert sorted(losses)[1] < 1e-3 and max(losses) < 3e-3  # from 12.5 at the start


def test_maximize_goes_uphill():
    X, Y = _task()
    model = _model()
    opt = DASH(model.parameters(), lr=0.01, block_size=16, maximize=True)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = (model(X) - Y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] > 2 * losses[0]
    assert all(b > a for a, b in itertools.pairwise(losses))
