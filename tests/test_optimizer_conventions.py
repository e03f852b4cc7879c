"""torch.optim conventions: closure, grad=None, validation, schedulers, dtypes, state_dict, hooks,
non-finite handling, root failures, the refresh schedule and non-contiguous parameters."""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from torch import nn

from dash_shampoo import DASH

STACKINGS = ("global", "layer", "none")
SHAPES = [(), (5,), (1, 7), (9, 1), (6, 4), (9, 13), (3, 2, 2, 2)]


def _params(shapes=SHAPES, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _grads(shapes=SHAPES, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def _set(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone().to(p.dtype)


def _train(opt, params, grads):
    for step_grads in grads:
        _set(params, step_grads)
        opt.step()


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
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = DASH(
        [{"params": params[:4]}, {"params": params[4:], "lr": 0.5}], lr=0.1, block_size=4, stacking=stacking
    )
    with_grad = {0, 2, 5}
    for step_grads in _grads():
        _set(params, [g if i in with_grad else None for i, g in enumerate(step_grads)])
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
    params = _params()
    late = params[4]
    opt = DASH(params, lr=0.1, block_size=4, stacking=stacking, root_method="eigh", root_eps=1e-4)
    grads = _grads(steps=5)
    for k, step_grads in enumerate(grads):
        _set(params, [None if (p is late and k < 3) else g for p, g in zip(params, step_grads)])
        opt.step()
    assert int(opt.state[late]["step"]) == 2
    assert int(opt.state[params[0]]["step"]) == 5
    # Its two updates are those of a fresh optimizer that saw only its two gradients.
    alone = _params()[4]
    solo = DASH([alone], lr=0.1, block_size=4, root_method="eigh", root_eps=1e-4)
    _train(solo, [alone], [[grads[3][4]], [grads[4][4]]])
    torch.testing.assert_close(late, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stacking", STACKINGS)
@pytest.mark.parametrize("root_method", ["ndb", "eigh", "newton", "chebyshev"])
def test_zero_gradient_leaves_params_unchanged(stacking, root_method):
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = DASH(params, lr=0.1, block_size=4, stacking=stacking, root_method=root_method, momentum=0.9)
    for _ in range(3):
        _set(params, [torch.zeros(s) for s in SHAPES])
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("stacking", STACKINGS)
def test_grad_unchanged_after_step(maximize, stacking):
    params = _params()
    opt = DASH(params, lr=0.1, block_size=4, weight_decay=0.1, maximize=maximize, stacking=stacking)
    for step_grads in _grads(steps=2):
        _set(params, step_grads)
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
    a, b = _params(seed=0), _params(seed=0)
    before = [p.detach().clone() for p in a]
    opt = DASH(
        [{"params": a, "lr": 0.0, "weight_decay": 0.5}, {"params": b, "lr": 1.0}],
        block_size=4,
        stacking=stacking,
    )
    for step_grads in _grads(steps=3):
        _set(a, step_grads)
        _set(b, step_grads)
        opt.step()
    for p, q, p0 in zip(a, b, before):
        assert torch.equal(p.detach(), p0)
        assert not torch.equal(q.detach(), p0)


def test_two_groups_behave_like_two_optimizers():
    shapes = SHAPES
    a1, a2 = _params(shapes[:3], seed=2), _params(shapes[3:], seed=3)
    b1, b2 = _params(shapes[:3], seed=2), _params(shapes[3:], seed=3)
    opts = dict(root_method="eigh", root_eps=1e-4)
    joint = DASH(
        [{"params": a1, "lr": 0.1, "block_size": 2}, {"params": a2, "lr": 0.01, "weight_decay": 0.1}],
        block_size=4,
        **opts,
    )
    sep1 = DASH(b1, lr=0.1, block_size=2, **opts)
    sep2 = DASH(b2, lr=0.01, weight_decay=0.1, block_size=4, **opts)
    for step_grads in _grads(steps=3):
        _set(a1 + a2, step_grads)
        _set(b1 + b2, step_grads)
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
    a, b = _params(seed=4), _params(seed=4)
    lr = torch.tensor(0.05) if tensor_lr else 0.05
    opt_a = DASH(a, lr=lr, start_preconditioning_step=1000)
    opt_b = torch.optim.Adam(b, lr=torch.tensor(0.05) if tensor_lr else 0.05, betas=(0.9, 0.95))
    sched_a, sched_b = make_scheduler(opt_a), make_scheduler(opt_b)
    for step_grads in _grads(steps=6):
        _set(a, step_grads)
        _set(b, step_grads)
        opt_a.step()
        opt_b.step()
        sched_a.step()
        sched_b.step()
    assert float(opt_a.param_groups[0]["lr"]) == pytest.approx(float(opt_b.param_groups[0]["lr"]))
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_scheduler_changes_the_preconditioned_step():
    a, b = _params(seed=5), _params(seed=5)
    opt_a = DASH(a, lr=0.1, block_size=4)
    opt_b = DASH(b, lr=0.1, block_size=4)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=1, gamma=0.5)
    grads = _grads(steps=3)
    for k, step_grads in enumerate(grads):
        _set(a, step_grads)
        _set(b, step_grads)
        for group in opt_b.param_groups:
            group["lr"] = 0.1 * 0.5**k
        opt_a.step()
        opt_b.step()
        sched.step()
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_tensor_lr_equals_float_lr():
    a, b = _params(seed=6), _params(seed=6)
    opt_a = DASH(a, lr=torch.tensor(0.03), block_size=4, weight_decay=0.1)
    opt_b = DASH(b, lr=0.03, block_size=4, weight_decay=0.1)
    for step_grads in _grads(steps=3):
        _set(a, step_grads)
        _set(b, step_grads)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# dtypes, state_dict, deepcopy, pickle, hooks
# ----------------------------------------------------------------------------------------------


def _float_state_dtypes(opt):
    return {v.dtype for st in opt.state.values() for k, v in st.items() if k != "step"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(dtype):
    params = _params(dtype=dtype)
    before = [p.detach().clone() for p in params]
    opt = DASH(params, lr=0.05, block_size=4)
    _train(opt, params, _grads(steps=3))
    for p, b in zip(params, before):
        assert p.dtype == dtype
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), b)
    assert _float_state_dtypes(opt) == {torch.float32}
    fresh = DASH([p.detach().clone().requires_grad_() for p in params], lr=0.05, block_size=4)
    fresh.load_state_dict(_save_load(opt.state_dict()))
    assert _float_state_dtypes(fresh) == {torch.float32}
    assert all(v["step"].dtype == torch.int64 for v in fresh.state.values())


def _save_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _groups(params, **options):
    return [
        {"params": params[:3], "lr": 0.05, "block_size": 2},
        {"params": params[3:], "weight_decay": 0.1, "momentum": 0.9, "nesterov": True},
    ]


RESUME_OPTIONS = dict(lr=0.02, block_size=4, precondition_frequency=2)


def _resume(save_stacking, load_stacking, dtype=torch.float32, **options):
    options = {**RESUME_OPTIONS, **options}
    grads = _grads(steps=6)
    ref = _params(dtype=dtype)
    opt = DASH(_groups(ref), stacking=save_stacking, **options)
    _train(opt, ref, grads)

    params = _params(dtype=dtype)
    first = DASH(_groups(params), stacking=save_stacking, **options)
    _train(first, params, grads[:3])
    saved = _save_load(first.state_dict())
    clones = [p.detach().clone().requires_grad_() for p in params]
    second = DASH(_groups(clones), stacking=load_stacking, **options)
    second.load_state_dict(saved)
    _train(second, clones, grads[3:])
    return ref, clones, second


@pytest.mark.parametrize("stacking", STACKINGS)
@pytest.mark.parametrize("root_method", ["ndb", "eigh"])
def test_state_dict_resume_bitwise(stacking, root_method):
    ref, resumed, _ = _resume(stacking, stacking, root_method=root_method)
    for p, q in zip(ref, resumed):
        assert torch.equal(p, q)


def test_state_dict_resume_bitwise_stagger_bf16():
    ref, resumed, opt = _resume(
        "global", "global", dtype=torch.bfloat16, stagger=True, precondition_frequency=3
    )
    for p, q in zip(ref, resumed):
        assert torch.equal(p, q)
    assert _float_state_dtypes(opt) == {torch.float32}


@pytest.mark.parametrize(("save", "load"), [("global", "none"), ("none", "global"), ("layer", "global")])
def test_state_dict_cross_stacking(save, load):
    # eigh: per-block and batched eigh/bmm may round differently, so this is not bitwise.
    ref, resumed, _ = _resume(save, load, root_method="eigh", root_eps=1e-4)
    for p, q in zip(ref, resumed):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_state_dict_different_block_size_raises():
    params = _params()
    opt = DASH(params, lr=0.1, block_size=4)
    _train(opt, params, _grads(steps=2))
    saved = _save_load(opt.state_dict())
    clones = [p.detach().clone().requires_grad_() for p in params]
    other = DASH(clones, lr=0.1, block_size=3)
    other.load_state_dict(saved)  # like torch.optim, the saved group options win
    assert other.param_groups[0]["block_size"] == 4
    other.param_groups[0]["block_size"] = 3  # the blocks in the state no longer match
    _set(clones, _grads(steps=1)[0])
    with pytest.raises(ValueError, match="load it with the block_size it was saved with"):
        other.step()


def test_state_dict_is_deterministic():
    sds = []
    for _ in range(2):
        params = _params()
        opt = DASH(params, lr=0.1, block_size=4)
        _train(opt, params, _grads(steps=3))
        sds.append(opt.state_dict())
    assert sds[0]["param_groups"] == sds[1]["param_groups"]
    assert sds[0]["state"].keys() == sds[1]["state"].keys()
    for k, st in sds[0]["state"].items():
        assert st.keys() == sds[1]["state"][k].keys()
        for key, v in st.items():
            assert torch.equal(v, sds[1]["state"][k][key]), key


def test_old_state_dict_without_new_group_keys_loads():
    params = _params()
    opt = DASH(params, lr=0.1, block_size=4)
    _train(opt, params, _grads(steps=2))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["one_dim"]
        del group["matrix_root"]
    clones = [p.detach().clone().requires_grad_() for p in params]
    other = DASH(clones, lr=0.1, block_size=4)
    other.load_state_dict(saved)
    assert other.param_groups[0]["one_dim"] == "shampoo"
    _train(other, clones, _grads(steps=1))


def test_deepcopy_and_pickle_continue_identically():
    params = _params()
    opt = DASH(params, lr=0.05, block_size=4)
    grads = _grads(steps=5)
    _train(opt, params, grads[:2])
    copied_params, copied_opt = copy.deepcopy((params, opt))
    pickled_params, pickled_opt = pickle.loads(pickle.dumps((params, opt)))
    for ps, o in ((params, opt), (copied_params, copied_opt), (pickled_params, pickled_opt)):
        _train(o, ps, grads[2:])
    for p, q, r in zip(params, copied_params, pickled_params):
        assert torch.equal(p, q)
        assert torch.equal(p, r)


def test_step_hooks_fire():
    w = torch.randn(3, 3, requires_grad=True)
    opt = DASH([w], lr=0.1)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    w.grad = torch.ones(3, 3)
    opt.step()
    assert seen == ["pre", "post"]
    pre.remove()
    post.remove()
    opt.step()
    assert seen == ["pre", "post"]


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
    params = _params()
    opt = DASH(params, lr=0.1, block_size=4, stacking=stacking)
    grads = _grads(steps=3)
    _train(opt, params, grads[:1])
    before = [p.detach().clone() for p in params]
    state = _state_snapshot(opt)
    grads[1][5][2, 3] = bad
    _set(params, grads[1])
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    after = _state_snapshot(opt)
    assert after.keys() == state.keys()
    for k in state:
        for key in state[k]:
            assert torch.equal(after[k][key], state[k][key]), key
    _set(params, grads[2])
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in params)


def test_nonfinite_raise():
    params = _params()
    opt = DASH(params, lr=0.1, block_size=4, nonfinite="raise")
    grads = _grads(steps=1)[0]
    grads[1][0] = float("nan")
    _set(params, grads)
    with pytest.raises(FloatingPointError, match=re.escape("shape (5,)")):
        opt.step()


def test_huge_finite_gradients_are_not_skipped():
    # The fast check sums each stack; 16 entries of 3e38 overflow that sum to inf although every
    # entry is finite, so the exact elementwise check must clear the step.
    w = torch.zeros(4, 4, requires_grad=True)
    opt = DASH([w], lr=0.1, block_size=4, nonfinite="raise")
    w.grad = torch.full((4, 4), 3e38)
    opt.step()
    assert opt.skipped_steps == 0 and int(opt.state[w]["step"]) == 1
    assert torch.isfinite(w).all()  # (its squares overflow too: the factor root fails and is counted)


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


def test_root_failure_from_huge_gradient_ndb():
    w = torch.randn(6, 6, requires_grad=True)
    opt = DASH([w], lr=0.1, block_size=6, precondition_frequency=1)
    w.grad = torch.randn(6, 6)
    opt.step()
    w.grad = torch.full((6, 6), 3e38)  # g gᵀ overflows to inf
    opt.step()
    assert opt.root_failures >= 1
    assert torch.isfinite(opt.state[w]["left_root.0"]).all()


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
    params, fresh_params = _params(), _params()
    opt = DASH(params, lr=0.1, block_size=4, stacking=stacking)
    fresh = DASH(fresh_params, lr=0.1, block_size=4, stacking=stacking)
    before = [p.detach().clone() for p in params]
    bad = _grads(steps=1, seed=7)[0]
    bad[3][0, 0] = float("nan")
    _set(params, bad)
    opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
        assert int(opt.state.get(p, {}).get("step", 0)) == 0
    good = _grads(steps=2)
    _train(opt, params, good)
    _train(fresh, fresh_params, good)
    for p, q in zip(params, fresh_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("stacking", STACKINGS)
def test_add_param_group_mid_run(stacking):
    a, b = _params(seed=8), _params(seed=8)
    extra = torch.randn(7, 5, requires_grad=True)
    opt_a = DASH(a, lr=0.1, block_size=4, stacking=stacking, root_method="eigh", root_eps=1e-4)
    opt_b = DASH(b, lr=0.1, block_size=4, stacking=stacking, root_method="eigh", root_eps=1e-4)
    extra_before = extra.detach().clone()
    for k, step_grads in enumerate(_grads(steps=4)):
        if k == 2:
            opt_a.add_param_group({"params": [extra], "lr": 0.5})
        _set(a, step_grads)
        _set(b, step_grads)
        if k >= 2:
            extra.grad = torch.randn(7, 5)
        opt_a.step()
        opt_b.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert int(opt_a.state[extra]["step"]) == 2
    assert not torch.equal(extra.detach(), extra_before)


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
