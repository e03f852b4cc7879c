"""torch.optim conventions of DASH: closure, return value, grad=None, unsupported inputs and
argument validation, per-group options, schedulers, tensor lr, non-contiguous parameters."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import OPTIMIZER_SHAPES as SHAPES
from conftest import STACKINGS, make_grads, make_params, run_steps, set_grads
from torch import nn

from dash_shampoo import DASH

# ----------------------------------------------------------------------------------------------
# closure, return value, grad=None, zero gradients, p.grad untouched
# ----------------------------------------------------------------------------------------------


def test_closure_called_once_and_loss_returned():
    w = torch.randn(4, 3, requires_grad=True)
    opt = DASH([w], lr=0.1, block_size=2)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    w.grad = torch.ones_like(w)
    assert opt.step() is None


def test_closure_enables_grad_inside_no_grad():
    w = torch.randn(3, requires_grad=True)
    opt = DASH([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = w.sum()
        loss.backward()
        return loss

    with torch.no_grad():
        opt.step(closure)
    assert w.grad is not None


@pytest.mark.parametrize("stacking", STACKINGS)
def test_grad_none_params_untouched_and_no_state(stacking):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = DASH(
        [{"params": params[:4]}, {"params": params[4:], "lr": 0.5}], lr=0.1, block_size=4, stacking=stacking
    )
    with_grad = {0, 2, 5}
    for step_grads in make_grads():
        set_grads(params, [g if i in with_grad else None for i, g in enumerate(step_grads)])
        opt.step()
    for i, (p, b) in enumerate(zip(params, before)):
        if i in with_grad:
            assert not torch.equal(p.detach(), b)
            assert int(opt.state[p]["step"]) == 4
        else:
            assert torch.equal(p.detach(), b)
            assert "step" not in opt.state.get(p, {})
            assert not any(isinstance(v, torch.Tensor) for v in opt.state.get(p, {}).values())


@pytest.mark.parametrize("stacking", STACKINGS)
def test_param_that_gets_a_gradient_later_starts_then(stacking):
    params = make_params()
    late = params[4]
    opt = DASH(params, lr=0.1, block_size=4, stacking=stacking, root_method="eigh", root_eps=1e-4)
    grads = make_grads(steps=5)
    for k, step_grads in enumerate(grads):
        set_grads(params, [None if (p is late and k < 3) else g for p, g in zip(params, step_grads)])
        opt.step()
    assert int(opt.state[late]["step"]) == 2
    assert int(opt.state[params[0]]["step"]) == 5
    # Its two updates are those of a fresh optimizer that saw only its two gradients.
    alone = make_params()[4]
    solo = DASH([alone], lr=0.1, block_size=4, root_method="eigh", root_eps=1e-4)
    run_steps(solo, [alone], [[grads[3][4]], [grads[4][4]]])
    torch.testing.assert_close(late, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stacking", STACKINGS)
@pytest.mark.parametrize("root_method", ["ndb", "eigh", "newton", "chebyshev"])
def test_zero_gradient_leaves_params_unchanged(stacking, root_method):
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = DASH(params, lr=0.1, block_size=4, stacking=stacking, root_method=root_method, momentum=0.9)
    for _ in range(3):
        set_grads(params, [torch.zeros(s) for s in SHAPES])
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("stacking", STACKINGS)
def test_grad_unchanged_after_step(maximize, stacking):
    params = make_params()
    opt = DASH(params, lr=0.1, block_size=4, weight_decay=0.1, maximize=maximize, stacking=stacking)
    for step_grads in make_grads(steps=2):
        set_grads(params, step_grads)
        clones = [p.grad.clone() for p in params]
        opt.step()
        for p, c in zip(params, clones):
            assert torch.equal(p.grad, c)


def test_empty_numel_param_is_ignored():
    e = torch.zeros(0, 3, requires_grad=True)
    w = torch.randn(3, 3, requires_grad=True)
    opt = DASH([e, w], lr=0.1)
    e.grad, w.grad = torch.zeros(0, 3), torch.ones(3, 3)
    opt.step()
    assert e.shape == (0, 3)


# ----------------------------------------------------------------------------------------------
# unsupported inputs and argument validation
# ----------------------------------------------------------------------------------------------


def test_sparse_gradient_raises():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = DASH(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_complex_param_raises():
    with pytest.raises(TypeError, match="complex"):
        DASH([torch.randn(3, 3, dtype=torch.complex64, requires_grad=True)])


def test_integer_param_raises():
    with pytest.raises(TypeError, match="floating-point"):
        DASH([torch.zeros(3, dtype=torch.int64)])


def test_empty_and_duplicate_params_rejected():
    with pytest.raises(ValueError, match="empty"):
        DASH([])
    w = torch.randn(2, requires_grad=True)
    with pytest.raises(ValueError):
        DASH([{"params": [w]}, {"params": [w]}])


BAD_ARGS = [
    ("lr", -1.0, ValueError, "lr must be in [0, inf]; got -1.0"),
    ("lr", float("nan"), ValueError, "lr must be finite; got nan"),
    ("lr", "0.1", TypeError, "lr must be a real number; got '0.1' of type str"),
    ("lr", torch.tensor([0.1, 0.2]), ValueError, "lr as a tensor must have one element; got shape (2,)"),
    ("betas", (0.9,), ValueError, "betas must be a pair (beta1, beta2); got (0.9,)"),
    ("betas", (1.0, 0.9), ValueError, "betas[0] must be in [0, 1); got 1.0"),
    ("betas", (0.9, -0.1), ValueError, "betas[1] must be in [0, 1); got -0.1"),
    ("eps", -1e-8, ValueError, "eps must be in [0, inf]; got -1e-08"),
    ("weight_decay", -0.1, ValueError, "weight_decay must be in [0, inf]; got -0.1"),
    ("block_size", 0, ValueError, "block_size must be in [1, inf]; got 0"),
    ("block_size", 2.0, TypeError, "block_size must be an integer; got 2.0 of type float"),
    ("factor_beta", 0.0, ValueError, "factor_beta must be in (0, 1]; got 0.0"),
    ("factor_beta", 1.5, ValueError, "factor_beta must be in (0, 1]; got 1.5"),
    ("precondition_frequency", 0, ValueError, "precondition_frequency must be in [1, inf]; got 0"),
    ("start_preconditioning_step", 0, ValueError, "start_preconditioning_step must be in [1, inf]; got 0"),
    ("stagger", 1, TypeError, "stagger must be a bool; got 1"),
    ("bias_correction", "yes", TypeError, "bias_correction must be a bool; got 'yes'"),
    ("nesterov", None, TypeError, "nesterov must be a bool; got None"),
    ("maximize", 0, TypeError, "maximize must be a bool; got 0"),
    (
        "grafting",
        "lamb",
        ValueError,
        "grafting must be one of 'adam', 'adagrad', 'rmsprop', 'sgd', 'none'; got 'lamb'",
    ),
    ("momentum", 1.0, ValueError, "momentum must be in [0, 1); got 1.0"),
    ("root_method", "svd", ValueError, "root_method must be one of"),
    ("root_eps", -1.0, ValueError, "root_eps must be in [0, inf]; got -1.0"),
    ("root_steps", 0, ValueError, "root_steps must be in [1, inf]; got 0"),
    ("root_tol", 0.0, ValueError, "root_tol must be in (0, inf]; got 0.0"),
    ("scaling", "max", ValueError, "scaling must be one of"),
    ("scaling_steps", -1, ValueError, "scaling_steps must be in [0, inf]; got -1"),
    ("num_vectors", 0, ValueError, "num_vectors must be in [1, inf]; got 0"),
    ("safety", 0.0, ValueError, "safety must be in (0, inf]; got 0.0"),
    ("precision", "fp64", ValueError, "precision must be one of"),
    ("eigen_fix", "clip", ValueError, "eigen_fix must be one of 'shift', 'pinv', 'abs'; got 'clip'"),
    ("chebyshev_degree", 0, ValueError, "chebyshev_degree must be in [1, inf]; got 0"),
    ("chebyshev_interval_lower", 0.0, ValueError, "chebyshev_interval_lower must be in (0, inf]; got 0.0"),
    ("one_dim", "sgd", ValueError, "one_dim must be one of 'shampoo', 'adam'; got 'sgd'"),
    ("matrix_root", 0, ValueError, "matrix_root must be in [1, inf]; got 0"),
    ("matrix_root", 3, ValueError, "matrix_root must be 1 or a power of two with root_method 'ndb'; got 3"),
]


@pytest.mark.parametrize(("name", "value", "error", "message"), BAD_ARGS, ids=lambda x: str(x)[:30])
def test_bad_argument_constructor(name, value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        DASH([torch.randn(3, requires_grad=True)], **{name: value})


@pytest.mark.parametrize(("name", "value", "error", "message"), BAD_ARGS, ids=lambda x: str(x)[:30])
def test_bad_argument_group_override(name, value, error, message):
    opt = DASH([torch.randn(3, requires_grad=True)])
    extra = torch.randn(2, requires_grad=True)
    with pytest.raises(error, match=re.escape(message)):
        opt.add_param_group({"params": [extra], name: value})
    assert len(opt.param_groups) == 1  # the bad group was not kept


@pytest.mark.parametrize(
    ("name", "value", "error", "message"),
    [
        ("stacking", "row", ValueError, "stacking must be one of 'global', 'layer', 'none'; got 'row'"),
        ("nonfinite", "ignore", ValueError, "nonfinite must be one of 'skip', 'raise'; got 'ignore'"),
        ("seed", -1, ValueError, "seed must be in [0, inf]; got -1"),
        ("seed", 1.5, TypeError, "seed must be an integer; got 1.5 of type float"),
    ],
)
def test_bad_optimizer_wide_argument(name, value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        DASH([torch.randn(3, requires_grad=True)], **{name: value})


def test_matrix_root_3_is_fine_with_eigh():
    DASH([torch.randn(3, requires_grad=True)], root_method="eigh", matrix_root=3)


def test_unknown_keyword_raises_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        DASH([torch.randn(3, requires_grad=True)], foo=1)


def test_repr():
    text = repr(DASH([torch.randn(3, requires_grad=True)], lr=0.25))
    assert "DASH" in text and "0.25" in text


# ----------------------------------------------------------------------------------------------
# per-group options, schedulers, tensor lr
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stacking", STACKINGS)
def test_lr_zero_group_stays_put(stacking):
    a, b = make_params(seed=0), make_params(seed=0)
    before = [p.detach().clone() for p in a]
    opt = DASH(
        [{"params": a, "lr": 0.0, "weight_decay": 0.5}, {"params": b, "lr": 1.0}],
        block_size=4,
        stacking=stacking,
    )
    for step_grads in make_grads(steps=3):
        set_grads(a, step_grads)
        set_grads(b, step_grads)
        opt.step()
    for p, q, p0 in zip(a, b, before):
        assert torch.equal(p.detach(), p0)
        assert not torch.equal(q.detach(), p0)


def test_two_groups_behave_like_two_optimizers():
    shapes = SHAPES
    a1, a2 = make_params(shapes[:3], seed=2), make_params(shapes[3:], seed=3)
    b1, b2 = make_params(shapes[:3], seed=2), make_params(shapes[3:], seed=3)
    opts = dict(root_method="eigh", root_eps=1e-4)
    joint = DASH(
        [{"params": a1, "lr": 0.1, "block_size": 2}, {"params": a2, "lr": 0.01, "weight_decay": 0.1}],
        block_size=4,
        **opts,
    )
    sep1 = DASH(b1, lr=0.1, block_size=2, **opts)
    sep2 = DASH(b2, lr=0.01, weight_decay=0.1, block_size=4, **opts)
    for step_grads in make_grads(steps=3):
        set_grads(a1 + a2, step_grads)
        set_grads(b1 + b2, step_grads)
        joint.step()
        sep1.step()
        sep2.step()
    for p, q in zip(a1 + a2, b1 + b2):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    ],
    ids=["StepLR", "CosineAnnealingLR"],
)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_schedulers_match_adam(make_scheduler, tensor_lr):
    """Preconditioning off: DASH + scheduler equals torch Adam + the same scheduler."""
    a, b = make_params(seed=4), make_params(seed=4)
    lr = torch.tensor(0.05) if tensor_lr else 0.05
    opt_a = DASH(a, lr=lr, start_preconditioning_step=1000)
    opt_b = torch.optim.Adam(b, lr=torch.tensor(0.05) if tensor_lr else 0.05, betas=(0.9, 0.95))
    sched_a, sched_b = make_scheduler(opt_a), make_scheduler(opt_b)
    for step_grads in make_grads(steps=6):
        set_grads(a, step_grads)
        set_grads(b, step_grads)
        opt_a.step()
        opt_b.step()
        sched_a.step()
        sched_b.step()
    assert float(opt_a.param_groups[0]["lr"]) == pytest.approx(float(opt_b.param_groups[0]["lr"]))
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_scheduler_changes_the_preconditioned_step():
    a, b = make_params(seed=5), make_params(seed=5)
    opt_a = DASH(a, lr=0.1, block_size=4)
    opt_b = DASH(b, lr=0.1, block_size=4)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    grads = make_grads(steps=3)
    for k, step_grads in enumerate(grads):
        set_grads(a, step_grads)
        set_grads(b, step_grads)
        for group in opt_b.param_groups:
            group["lr"] = 0.1 * 0.5**k
        opt_a.step()
        opt_b.step()
        sched.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_tensor_lr_equals_float_lr():
    """A tensor lr gives the float lr's steps within one rounding of the parameters (rtol 2^-22,
    two fp32 ulps): a float32 tensor holds 0.03 rounded to float32, and DASH applies lr in float64
    with the grafting ratio; a float64 tensor's weight decay ``1 - lr·wd`` multiplies a 0-d
    parameter in float64 (type promotion between 0-d tensors), the float's in float32."""
    for dtype in (torch.float64, torch.float32):
        _check_tensor_lr(dtype, 2.0**-22)


