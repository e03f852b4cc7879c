"""Non-finite gradients, root failures, the refresh schedule and root hooks."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import STACKINGS, make_grads, make_params, run_steps, set_grads

from dash_shampoo import DASH

# ----------------------------------------------------------------------------------------------
# non-finite gradients and root failures
# ----------------------------------------------------------------------------------------------


def _state_snapshot(opt):
    return {
        id(p): {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
        for p, st in opt.state.items()
    }


@pytest.mark.parametrize("stacking", STACKINGS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip(stacking, bad):
    params = make_params()
    opt = DASH(params, lr=0.1, block_size=4, stacking=stacking)
    grads = make_grads(steps=3)
    run_steps(opt, params, grads[:1])
    before = [p.detach().clone() for p in params]
    state = _state_snapshot(opt)
    grads[1][5][2, 3] = bad
    set_grads(params, grads[1])
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    after = _state_snapshot(opt)
    assert after.keys() == state.keys()
    for k in state:
        for key in state[k]:
            assert torch.equal(after[k][key], state[k][key]), key
    set_grads(params, grads[2])
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in params)


def test_nonfinite_raise():
    params = make_params()
    opt = DASH(params, lr=0.1, block_size=4, nonfinite="raise")
    grads = make_grads(steps=1)[0]
    grads[1][0] = float("nan")
    set_grads(params, grads)
    with pytest.raises(FloatingPointError, match=re.escape("shape (5,)")):
        opt.step()


def test_huge_finite_gradients_do_not_skip_the_step():
    # 16 entries of 3e38 would overflow a sum; the check takes max|g| (finite), so the step is not
    # skipped as non-finite. Their squares would overflow, so the block itself is skipped.
    w = torch.zeros(4, 4, requires_grad=True)
    opt = DASH([w], lr=0.1, block_size=4, nonfinite="raise")
    w.grad = torch.full((4, 4), 3e38)
    opt.step()
    assert opt.skipped_steps == 0 and int(opt.state[w]["step"]) == 1
    assert opt.skipped_blocks == 1 and torch.equal(w, torch.zeros(4, 4))


# NaN, and a finite root no exact root can be: with root_eps = 1e-4 every eigenvalue of
# (A + eps I)^(-1/4) is at most eps^(-1/4) = 10, so an entry of 1e28 (a diverged iteration) is far
# above the accepted 100 * 10 and fails.
@pytest.mark.parametrize("bad", [float("nan"), 1e28])
@pytest.mark.parametrize("stacking", STACKINGS)
def test_root_failure_keeps_previous_root(stacking, bad):
    w = torch.randn(8, 8, requires_grad=True)
    opt = DASH(
        [w],
        lr=0.1,
        block_size=4,
        root_method="eigh",
        root_eps=1e-4,
        precondition_frequency=1,
        stacking=stacking,
    )
    fail = {"on": False, "calls": 0}

    def flaky(call, solve):
        out = solve()
        if fail["on"]:
            fail["calls"] += 1
            out = out.clone()
            out[0] = bad
        return out

    opt.register_root_hook(flaky)
    g = torch.Generator().manual_seed(0)
    w.grad = torch.randn(8, 8, generator=g)
    opt.step()
    assert opt.root_failures == 0
    roots_before = {k: v.clone() for k, v in opt.state[w].items() if "_root." in k}
    fail["on"] = True
    w.grad = torch.randn(8, 8, generator=g)
    opt.step()
    # global and layer: one bank of 8 factors (4 blocks x 2 sides); none: one call per factor
    calls = fail["calls"]
    assert calls == (8 if stacking == "none" else 1)
    assert opt.root_failures == calls  # one failed row per solver call
    assert torch.isfinite(w).all()
    roots_after = {k: v for k, v in opt.state[w].items() if "_root." in k}
    kept = sum(
        int(torch.equal(roots_after[k][i], roots_before[k][i]))
        for k in roots_before
        for i in range(roots_before[k].shape[0])
    )
    assert kept == calls  # exactly the failed roots were kept, the others refreshed


def test_root_failure_before_first_success_keeps_identity():
    w = torch.randn(4, 4, requires_grad=True)
    opt = DASH([w], lr=0.1, block_size=4, root_method="eigh")
    opt.register_root_hook(lambda call, solve: torch.full_like(call.factors, float("nan")))
    w.grad = torch.randn(4, 4)
    before = w.detach().clone()
    opt.step()
    assert opt.root_failures == 2
    for key in ("left_root.0", "right_root.0"):
        assert torch.equal(opt.state[w][key], torch.eye(4).expand(1, 4, 4))
    assert torch.isfinite(w).all() and not torch.equal(w.detach(), before)


def test_a_gradient_whose_square_overflows_skips_its_block_and_keeps_the_state():
    w = torch.randn(6, 12, requires_grad=True)  # two 6x6 blocks
    opt = DASH([w], lr=0.1, block_size=6, precondition_frequency=1)
    w.grad = torch.randn(6, 12)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[w].items()}
    before = w.detach().clone()
    w.grad = torch.randn(6, 12)
    w.grad[:, :6] = 3e38  # g gᵀ would overflow in the first block only
    opt.step()
    assert opt.skipped_blocks == 1 and opt.root_failures == 0
    assert torch.equal(w[:, :6], before[:, :6]) and not torch.equal(w[:, 6:], before[:, 6:])
    for key, value in opt.state[w].items():
        assert torch.isfinite(value).all(), key
        if key != "step":
            assert torch.equal(value[0], state[key][0]), key  # the skipped block's state is kept
    w.grad = torch.randn(6, 12)
    opt.step()
    assert not torch.equal(w[:, :6], before[:, :6])  # ordinary steps move it again


# ----------------------------------------------------------------------------------------------
# the refresh schedule
# ----------------------------------------------------------------------------------------------


def _count_refreshes(opt: DASH) -> list[int]:
    """Per step (append a 0 before each), the factors whose roots the step refreshed."""
    rows = []

    def counting(call, solve):
        rows[-1] += call.factors.shape[0]
        return solve()

    opt.register_root_hook(counting)
    return rows


@pytest.mark.parametrize("stacking", STACKINGS)
@pytest.mark.parametrize(("start", "freq"), [(1, 1), (1, 3), (4, 3), (5, 5), (2, 4)])
def test_refresh_schedule(stacking, start, freq):
    w = torch.randn(8, 12, requires_grad=True)  # 6 blocks of 4x4: 12 factors
    opt = DASH(
        [w],
        lr=0.1,
        block_size=4,
        start_preconditioning_step=start,
        precondition_frequency=freq,
        stacking=stacking,
    )
    rows = _count_refreshes(opt)
    for t in range(1, 13):
        rows.append(0)
        w.grad = torch.randn(8, 12)
        opt.step()
        expected = 12 if t >= start and (t == start or t % freq == 0) else 0
        assert rows[-1] == expected, f"t={t}"


@pytest.mark.parametrize("stacking", STACKINGS)
@pytest.mark.parametrize(("start", "freq"), [(1, 3), (3, 4), (1, 12)])
def test_staggered_refresh_schedule(stacking, start, freq):
    w = torch.randn(8, 12, requires_grad=True)  # 12 factors
    v = torch.randn(10, requires_grad=True)  # chunks (4, 1) x2 and (2, 1): 3 left factors
    opt = DASH(
        [w, v],
        lr=0.1,
        block_size=4,
        start_preconditioning_step=start,
        precondition_frequency=freq,
        stagger=True,
        stacking=stacking,
    )
    rows = _count_refreshes(opt)
    for _ in range(start + 2 * freq):
        rows.append(0)
        w.grad, v.grad = torch.randn(8, 12), torch.randn(10)
        opt.step()
    total = 15
    assert rows[: start - 1] == [0] * (start - 1)
    assert rows[start - 1] == total
    for window in (rows[start : start + freq], rows[start + freq : start + 2 * freq]):
        assert sum(window) == total  # each factor once per window
        assert max(window) - min(window) <= -(-total // freq)  # spread out


def test_root_hooks_wrap_in_order_see_the_options_and_can_be_removed():
    w = torch.randn(8, 8, requires_grad=True)
    opt = DASH([w], lr=0.1, block_size=4, root_method="newton", root_steps=3, precondition_frequency=1)
    seen = []

    def outer(call, solve):
        seen.append(("outer", call.factors.shape, call.p, call.options.method, call.options.steps))
        return solve()

    def inner(call, solve):
        seen.append(("inner",))
        return solve()

    first = opt.register_root_hook(inner)
    second = opt.register_root_hook(outer)
    w.grad = torch.randn(8, 8)
    opt.step()
    assert seen == [("outer", (8, 4, 4), 4, "newton", 3), ("inner",)]  # later hooks wrap earlier
    first.remove()
    second.remove()
    opt.step()
    assert len(seen) == 2
