"""Numerics that hold: one update in every layout, no overflow from finite gradients, no silent
freeze, and checked state.

Each test reproduces a case that once failed. The layout tests compare with ``torch.equal``: every
block's power-iteration start vectors are a function of the block's place in its parameter and the
step alone, and the iterative solvers apply the same per-matrix operations whatever the batch, so
with one torch thread the three stacking modes give the same bits. The CPU's batched eigh is not
batch-invariant (LAPACK is called per matrix but the reductions around it are blocked by batch),
so eigh is held to 1e-4 of the largest update per parameter, the bound the README promises.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_grads, make_params, run_steps, set_grads

from dash_shampoo import DASH
from dash_shampoo.preconditioner import GRAFTINGS

#: The shapes of the layout report: edge and corner blocks, 3-D, 1-D, a size-1 dimension, a scalar.
LAYOUT_SHAPES = [(37, 23), (5, 3, 7), (100,), (1,), (2, 64), (16, 16), (3, 1, 40), ()]


def layout_run(stacking: str, steps: int = 4, **options) -> list[torch.Tensor]:
    params = make_params(LAYOUT_SHAPES)
    opt = DASH(params, lr=1e-2, block_size=16, stacking=stacking, **options)
    run_steps(opt, params, make_grads(LAYOUT_SHAPES, steps=steps))
    return params


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    """max over parameters of max|a - b| / max|a - start|: the difference per unit of update."""
    worst = 0.0
    for x, y, s in zip(a, b, start):
        x, y = x.detach(), y.detach()
        update = (x - s).abs().max()
        if update > 0:
            worst = max(worst, float((x - y).abs().max() / update))
    return worst


# ---------------------------------------------------------------------------------------------
# 1, 2: one update in every layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("root_method", ["ndb", "newton", "chebyshev"])
@pytest.mark.parametrize("scaling", ["power_multi", "power", "fro", "bound"])
def test_stacking_modes_are_bitwise_equal_with_iterative_solvers(single_thread, root_method, scaling):
    expected = layout_run("global", root_method=root_method, scaling=scaling)
    for stacking in ("layer", "none"):
        for x, y in zip(layout_run(stacking, root_method=root_method, scaling=scaling), expected):
            assert torch.equal(x, y), (stacking, tuple(x.shape))


def test_stacking_modes_agree_with_eigh_within_1e_4_of_the_update(single_thread):
    start = make_params(LAYOUT_SHAPES)
    expected = layout_run("global", root_method="eigh")
    for stacking in ("layer", "none"):
        assert relative_difference(layout_run(stacking, root_method="eigh"), expected, start) <= 1e-4


# ---------------------------------------------------------------------------------------------
# 3: finite gradients never make the parameters or the state non-finite
# ---------------------------------------------------------------------------------------------


def state_is_finite(opt: DASH) -> bool:
    return all(
        bool(torch.isfinite(v).all())
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )


def hostile_run(
    grads: list[torch.Tensor], ordinary: int = 3, lr: float = 1e-2, **options
) -> tuple[DASH, list]:
    """A (20, 13) parameter with block_size 16: ``grads`` in turn, then ``ordinary`` standard normal
    gradients; returns the optimizer and the parameter's value after each step."""
    generator = torch.Generator().manual_seed(3)
    p = torch.randn(20, 13, generator=generator).requires_grad_()
    opt = DASH([p], lr=lr, block_size=16, **options)
    history = []
    for g in [*grads, *(torch.randn(20, 13, generator=generator) for _ in range(ordinary))]:
        set_grads([p], [g])
        opt.step()
        history.append(p.detach().clone())
    return opt, history


def randn(scale: float) -> torch.Tensor:
    return torch.randn(20, 13, generator=torch.Generator().manual_seed(7)) * scale


ZERO = torch.zeros(20, 13)