def _check_tensor_lr(dtype: torch.dtype, rtol: float) -> None:
    a, b = make_params(seed=6), make_params(seed=6)
    opt_a = DASH(a, lr=torch.tensor(0.03, dtype=dtype), block_size=4, weight_decay=0.1)
    opt_b = DASH(b, lr=0.03, block_size=4, weight_decay=0.1)
    for step_grads in make_grads(steps=3):
        set_grads(a, step_grads)
        set_grads(b, step_grads)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------------------------
# non-contiguous parameters
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stacking", STACKINGS)
def test_non_contiguous_parameter(stacking):
    base = torch.randn(9, 6)
    nc = nn.Parameter(base.clone().t())  # (6, 9), strides (1, 6)
    assert not nc.is_contiguous()
    c = nn.Parameter(base.t().contiguous())
    opt_nc = DASH([nc], lr=0.1, block_size=4, stacking=stacking, weight_decay=0.1)
    opt_c = DASH([c], lr=0.1, block_size=4, stacking=stacking, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(9, 6).t()  # a non-contiguous gradient too
        nc.grad, c.grad = g, g.contiguous()
        opt_nc.step()
        opt_c.step()
    assert not nc.is_contiguous()
    assert nc.stride() == (1, 6)
    assert torch.equal(nc.detach(), c.detach())
    assert not torch.equal(c.detach(), base.t())


def test_non_contiguous_parameter_autograd():
    base = torch.randn(9, 6)
    nc = nn.Parameter(base.t())
    opt = DASH([nc], lr=0.1, block_size=4)
    x = torch.randn(5, 9)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (x @ nc.t()).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("stacking", STACKINGS)
def test_nonfinite_on_first_step_then_same_as_fresh(stacking):
    params, fresh_params = make_params(), make_params()
    opt = DASH(params, lr=0.1, block_size=4, stacking=stacking)
    fresh = DASH(fresh_params, lr=0.1, block_size=4, stacking=stacking)
    before = [p.detach().clone() for p in params]
    bad = make_grads(steps=1, seed=7)[0]
    bad[3][0, 0] = float("nan")
    set_grads(params, bad)
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        assert int(opt.state.get(p, {}).get("step", 0)) == 0
    good = make_grads(steps=2)
    run_steps(opt, params, good)
    run_steps(fresh, fresh_params, good)
    for p, q in zip(params, fresh_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("stacking", STACKINGS)
def test_add_param_group_mid_run(stacking):
    a, b = make_params(seed=8), make_params(seed=8)
    extra = torch.randn(7, 5, requires_grad=True)
    opt_a = DASH(a, lr=0.1, block_size=4, stacking=stacking, root_method="eigh", root_eps=1e-4)
    opt_b = DASH(b, lr=0.1, block_size=4, stacking=stacking, root_method="eigh", root_eps=1e-4)
    extra_before = extra.detach().clone()
    for k, step_grads in enumerate(make_grads(steps=4)):
        if k == 2:
            opt_a.add_param_group({"params": [extra], "lr": 0.5})
        set_grads(a, step_grads)
        set_grads(b, step_grads)
        if k >= 2:
            extra.grad = torch.randn(7, 5)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert int(opt_a.state[extra]["step"]) == 2
    assert not torch.equal(extra.detach(), extra_before)


def test_bf16_communication_is_refused_with_the_reason():
    with pytest.raises(
        ValueError, match="communication 'bf16' is not offered: the ranks exchange inverse roots"
    ):
        DASH([torch.zeros(2, 2, requires_grad=True)], communication="bf16")


@pytest.mark.parametrize(
    "keyword, hint",
    [
        ("max_preconditioner_dim", "DASH calls it block_size (Distributed Shampoo's block size)"),
        ("max_precond_dim", "DASH calls it block_size"),
        ("epsilon", "DASH calls it root_eps (Distributed Shampoo's epsilon damps the factors"),
        ("correct_bias", "DASH calls it bias_correction"),
        ("use_bias_correction", "DASH calls it bias_correction"),
        ("shampoo_beta", "DASH calls it factor_beta"),
        ("grafting_beta", "DASH calls it betas[1]"),
        ("inverse_root_method", "DASH calls it root_method ('newton_db' is 'ndb'"),
        ("newton_steps", "DASH calls it root_steps"),
        ("matrix_eps", "DASH calls it root_eps"),
        ("blok_size", "did you mean 'block_size'?"),
    ],
)
def test_a_peers_keyword_names_dashs_equivalent(keyword, hint):
    param = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(TypeError, match=f"DASH got an unexpected keyword argument '{keyword}'") as error:
        DASH([param], **{keyword: 1})
    assert hint in str(error.value)


def test_distributed_shampoos_start_step_minus_one_says_what_to_pass():
    param = torch.nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"got -1 .*pass start_preconditioning_step=20"):
        DASH([param], start_preconditioning_step=-1, precondition_frequency=20)
