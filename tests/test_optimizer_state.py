"""DASH state: dtypes, state_dict round trips across stacking modes, deepcopy, pickle, hooks."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import STACKINGS, make_grads, make_params, run_steps, set_grads

from dash_shampoo import DASH

# ----------------------------------------------------------------------------------------------
# dtypes, state_dict, deepcopy, pickle, hooks
# ----------------------------------------------------------------------------------------------


def _float_state_dtypes(opt):
    return {v.dtype for st in opt.state.values() for k, v in st.items() if k not in ("step", "shape")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_keep_fp32_state(dtype):
    params = make_params(dtype=dtype)
    before = [p.detach().clone() for p in params]
    opt = DASH(params, lr=0.05, block_size=4)
    run_steps(opt, params, make_grads(steps=3))
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
    grads = make_grads(steps=6)
    ref = make_params(dtype=dtype)
    opt = DASH(_groups(ref), stacking=save_stacking, **options)
    run_steps(opt, ref, grads)

    params = make_params(dtype=dtype)
    first = DASH(_groups(params), stacking=save_stacking, **options)
    run_steps(first, params, grads[:3])
    saved = _save_load(first.state_dict())
    clones = [p.detach().clone().requires_grad_() for p in params]
    second = DASH(_groups(clones), stacking=load_stacking, **options)
    second.load_state_dict(saved)
    run_steps(second, clones, grads[3:])
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
    params = make_params()
    opt = DASH(params, lr=0.1, block_size=4)
    run_steps(opt, params, make_grads(steps=2))
    saved = _save_load(opt.state_dict())
    clones = [p.detach().clone().requires_grad_() for p in params]
    other = DASH(clones, lr=0.1, block_size=3)
    other.load_state_dict(saved)  # like torch.optim, the saved group options win
    assert other.param_groups[0]["block_size"] == 4
    other.param_groups[0]["block_size"] = 3  # the blocks in the state no longer match
    set_grads(clones, make_grads(steps=1)[0])
    with pytest.raises(ValueError, match="load it with the block_size it was saved with"):
        other.step()


def test_load_state_dict_hooks_follow_torch():
    """A pre-hook sees the whole saved state and may replace the dict; a post-hook sees the
    loaded state (as in torch.optim.Optimizer)."""
    params = make_params()
    opt = DASH(params, lr=0.1, block_size=4)
    run_steps(opt, params, make_grads(steps=2))
    saved = opt.state_dict()
    other = DASH([p.detach().clone().requires_grad_() for p in params], lr=0.1, block_size=4)
    seen = {}

    def pre(optimizer, state_dict):
        seen["pre"] = len(state_dict["state"])
        replaced = {**state_dict, "param_groups": [{**g, "lr": 0.5} for g in state_dict["param_groups"]]}
        return replaced

    def post(optimizer):
        seen["post"] = sum("step" in st for st in optimizer.state.values())

    other.register_load_state_dict_pre_hook(pre)
    other.register_load_state_dict_post_hook(post)
    other.load_state_dict(saved)
    assert seen == {"pre": len(saved["state"]), "post": len(saved["state"])}
    assert other.param_groups[0]["lr"] == 0.5


def test_load_state_dict_with_other_groups_raises():
    params = make_params()
    opt = DASH(params, lr=0.1, block_size=4)
    run_steps(opt, params, make_grads(steps=1))
    other = DASH([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, block_size=4)
    with pytest.raises(ValueError, match=r"groups of \[7\] parameters, this optimizer of \[2, 5\]"):
        other.load_state_dict(opt.state_dict())


def test_state_dict_is_deterministic():
    sds = []
    for _ in range(2):
        params = make_params()
        opt = DASH(params, lr=0.1, block_size=4)
        run_steps(opt, params, make_grads(steps=3))
        sds.append(opt.state_dict())
    assert sds[0]["param_groups"] == sds[1]["param_groups"]
    assert sds[0]["state"].keys() == sds[1]["state"].keys()
    for k, st in sds[0]["state"].items():
        assert st.keys() == sds[1]["state"][k].keys()
        for key, v in st.items():
            assert torch.equal(v, sds[1]["state"][k][key]), key


def test_old_state_dict_without_new_group_keys_loads():
    params = make_params()
    opt = DASH(params, lr=0.1, block_size=4)
    run_steps(opt, params, make_grads(steps=2))
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["one_dim"]
        del group["matrix_root"]
    clones = [p.detach().clone().requires_grad_() for p in params]
    other = DASH(clones, lr=0.1, block_size=4)
    other.load_state_dict(saved)
    assert other.param_groups[0]["one_dim"] == "shampoo"
    run_steps(other, clones, make_grads(steps=1))


def test_deepcopy_and_pickle_continue_identically():
    params = make_params()
    opt = DASH(params, lr=0.05, block_size=4)
    grads = make_grads(steps=5)
    run_steps(opt, params, grads[:2])
    copied_params, copied_opt = copy.deepcopy((params, opt))
    pickled_params, pickled_opt = pickle.loads(pickle.dumps((params, opt)))
    for ps, o in ((params, opt), (copied_params, copied_opt), (pickled_params, pickled_opt)):
        run_steps(o, ps, grads[2:])
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