@pytest.mark.parametrize(
    ("grads", "options"),
    [
        ([randn(3e18)], dict(grafting="sgd")),
        ([ZERO, randn(1e19)], dict(root_eps=0.0, scaling="fro", precondition_frequency=1)),
        ([ZERO, randn(1e30)], dict(matrix_root=2)),
        ([randn(1e30)], {}),
    ],
    ids=["sgd-3e18", "ndb-paper-1e19", "matrix-root-2-1e30", "default-1e30"],
)
def test_huge_finite_gradient_keeps_params_and_state_finite(single_thread, grads, options):
    opt, history = hostile_run(grads, **options)
    assert all(bool(torch.isfinite(h).all()) for h in history)
    assert state_is_finite(opt)
    # The ordinary steps after the hostile ones move the parameter, every one of them.
    for before, after in zip(history[len(grads) - 1 : -1], history[len(grads) :]):
        assert not torch.equal(before, after)


def test_overflowing_statistics_are_skipped_and_counted(single_thread):
    """|g| = 1e30 overflows g gᵀ in fp32 however it is computed: the block's statistics update is
    skipped (its state is put back), its update is zero, and skipped_blocks counts it."""
    opt, history = hostile_run([randn(1.0), randn(1e30)], ordinary=1)
    assert opt.skipped_blocks == 2  # the (20, 13) parameter has two (16, 13) and (4, 13) blocks
    assert torch.equal(history[0], history[1])
    assert opt.skipped_steps == 0


def test_representable_sgd_graft_norm_does_not_overflow(single_thread):
    """3e18 · randn: g² overflows fp32 but the graft norm ‖g‖ (about 5e19) does not; scaled before
    squaring, the step matches the one of the gradient divided by 1e18 (the direction is
    scale-invariant, the sgd graft multiplies by ‖g‖)."""
    big = hostile_run([randn(3e18)], ordinary=0, grafting="sgd", lr=1e-20)
    small = hostile_run([randn(3.0)], ordinary=0, grafting="sgd", lr=1e-2)
    start = torch.randn(20, 13, generator=torch.Generator().manual_seed(3))
    # The factors of the two differ by 1e36 and are rounded differently: 1e-4 of the update.
    assert relative_difference([big[1][-1]], [small[1][-1]], [start]) <= 1e-4


# ---------------------------------------------------------------------------------------------
# 4: no silent freeze
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("root_method", ["ndb", "newton"])
def test_no_silent_freeze_after_a_zero_gradient_without_ridge(single_thread, root_method):
    """root_eps=0 and a zero first gradient once gave a root of ~1.75e11 that was accepted, and the
    parameter never moved (root_failures 0). Every later step must move it, or the root must be
    refused and counted."""
    opt, history = hostile_run(
        [ZERO], ordinary=8, root_eps=0.0, scaling="fro", precondition_frequency=1, root_method=root_method
    )
    moved = [not torch.equal(a, b) for a, b in itertools.pairwise(history)]
    assert all(moved) or opt.root_failures > 0
    assert all(moved)


# ---------------------------------------------------------------------------------------------
# Bounded fuzz: every grafting and solver against hostile gradients
# ---------------------------------------------------------------------------------------------


def hostile_gradients(generator: torch.Generator) -> list[tuple[str, torch.Tensor]]:
    g = torch.randn(20, 13, generator=generator)
    u, v = torch.randn(20, 1, generator=generator), torch.randn(1, 13, generator=generator)
    nan = g.clone()
    nan[3, 4] = float("nan")
    inf = g.clone()
    inf[0, 0] = float("inf")
    return [
        ("zeros", torch.zeros(20, 13)),
        ("tiny", g * 1e-30),
        ("huge", g * 1e30),
        ("rank-1", u @ v),
        ("repeated", g.clone()),
        ("repeated", g.clone()),
        ("nan", nan),
        ("inf", inf),
    ]


