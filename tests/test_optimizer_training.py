"""End-to-end training: DASH beats AdamW on a small ill-conditioned regression, converges on a
quadratic and on Rosenbrock, and goes uphill with maximize=True."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from dash_shampoo import DASH


def _task():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=g) * torch.logspace(0, -1.5, 16)  # ill-conditioned inputs
    W = torch.randn(16, 16, generator=g) / 4
    Y = torch.tanh(X @ W) @ torch.randn(16, 4, generator=g)
    return X, Y


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _train(make_optimizer, steps=150):
    X, Y = _task()
    model = _model()
    opt = make_optimizer(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(X) - Y).pow(2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(X) - Y).pow(2).mean().item()


def test_mlp_beats_adamw_at_equal_lr():
    # lr 0.03 is AdamW's best of {3e-3, 1e-2, 3e-2, 1e-1} on this task (final losses 7.6e-3,
    # 2.9e-3, 2.1e-3, 3.6e-3). Measured at lr 0.03 after 150 steps: AdamW 2.08e-3, DASH (default
    # NDB roots) 2.9e-4, i.e. 0.14x (seeds 1-3: 3.4e-4 to 5.8e-4); the assertion asks for 0.5x.
    adamw = _train(lambda p: torch.optim.AdamW(p, lr=0.03, betas=(0.9, 0.95), weight_decay=0.0))
    dash = _train(lambda p: DASH(p, lr=0.03, block_size=32, precondition_frequency=5))
    initial = _train(lambda p: torch.optim.SGD(p, lr=0.0), steps=1)
    assert adamw < 0.1 * initial  # AdamW itself trains
    assert dash < 0.5 * adamw, (dash, adamw)


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
