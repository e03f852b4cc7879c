"""DASH (float32, batched, eigh roots) against the float64 per-block reference in reference_shampoo.py.

Tolerance. Gradients are fixed random tensors (they do not depend on the parameters), so both
optimizers see identical inputs and only the arithmetic differs. The error measured is
``‖W_dash − W_ref‖ / ‖W_ref − W_0‖`` per parameter, after every step. The factors of thin blocks
and of vectors are rank-deficient during the first steps (a (4, 1) block's L has rank ≤ t), so
their roots amplify float32 rounding in the null space by up to ``(λ_max / root_eps)^(1/p)``: with
``root_eps=1e-12`` the float32 run differs from the float64 one by up to 27 % (measured), which
says nothing about correctness. With ``root_eps=1e-4`` (factor eigenvalues are O(0.1); 20x that
for the plain sums of ``factor_beta=1``) the largest error measured over all configurations and
stacking modes below is 8.3e-5 (``grafting="none"``, with the default relative ridge 1e-6 · tr/n,
which the reference adds too; most configurations below 1e-5); the bound ``RTOL = 3e-4`` leaves a
margin of about 3.6x. Checked sensitivity: adding
``root_eps`` once instead of twice in the reference gives 5.7e-2, a graft over the whole matrix
instead of per block 0.72.
"""

from __future__ import annotations

import pytest
import torch
from reference_shampoo import ReferenceShampoo

from dash_shampoo import DASH

RTOL = 3e-4
ROOT_EPS = 1e-4
STACKINGS = ("global", "layer", "none")

# Every kind of shape, with block_size 4: 0-D, vectors shorter than, equal to and longer than a
# block, (1, n) and (n, 1), square / tall / wide matrices, sizes not divisible by 4, a matrix
# smaller than a block, a 4-D conv weight, an embedding-like table.
SHAPES = [
    (),
    (1,),
    (3,),
    (4,),
    (7,),
    (1, 9),
    (9, 1),
    (8, 8),
    (10, 6),
    (6, 10),
    (11, 13),
    (3, 2),
    (4, 3, 2, 2),
    (1, 1, 5),
    (12, 4),
]