@pytest.mark.parametrize("grafting", GRAFTINGS)
@pytest.mark.parametrize("root_method", ["eigh", "ndb", "newton", "chebyshev"])
def test_fuzz_hostile_gradients_never_make_state_non_finite(single_thread, grafting, root_method):
    """Fixed seed, 6 sequences of 4 hostile gradients each (drawn from the list above), each
    followed by 2 ordinary steps that must move the parameter; parameters and state stay finite."""
    generator = torch.Generator().manual_seed(11)
    kinds = hostile_gradients(generator)
    for _ in range(6):
        picks = torch.randint(len(kinds), (4,), generator=generator).tolist()
        hostile = [kinds[i][1] for i in picks]
        opt, history = hostile_run(
            hostile, ordinary=2, grafting=grafting, root_method=root_method, precondition_frequency=2
        )
        names = [kinds[i][0] for i in picks]
        assert all(bool(torch.isfinite(h).all()) for h in history), names
        assert state_is_finite(opt), names
        for before, after in zip(history[-3:-1], history[-2:]):
            assert not torch.equal(before, after), names


# ---------------------------------------------------------------------------------------------
# 5: checkpoints and changed options are checked
# ---------------------------------------------------------------------------------------------


def trained(shape: tuple[int, ...], **options) -> DASH:
    p = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
    opt = DASH([p], lr=1e-2, block_size=16, **options)
    run_steps(opt, [p], make_grads([shape], steps=2))
    return opt


def loads_into(shape: tuple[int, ...], state_dict: dict) -> tuple[DASH, torch.Tensor]:
    p = torch.zeros(shape, requires_grad=True)
    opt = DASH([p], lr=1e-2, block_size=16)
    opt.load_state_dict(state_dict)
    return opt, p


def edited(state_dict: dict, edit) -> dict:
    """A copy of ``state_dict`` with ``edit`` applied to parameter 0's state."""
    copy = {
        "state": {k: dict(v) for k, v in state_dict["state"].items()},
        "param_groups": state_dict["param_groups"],
    }
    edit(copy["state"][0])
    return copy


@pytest.mark.parametrize(
    ("saved", "into", "message"),
    [
        (
            (48, 16),
            (16, 48),
            r"parameter 0 of group 0 was saved for a parameter of shape \(48, 16\), not \(16, 48\)",
        ),
        (
            (32, 16),
            (48, 16),
            r"parameter 0 of group 0 was saved for a parameter of shape \(32, 16\), not \(48, 16\)",
        ),
    ],
)
def test_state_of_another_shape_is_refused(saved, into, message):
    state_dict = trained(saved).state_dict()
    with pytest.raises(ValueError, match=message):
        loads_into(into, state_dict)


def test_wrong_shaped_and_missing_entries_are_refused_and_nothing_changes():
    state_dict = trained((48, 16)).state_dict()
    cases = [
        (
            lambda s: s.__setitem__("left.0", torch.zeros(3, 8, 8)),
            r"'left.0' of shape \(3, 8, 8\).*gives \(3, 16, 16\)",
        ),
        (lambda s: s.pop("left.0"), r"lacks 'left.0' \(a tensor of shape \(3, 16, 16\)"),
        (lambda s: s.pop("step"), r"parameter 0 of group 0 \(shape \(48, 16\)\) has no 'step'"),
        (lambda s: s.__setitem__("moment.0", 1.0), r"'moment.0' of shape float"),
    ]
    for edit, message in cases:
        p = torch.zeros(48, 16, requires_grad=True)
        opt = DASH([p], lr=1e-2, block_size=16)
        before = opt.state_dict()
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(edited(state_dict, edit))
        assert opt.state_dict() == before  # nothing was loaded


