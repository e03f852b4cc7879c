"""The layout passes (``dash_shampoo.layout``) on plain parameter groups, without an optimizer.

Everything here is bookkeeping (which block goes where, which tensor views which buffer), so every
check is exact.
"""

from __future__ import annotations

import pytest
import torch
from conftest import STACKINGS

from dash_shampoo import DASH, layout
from dash_shampoo.blocking import Blocking

SHAPES = [(10, 12), (12, 12), (7,), (), (3, 2, 4)]  # block 4: full, edge and corner blocks, a vector


def _groups(shapes=SHAPES, **options):
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    group = {**DASH([torch.zeros(1, requires_grad=True)]).defaults, "block_size": 4, **options}
    return [{**group, "params": params}]


def _active(params) -> layout.Active:
    return {id(p): p for p in params}


def _build(groups, stacking="global", active=None, rank=0, world_size=1, state=None):
    state = {} if state is None else state
    active = _active(groups[0]["params"] if active is None else active)
    regions = layout.collect_regions(groups, state, active)
    return layout.build(groups, state, regions, stacking, rank, world_size), state


def test_collect_regions_is_canonical_and_changes_nothing():
    groups = _groups()
    params = groups[0]["params"]
    state: dict = {}
    regions = layout.collect_regions(groups, state, _active([params[0], params[2]]))
    assert state == {}
    assert regions.params == [params[0], params[2]]
    assert [(e.param_index, e.region, e.used) for e in regions.entries] == [
        (0, 0, True), (0, 1, True),  # (10, 12): 2x3 full blocks and a 1x3 bottom edge
        (1, 0, False),  # (12, 12): 3x3 full blocks
        (2, 0, True), (2, 1, True),  # (7,): a column of one 4-chunk and one 3-chunk
        (3, 0, False),  # (): one 1x1 block
        (4, 0, False),  # (3, 2, 4) -> (3, 8): a 1x2 grid of 3x4 corner blocks
    ]  # fmt: skip
    assert regions.fingerprint[-1] == layout.signature(groups)


@pytest.mark.parametrize("stacking", STACKINGS)
def test_runs_fill_their_stacks_and_banks_row_by_row(stacking):
    groups = _groups()
    plan, _ = _build(groups, stacking)
    for stack in plan.stacks:
        rows = 0
        for run in stack.runs:
            assert run.row == rows and run.block == stack.shape
            rows += run.count
        assert rows == stack.rows == stack.grad.shape[0]
        for side in ("left", "right"):
            factors = stack.factors(side)
            if factors is not None:
                assert factors.shape[0] == stack.rows
    for bank in plan.banks:
        assert [entry.row for entry in bank.entries] == [
            sum(e.run.count for e in bank.entries[:k]) for k in range(len(bank.entries))
        ]
        assert bank.factors.shape == (bank.rows, bank.size, bank.size) == bank.roots.shape
        assert torch.equal(bank.roots, torch.eye(bank.size).expand_as(bank.roots))
    # Every block of every parameter is in exactly one stack.
    blocks = sum(stack.rows for stack in plan.stacks)
    assert blocks == sum(Blocking.build(p.shape, 4, "shampoo").num_blocks for p in groups[0]["params"])
    if stacking == "none":
        assert all(stack.rows == 1 for stack in plan.stacks)
    if stacking == "global":  # one stack per block shape
        assert len({stack.shape for stack in plan.stacks}) == len(plan.stacks)


@pytest.mark.parametrize("stacking", STACKINGS)
def test_state_tensors_are_views_of_the_buffers(stacking):
    plan, state = _build(_groups(), stacking)
    for bank in plan.banks:
        bank.factors.fill_(3.0)
    for stack in plan.stacks:
        for tensor in stack.tensors.values():
            tensor.fill_(5.0)
    for entry in state.values():
        assert int(entry["step"]) == 0
        for key, tensor in entry.items():
            if key.startswith(("left.", "right.")):
                assert torch.equal(tensor, torch.full_like(tensor, 3.0)), key
            elif key.startswith(("grad_ema.", "moment.")):
                assert torch.equal(tensor, torch.full_like(tensor, 5.0)), key


def test_factor_ordinals_do_not_depend_on_stacking():
    ordinals = {}
    for stacking in STACKINGS:
        torch.manual_seed(0)
        plan, _ = _build(_groups(), stacking)
        ordinals[stacking] = sorted(o for bank in plan.banks for o in bank.ordinals)
    assert ordinals["global"] == ordinals["layer"] == ordinals["none"] == list(range(len(ordinals["global"])))


def test_every_rank_holds_every_block_and_each_root_has_one_owner():
    groups = _groups()
    single, _ = _build(groups, "global")
    layouts = [_build(groups, "global", rank=rank, world_size=3)[0] for rank in range(3)]
    total = sum(Blocking.build(p.shape, 4, "shampoo").num_blocks for p in groups[0]["params"])
    for plan in layouts:
        assert sum(stack.rows for stack in plan.stacks) == total  # the state is replicated
        assert [bank.rows for bank in plan.banks] == [bank.rows for bank in single.banks]
    owners = [bank.owners for bank in layouts[0].banks]
    assert all([bank.owners for bank in plan.banks] == owners for plan in layouts)  # all agree
    assert {owner for rows in owners for owner in rows} == {0, 1, 2}
    # A block's factors (left and right) are refreshed by the rank that owns the block.
    for stack in layouts[0].stacks:
        sides = [loc for loc in (stack.left, stack.right) if loc is not None]
        per_side = [bank.owners[first : first + stack.rows] for bank, first in sides]
        assert all(rows == per_side[0] for rows in per_side)


def test_unused_parameters_count_in_the_ownership_but_get_no_rows():
    groups = _groups()
    params = groups[0]["params"]
    plan, state = _build(groups, active=[params[0]])
    assert plan.params == [params[0]] and set(state) == {params[0]}
    assert {run.param for stack in plan.stacks for run in stack.runs} == {params[0]}
    everything, _ = _build(groups)
    assert plan.ownership.bounds == everything.ownership.bounds  # the same cut either way
    assert plan.covers(_active([params[0]])) and not plan.covers(_active([params[0], params[1]]))


def test_save_and_restore_rows_of_some_parameters():
    groups = _groups()
    params = groups[0]["params"]
    plan, state = _build(groups)
    saved = plan.save_rows([params[1]])
    for bank in plan.banks:
        bank.factors.fill_(1.0)
    for stack in plan.stacks:
        for tensor in stack.tensors.values():
            tensor.fill_(1.0)
    plan.restore_rows(saved)
    kept, changed = ([t for k, t in state[p].items() if k.startswith("left.")] for p in params[1::-1])
    assert kept and all(torch.equal(t, torch.zeros_like(t)) for t in kept)
    assert changed and all(torch.equal(t, torch.ones_like(t)) for t in changed)


def test_saved_state_with_another_block_size_is_refused():
    groups = _groups([(8, 8)])
    p = groups[0]["params"][0]
    state = {p: {"step": torch.tensor(1), "grad_ema.0": torch.zeros(1, 8, 8)}}
    with pytest.raises(
        ValueError, match=r"'grad_ema.0' of shape \(1, 8, 8\), but block_size 4 gives \(4, 4, 4\)"
    ):
        layout.collect_regions(groups, state, _active([p]))


def test_signature_follows_the_layout_options_only():
    groups = _groups()
    before = layout.signature(groups)
    groups[0]["lr"] = 0.5  # not a layout option
    assert layout.signature(groups) == before
    groups[0]["precondition_frequency"] = 3
    assert layout.signature(groups) != before