def _data(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return params, grads


def _split(params, sizes):
    out, k = [], 0
    for n in sizes:
        out.append(params[k : k + n])
        k += n
    return out


def run_pair(stacking, groups, steps=5, shapes=SHAPES, grad_mask=None, **options):
    """Run DASH and the reference on the same gradients; returns (max relative error, DASH params).

    ``groups``: a list of (number of params, group options); the params are taken from ``shapes``
    in order. ``grad_mask[k][i]`` False gives parameter i no gradient at step k.
    """
    params, grads = _data(shapes, steps)
    sizes = [n for n, _ in groups]
    assert sum(sizes) == len(shapes)
    dash_params = [p.clone().requires_grad_() for p in params]
    ref_params = [p.double() for p in params]
    options = {"root_eps": ROOT_EPS, **options}
    opt = DASH(
        [dict(params=ps, **o) for ps, (_, o) in zip(_split(dash_params, sizes), groups)],
        root_method="eigh",
        stacking=stacking,
        **options,
    )
    ref = ReferenceShampoo(
        [{"params": ps, **options, **o} for ps, (_, o) in zip(_split(ref_params, sizes), groups)]
    )
    worst = 0.0
    for k in range(steps):
        step_grads = [g if grad_mask is None or grad_mask[k][i] else None for i, g in enumerate(grads[k])]
        for p, g in zip(dash_params, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        ref.step(step_grads)
        for p0, p, r in zip(params, dash_params, ref_params):
            moved = (r - p0.double()).norm()
            if moved > 0:
                err = ((p.detach().double() - r).norm() / moved).item()
                worst = max(worst, err)
            else:
                assert torch.equal(p.detach(), p0)
    return worst, [p.detach().clone() for p in dash_params], opt


BASE = dict(lr=0.1, block_size=4, precondition_frequency=2)

CONFIGS = {
    "base": [(len(SHAPES), BASE)],
    "two_groups": [
        (7, dict(lr=0.1, block_size=4, precondition_frequency=2, weight_decay=0.1)),
        (8, dict(lr=0.03, block_size=3, precondition_frequency=3, weight_decay=0.0)),
    ],
    "momentum": [(len(SHAPES), dict(BASE, momentum=0.9))],
    "nesterov": [(len(SHAPES), dict(BASE, momentum=0.9, nesterov=True, weight_decay=0.05))],
    "start3": [(len(SHAPES), dict(BASE, start_preconditioning_step=3))],
    "freq3_start2": [(len(SHAPES), dict(BASE, precondition_frequency=3, start_preconditioning_step=2))],
    "stagger": [(len(SHAPES), dict(BASE, precondition_frequency=3, stagger=True))],
    # Sums are ~20x larger than the 0.05-weighted EMA: scale root_eps with them.
    "factor_beta_1": [(len(SHAPES), dict(BASE, factor_beta=1.0, root_eps=20 * ROOT_EPS))],
    "one_dim_adam": [(len(SHAPES), dict(BASE, one_dim="adam"))],
    "maximize": [(len(SHAPES), dict(BASE, maximize=True))],
    "no_bias_correction_beta1_0": [(len(SHAPES), dict(BASE, betas=(0.0, 0.99), bias_correction=False))],
    "matrix_root_2": [(len(SHAPES), dict(BASE, matrix_root=2))],
    "grafting_sgd": [(len(SHAPES), dict(BASE, grafting="sgd"))],
    "grafting_rmsprop": [(len(SHAPES), dict(BASE, grafting="rmsprop", betas=(0.5, 0.9)))],
    "grafting_adagrad": [(len(SHAPES), dict(BASE, grafting="adagrad"))],
    "grafting_none": [(len(SHAPES), dict(BASE, grafting="none", lr=0.01))],
    "block_size_1024": [(len(SHAPES), dict(BASE, block_size=1024))],
}


@pytest.mark.parametrize("stacking", STACKINGS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_float64_reference(config, stacking):
    worst, _, _ = run_pair(stacking, CONFIGS[config])
    assert worst < RTOL, f"{config}/{stacking}: relative error {worst:.2e}"


@pytest.mark.parametrize("config", ["base", "two_groups", "stagger", "nesterov", "one_dim_adam"])
def test_stacking_modes_agree(config):
    # Measured: identical, or up to 1.2e-7 (one float32 ulp at |W| ~ 1) apart, since the batched
    # and per-block bmm/eigh calls may round differently.
    results = [run_pair(s, CONFIGS[config])[1] for s in STACKINGS]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("stacking", STACKINGS)
def test_params_without_gradient_on_some_steps(stacking):
    """Parameters that skip steps keep their own step counts (bias correction, schedule)."""
    n = len(SHAPES)
    mask = [[(i + k) % 3 != 0 for i in range(n)] for k in range(6)]
    mask[0] = [i % 2 == 0 for i in range(n)]  # half the params join late
    worst, _, _ = run_pair(stacking, CONFIGS["base"], steps=6, grad_mask=mask)
    assert worst < RTOL


@pytest.mark.parametrize("stacking", STACKINGS)
def test_adam_only_before_start_and_roots_from_start(stacking):
    start = 3
    groups = [(len(SHAPES), dict(BASE, start_preconditioning_step=start, precondition_frequency=10))]
    # Before start: the update is plain Adam (the reference with every block unpreconditioned).
    worst, dash_before, opt = run_pair(stacking, groups, steps=start - 1)
    assert worst < RTOL
    adam_groups = [(len(SHAPES), dict(BASE, start_preconditioning_step=100))]
    _, adam_params, _ = run_pair(stacking, adam_groups, steps=start - 1)
    for a, b in zip(dash_before, adam_params):
        assert torch.equal(a, b)
    roots = [v for st in opt.state.values() for k, v in st.items() if "_root." in k]
    assert roots, "no root state"
    for r in roots:  # never refreshed yet: the identity
        assert torch.equal(r, torch.eye(r.shape[-1]).expand_as(r))
    # At start every root is refreshed, and the step differs from Adam's.
    worst, dash_at, opt = run_pair(stacking, groups, steps=start)
    assert worst < RTOL
    _, adam_at, _ = run_pair(stacking, adam_groups, steps=start)
    changed = [not torch.equal(a, b) for a, b in zip(dash_at, adam_at)]
    # 0-D, (1,) and (3, 2)-style blocks without factors stay Adam; every matrix differs.
    assert [i for i, s in enumerate(SHAPES) if len(s) == 2 and 1 not in s] == [
        i for i, c in enumerate(changed) if c and len(SHAPES[i]) == 2 and 1 not in SHAPES[i]
    ]
    assert not changed[0] and not changed[1]
    roots = [v for st in opt.state.values() for k, v in st.items() if "_root." in k]
    for r in roots:
        eye = torch.eye(r.shape[-1]).expand_as(r)
        assert not torch.equal(r, eye)
        assert torch.isfinite(r).all()
