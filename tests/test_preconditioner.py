"""The update maths of ``dash_shampoo.preconditioner`` against float64 formulas written out per block.

Inputs are float64, so every comparison is to float64 rounding (``rtol=1e-12``): the functions
compute the same products and sums as the written-out formulas, in a possibly different order.
"""

from __future__ import annotations

import pytest
import torch

from dash_shampoo.linalg import ridge
from dash_shampoo.preconditioner import (
    ROOT_BOUND_SLACK,
    accept_roots,
    accumulate_factor,
    accumulate_second_moment,
    due_rows,
    graft,
    grafting_direction,
    precondition,
    refresh_due,
    row_values,
    update_direction,
)

F64 = {"rtol": 1e-12, "atol": 1e-14}


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("side", ["left", "right"])
def test_accumulate_factor_is_the_ema_of_the_gram_matrix(side, beta):
    g = _randn(3, 4, 5)
    start = _randn(3, 4, 4, seed=1) if side == "left" else _randn(3, 5, 5, seed=1)
    factor = start.clone()
    accumulate_factor(factor, g, side, beta)
    gram = torch.stack([b @ b.T if side == "left" else b.T @ b for b in g])
    expected = start + gram if beta == 1 else beta * start + (1 - beta) * gram
    torch.testing.assert_close(factor, expected, **F64)


@pytest.mark.parametrize("grafting", ["adam", "rmsprop", "adagrad", "sgd", "none"])
def test_accumulate_second_moment(grafting):
    g, start = _randn(2, 3, 4), _randn(2, 3, 4, seed=1).abs()
    moment = start.clone()
    accumulate_second_moment([moment], [g], grafting, 0.9)
    expected = {
        "adam": 0.9 * start + 0.1 * g * g,
        "rmsprop": 0.9 * start + 0.1 * g * g,
        "adagrad": start + g * g,
    }.get(grafting, start)  # sgd and none keep no second moment: untouched
    torch.testing.assert_close(moment, expected, **F64)


@pytest.mark.parametrize("grafting", ["adam", "rmsprop", "adagrad", "sgd", "none"])
def test_grafting_direction(grafting):
    g_hat, v = _randn(2, 3, 4), _randn(2, 3, 4, seed=1).abs()
    direction, scale = grafting_direction(g_hat, v.clone(), grafting, 1e-3, 0.5)
    out = direction * scale
    expected = {
        "adam": g_hat / ((v / 0.5).sqrt() + 1e-3),
        "rmsprop": g_hat / (v.sqrt() + 1e-3),
        "adagrad": g_hat / (v.sqrt() + 1e-3),
    }.get(grafting, g_hat)
    torch.testing.assert_close(out, expected, **F64)


def test_precondition_multiplies_the_sides_that_exist():
    g, L, R = _randn(2, 3, 4), _randn(2, 3, 3, seed=1), _randn(2, 4, 4, seed=2)
    torch.testing.assert_close(
        precondition(g, L, R), torch.stack([L[i] @ g[i] @ R[i] for i in range(2)]), **F64
    )
    torch.testing.assert_close(precondition(g, L, None), L @ g, **F64)
    torch.testing.assert_close(precondition(g, None, R), g @ R, **F64)
    assert precondition(g, None, None) is g


def test_graft_matches_each_blocks_norm_and_keeps_zero_blocks():
    U, D = _randn(3, 4, 5), _randn(3, 4, 5, seed=1)
    U[1] = 0
    P = graft(U, D)
    norms = torch.linalg.matrix_norm(P)
    torch.testing.assert_close(norms[[0, 2]], torch.linalg.matrix_norm(D)[[0, 2]], **F64)
    assert torch.equal(P[1], torch.zeros(4, 5))  # 0 · (|D| / (0 + 1e-16)) stays 0
    # The direction of each block is U's.
    cosine = (P[0] * U[0]).sum() / (norms[0] * torch.linalg.matrix_norm(U[0]))
    assert cosine.item() == pytest.approx(1.0, abs=1e-12)


def _reference_direction(
    first, moment, L, R, buffer, *, grafting, eps, bias1, bias2, started, momentum, nesterov, lr
):
    """``update_direction`` block by block, written out."""
    out = []
    g_hat = first / bias1
    for i in range(g_hat.shape[0]):
        graft_dir = g_hat[i] / ((moment[i] / bias2).sqrt() + eps) if grafting == "adam" else g_hat[i]
        row_started = bool(started if isinstance(started, bool) else started[i])
        if row_started and (L is not None or R is not None):
            U = g_hat[i]
            U = U if L is None else L[i] @ U
            U = U if R is None else U @ R[i]
            if grafting != "none":
                U = U * (torch.linalg.matrix_norm(graft_dir) / (torch.linalg.matrix_norm(U) + 1e-16))
            direction = U
        else:
            direction = graft_dir
        if momentum > 0:
            buffer[i] = momentum * buffer[i] + direction
            direction = direction + momentum * buffer[i] if nesterov else buffer[i].clone()
        out.append(lr * direction)
    return torch.stack(out)