def test_options_changed_in_param_groups_are_checked_at_the_next_step():
    p = torch.randn(8, 8, requires_grad=True)
    opt = DASH([p], lr=1e-2, block_size=4)
    p.grad = torch.randn(8, 8)
    opt.step()
    opt.param_groups[0]["block_size"] = 0
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"block_size must be .*got 0"):
        opt.step()
    assert torch.equal(p, before)
    opt.param_groups[0]["block_size"] = 4
    opt.param_groups[0]["root_method"] = "svd"
    with pytest.raises(ValueError, match="root_method must be one of"):
        opt.step()
    opt.param_groups[0]["root_method"] = "ndb"
    opt.param_groups[0]["matrix_root"] = 3  # valid until the method changes to ndb: checked together
    with pytest.raises(ValueError, match="matrix_root must be 1 or a power of two"):
        opt.step()
    opt.param_groups[0]["matrix_root"] = None
    opt.step()
    assert not torch.equal(p, before)


def test_a_tensor_lr_is_never_read_on_the_host(monkeypatch):
    lr = torch.tensor(1e-2)
    p = torch.randn(8, 8, requires_grad=True)
    opt = DASH([p], lr=lr, block_size=4)
    p.grad = torch.randn(8, 8)

    def no_read(*args, **kwargs):
        raise AssertionError("the tensor lr was read on the host")

    monkeypatch.setattr(torch.Tensor, "item", no_read)
    monkeypatch.setattr(torch.Tensor, "__float__", no_read)
    opt.step()
    lr.fill_(2e-2)  # the same tensor, a new value: not checked again, never read
    opt.step()
    opt.param_groups[0]["lr"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"lr as a tensor must have one element; got shape \(2,\)"):
        opt.step()


def counted() -> DASH:
    opt, _ = hostile_run([randn(1.0), randn(1e30)], ordinary=0)
    opt.skipped_steps = 3
    return opt


def test_counters_survive_a_state_dict_round_trip():
    opt = counted()
    assert opt.skipped_blocks == 2
    state_dict = opt.state_dict()
    p = torch.zeros(20, 13, requires_grad=True)
    fresh = DASH([p], lr=1e-2, block_size=16)
    fresh.load_state_dict(state_dict)
    assert (fresh.skipped_steps, fresh.skipped_blocks, fresh.root_failures) == (3, 2, opt.root_failures)
    assert "skipped_steps" not in fresh.param_groups[0]  # counters are not options


def test_distributed_checkpoint_state_init_does_not_count_as_a_step():
    """get_optimizer_state_dict on a fresh optimizer runs a zero-gradient, lr = 0 step to create the
    state: it must not consume the step count or the first refresh."""
    pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    runs = []
    for init in (True, False):
        model = torch.nn.Linear(13, 20, bias=False)
        model.weight.data = torch.randn(20, 13, generator=torch.Generator().manual_seed(0))
        opt = DASH(model.parameters(), lr=1e-2, block_size=16, precondition_frequency=3)
        if init:
            state = get_optimizer_state_dict(model, opt)["state"]
            assert int(state["weight"]["step"]) == 0 and "left.0" in state["weight"]
        for k in range(4):
            model.weight.grad = randn(1.0) + k
            opt.step()
        runs.append(model.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_counters_survive_torch_distributed_checkpoint(tmp_path):
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = torch.nn.Linear(13, 20, bias=False)
    opt = DASH(model.parameters(), lr=1e-2, block_size=16)
    for scale in (1.0, 1e30):
        model.weight.grad = randn(scale)
        opt.step()
    opt.skipped_steps = 3
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))

    fresh_model = torch.nn.Linear(13, 20, bias=False)
    fresh_model.load_state_dict(model.state_dict())
    fresh = DASH(fresh_model.parameters(), lr=1e-2, block_size=16)
    template = {"optim": get_optimizer_state_dict(fresh_model, fresh)}
    dcp.load(template, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(fresh_model, fresh, template["optim"])
    assert (fresh.skipped_steps, fresh.skipped_blocks) == (3, 2)
    for o, m in ((opt, model), (fresh, fresh_model)):
        m.weight.grad = randn(1.0)
        o.step()
    assert torch.equal(model.weight, fresh_model.weight)
