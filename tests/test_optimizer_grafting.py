"""With preconditioning off (start after the last step), DASH is its grafting method: Adam, AdamW,
AdaGrad, RMSprop, SGD (with momentum / Nesterov), compared with torch.optim on the same gradients.

Measured differences are a few float32 ulps: at most 2.4e-7 absolute for the adaptive methods
(parameters of size ~1, 6 steps), bound ``atol=1e-6``; SGD with lr 0.1 moves parameters to size
~3 and the two weight-decay forms round differently (measured 9.5e-7), bound ``atol=4e-6``.
"""

from __future__ import annotations

import pytest
import torch

from dash_shampoo import DASH

SHAPES = [(), (5,), (1, 7), (6, 4), (9, 13), (3, 2, 2, 2)]
STEPS = 6
OFF = dict(start_preconditioning_step=10_000, block_size=4)


def _compare(make_dash, make_torch, steps=STEPS, atol=1e-6, stacking="global"):
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    a = [p.clone().requires_grad_() for p in init]
    b = [p.clone().requires_grad_() for p in init]
    opt_a, opt_b = make_dash(a), make_torch(b)
    for k in range(steps):
        for p, q, gr in zip(a, b, grads[k]):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_a.step()
        opt_b.step()
    for p, q, p0 in zip(a, b, init):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=0, atol=atol)


@pytest.mark.parametrize("stacking", ["global", "layer", "none"])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9), (0.0, 0.95)])
def test_adam(betas, stacking):
    _compare(
        lambda ps: DASH(ps, lr=1e-2, betas=betas, eps=1e-6, stacking=stacking, **OFF),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=betas, eps=1e-6),
    )


def test_adam_maximize():
    _compare(
        lambda ps: DASH(ps, lr=1e-2, maximize=True, **OFF),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, maximize=True),
    )


@pytest.mark.parametrize("wd", [0.1, 1.0])
def test_adamw_decoupled_weight_decay(wd):
    _compare(
        lambda ps: DASH(ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=wd, **OFF),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd),
    )


def test_adamw_one_dim_adam_and_preconditioned_matrices_are_adam_before_start():
    _compare(
        lambda ps: DASH(ps, lr=3e-3, weight_decay=0.01, one_dim="adam", **OFF),
        lambda ps: torch.optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01),
    )


@pytest.mark.parametrize("eps", [1e-10, 1e-3])
def test_adagrad(eps):
    _compare(
        lambda ps: DASH(ps, lr=0.1, betas=(0.0, 0.9), eps=eps, grafting="adagrad", **OFF),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, eps=eps),
    )


@pytest.mark.parametrize("alpha", [0.99, 0.5])
def test_rmsprop(alpha):
    _compare(
        lambda ps: DASH(ps, lr=1e-2, betas=(0.0, alpha), eps=1e-8, grafting="rmsprop", **OFF),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, alpha=alpha, eps=1e-8),
    )


def test_rmsprop_with_momentum():
    _compare(
        lambda ps: DASH(ps, lr=1e-2, betas=(0.0, 0.9), grafting="rmsprop", momentum=0.8, **OFF),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, alpha=0.9, eps=1e-8, momentum=0.8),
    )


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True), (0.5, True)])
def test_sgd(momentum, nesterov):
    _compare(
        lambda ps: DASH(
            ps, lr=0.1, betas=(0.0, 0.9), grafting="sgd", momentum=momentum, nesterov=nesterov, **OFF
        ),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum, nesterov=nesterov),
        atol=4e-6,
    )


def test_grafting_none_before_start_is_sgd():
    _compare(
        lambda ps: DASH(ps, lr=0.1, betas=(0.0, 0.9), grafting="none", **OFF),
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        atol=4e-6,
    )


def test_sgd_decoupled_weight_decay():
    # torch SGD's weight decay is L2 (coupled); with momentum 0 the decoupled form W(1 − lr·wd) − lr·g
    # is the same as SGD on g + wd·W.
    _compare(
        lambda ps: DASH(ps, lr=0.1, betas=(0.0, 0.9), grafting="sgd", weight_decay=0.3, **OFF),
        lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.3),
        atol=4e-6,
    )


def test_adam_without_bias_correction():
    """bias_correction=False: m / (sqrt(v) + eps), checked against a hand-written loop."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(6, 5, requires_grad=True)
    w = p.detach().clone().double()
    m = torch.zeros_like(w)
    v = torch.zeros_like(w)
    opt = DASH([p], lr=1e-2, betas=(0.8, 0.9), eps=1e-3, bias_correction=False, **OFF)
    for _ in range(5):
        grad = torch.randn(6, 5, generator=g)
        p.grad = grad.clone()
        opt.step()
        m = 0.8 * m + 0.2 * grad.double()
        v = 0.9 * v + 0.1 * grad.double() ** 2
        w = w - 1e-2 * m / (v.sqrt() + 1e-3)
    torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=1e-6)


def test_grafted_norm_equals_adam_norm_per_block():
    """With preconditioning on, every block's update has the Frobenius norm of Adam's update."""
    g = torch.Generator().manual_seed(4)
    p = torch.randn(8, 12, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    grad = torch.randn(8, 12, generator=g)
    p.grad, q.grad = grad.clone(), grad.clone()
    w0 = p.detach().clone()
    DASH([p], lr=1e-2, block_size=4, root_method="eigh", root_eps=1e-6).step()
    torch.optim.Adam([q], lr=1e-2, betas=(0.9, 0.95), eps=1e-8).step()
    du, da = p.detach() - w0, q.detach() - w0
    assert not torch.allclose(du, da, atol=1e-5)  # it is not Adam's direction
    for i in range(0, 8, 4):
        for j in range(0, 12, 4):
            nu = du[i : i + 4, j : j + 4].norm()
            na = da[i : i + 4, j : j + 4].norm()
            torch.testing.assert_close(nu, na, rtol=1e-4, atol=0)