@pytest.mark.parametrize("grafting", ["adam", "sgd", "none"])
@pytest.mark.parametrize("started", [True, False, "mixed"])
@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("sides", ["both", "left", "none"])
def test_update_direction_matches_the_written_out_formula(grafting, started, momentum, nesterov, sides):
    S = 4
    g_hat, moment = _randn(S, 3, 5), _randn(S, 3, 5, seed=1).abs()
    L = _randn(S, 3, 3, seed=2) if sides in ("both", "left") else None
    R = _randn(S, 5, 5, seed=3) if sides == "both" else None
    flags = started if isinstance(started, bool) else torch.tensor([True, False, True, False]).view(S, 1, 1)
    buffer = _randn(S, 3, 5, seed=4)
    expected_buffer = buffer.clone()
    options = dict(
        grafting=grafting, eps=1e-3, bias1=0.4, bias2=0.3, started=flags, momentum=momentum,
        nesterov=nesterov, lr=0.05,
    )  # fmt: skip
    direction, scale = update_direction(
        g_hat, moment if grafting == "adam" else None, L, R, buffer if momentum else None, **options
    )
    out = direction if scale is None else direction * scale  # the update as the parameters get it
    expected = _reference_direction(
        g_hat, moment if grafting == "adam" else None, L, R, expected_buffer, **options
    )
    torch.testing.assert_close(out, expected, **F64)
    torch.testing.assert_close(buffer, expected_buffer, **F64)  # the momentum buffer is updated in place


def test_row_values_is_a_scalar_when_the_runs_share_a_step():
    assert row_values([3, 3], [2, 1], lambda t: 1 - 0.9**t, torch.device("cpu")) == 1 - 0.9**3
    mixed = row_values([1, 3], [2, 1], lambda t: t >= 2, torch.device("cpu"))
    assert mixed.shape == (3, 1, 1) and mixed.flatten().tolist() == [False, False, True]


@pytest.mark.parametrize(("start", "frequency"), [(1, 1), (1, 4), (3, 4), (5, 2)])
def test_refresh_due_without_stagger(start, frequency):
    due = [t for t in range(1, 20) if refresh_due(t, start, frequency)]
    assert due == [t for t in range(1, 20) if t == start or (t > start and t % frequency == 0)]


@pytest.mark.parametrize(("start", "frequency"), [(1, 4), (3, 4), (2, 1)])
def test_refresh_due_with_stagger_refreshes_each_factor_once_per_window(start, frequency):
    ordinals = range(10)
    for t in range(start + 1, start + 1 + 3 * frequency, frequency):
        window = range(t, t + frequency)
        for ordinal in ordinals:  # once in every window of `frequency` steps after the start
            assert sum(refresh_due(s, start, frequency, ordinal) for s in window) == 1
    assert all(refresh_due(start, start, frequency, ordinal) for ordinal in ordinals)  # all at the start
    assert not any(refresh_due(t, start, frequency, 0) for t in range(1, start))  # none before


def test_due_rows_uses_each_rows_own_step():
    # Rows 0-1 at the start step, row 2 before it, row 3 at a multiple of the frequency.
    assert due_rows([2, 2, 1, 8], [0, 1, 2, 3], start=2, frequency=4, stagger=False) == [0, 1, 3]
    assert due_rows([5, 5, 5, 5], [0, 1, 2, 3], start=2, frequency=4, stagger=True) == [1]


def _accepted(new: torch.Tensor, old: torch.Tensor, *args: float) -> tuple[list[bool], int]:
    """Which rows accept_roots took from ``new`` (it writes them into ``old``), and its count."""
    factors, eps, relative_eps, p = args
    mean = factors.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
    roots = old.clone()
    refused = accept_roots(new, roots, mean, ridge(factors, eps, relative_eps, mean), p).sum()
    taken = [torch.equal(r, n) and not torch.equal(r, o) for r, n, o in zip(roots, new, old)]
    kept = [torch.equal(r, o) for r, o in zip(roots, old)]
    assert all(t != k for t, k in zip(taken, kept))  # each row is the new root or the old one
    return taken, int(refused)


def test_accept_roots_keeps_the_old_root_where_the_new_one_is_impossible():
    eps, p = 1e-4, 4
    bound = ROOT_BOUND_SLACK * eps ** (-1 / p)  # 100 · 10
    factors = torch.eye(2).expand(5, 2, 2).clone()
    factors[4] = 0  # an all-zero factor
    old = torch.eye(2).expand(5, 2, 2).clone()
    new = torch.full((5, 2, 2), 0.5)
    new[1, 0, 0] = float("nan")
    new[2, 1, 1] = float("inf")
    new[3, 0, 1] = 1.01 * bound
    # The zero factor keeps its root without counting as a failure.
    assert _accepted(new, old, factors, eps, 0.0, p) == ([True, False, False, False, False], 3)
    # Without a ridge no bound exists: only finiteness is checked, and the zero factor is kept.
    assert _accepted(new, old, factors, 0.0, 0.0, p) == ([True, False, False, True, False], 2)


def test_accept_roots_bound_follows_the_relative_ridge():
    # Factor 2·I (mean eigenvalue 2) with relative_eps 1e-4: ridge 2e-4, exact roots at most
    # (2e-4)^(-1/4) = 8.4 per entry; the bound is 100 times that.
    factors = 2 * torch.eye(2).expand(2, 2, 2)
    bound = ROOT_BOUND_SLACK * (2e-4) ** -0.25
    new = torch.full((2, 2, 2), 0.99 * bound)
    new[1, 0, 0] = 1.01 * bound
    assert _accepted(new, torch.zeros(2, 2, 2), factors, 0.0, 1e-4, 4) == ([True, False], 1)
