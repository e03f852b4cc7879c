"""Runs, stacks and banks (``dash_shampoo.stacks``): block gather/scatter, row bookkeeping, buffer
binding and the refresh rows of a bank. All exact: only copies and one subtraction per element."""

from __future__ import annotations

import torch

from dash_shampoo.blocking import Blocking
from dash_shampoo.stacks import Bank, BlockRun, Stack, bind


def _run(shape, block_size, region, first=0, count=None):
    blocking = Blocking.build(shape, block_size, "shampoo")
    total = blocking.regions[region].count
    param = torch.arange(float(torch.Size(shape).numel())).view(shape)
    return BlockRun(param, blocking, region, first, total if count is None else count)


def test_whole_and_partial_runs_gather_the_blocks_of_the_region():
    x = torch.randn(10, 12)
    blocking = Blocking.build(x.shape, 4, "shampoo")
    expected = blocking.to_blocks(x)  # full (2x3 grid of 4x4), right edge none, bottom (1x3 of 2x4)
    for region, blocks in enumerate(expected):
        whole = BlockRun(x, blocking, region, 0, blocks.shape[0])
        out = torch.empty_like(blocks)
        whole.gather(x, out)
        assert torch.equal(out, blocks)
        if blocks.shape[0] > 2:
            part = BlockRun(x, blocking, region, 1, 2)
            out = torch.empty(2, *blocks.shape[1:])
            part.gather(x, out)
            assert torch.equal(out, blocks[1:3])


def test_subtract_from_touches_exactly_the_runs_blocks():
    x = torch.arange(120.0).view(10, 12)  # integers: the subtraction is exact
    blocking = Blocking.build(x.shape, 4, "shampoo")
    target = x.clone()
    run = BlockRun(x, blocking, 0, 2, 3)  # blocks 2, 3, 4 of the 2x3 grid of full blocks
    run.subtract_from(target, torch.ones(3, 4, 4))
    diff = blocking.to_blocks(x - target)
    assert torch.equal(diff[0][2:5], torch.ones(3, 4, 4))
    assert torch.equal(diff[0][[0, 1, 5]], torch.zeros(3, 4, 4)) and torch.equal(
        diff[1], torch.zeros_like(diff[1])
    )


def test_stack_rows_and_views():
    stack = Stack((4, 4), group_index=0, scope=(0,))
    a, b = _run((8, 8), 4, 0, 0, 3), _run((4, 4), 4, 0)
    stack.add(a)
    stack.add(b)
    assert (a.row, b.row, stack.rows) == (0, 3, 4)
    tensor = torch.arange(4.0).view(4, 1, 1)
    assert stack.of(b, tensor).flatten().tolist() == [3.0]
    assert stack.roots("left") is None and stack.factors("right") is None  # no bank bound yet
    bank = Bank(4, 4, 0)
    bank.factors, bank.roots = torch.randn(6, 4, 4), torch.randn(6, 4, 4)
    stack.left = (bank, 2)
    assert torch.equal(stack.factors("left"), bank.factors[2:6])
    assert torch.equal(stack.roots("left"), bank.roots[2:6])


def test_gather_gradients_zeros_a_missing_gradient_and_negates_for_maximize():
    stack = Stack((2, 2), 0, (0,))
    with_grad, without = _run((2, 2), 2, 0), _run((2, 2), 2, 0)
    with_grad.param.grad = torch.ones(2, 2)
    stack.add(with_grad)
    stack.add(without)
    stack.grad = torch.full((2, 2, 2), 7.0)
    stack.gather_gradients(maximize=True)
    assert torch.equal(stack.grad, torch.stack([-torch.ones(2, 2), torch.zeros(2, 2)]))


def test_bind_views_one_entry_and_concatenates_several():
    made = []

    def make(value):
        def _make():
            made.append(value)
            return torch.full((3, 2, 2), float(value))

        return _make

    alone: dict = {}
    buffer = bind([(alone, "left.0", 1, 2, make(1))])
    assert made == [1] and buffer.data_ptr() == alone["left.0"][1:].data_ptr()  # a view, no copy
    a, b = {"left.0": torch.zeros(2, 2, 2)}, {}
    buffer = bind([(a, "left.0", 0, 2, make(2)), (b, "left.0", 0, 3, make(3))])
    assert made == [1, 3]  # only the missing tensor was made
    assert buffer.shape == (5, 2, 2)
    buffer.fill_(5.0)  # the state tensors are now views of the buffer
    assert torch.equal(a["left.0"], torch.full((2, 2, 2), 5.0))
    assert torch.equal(b["left.0"], torch.full((3, 2, 2), 5.0))


def test_bank_due_rows_per_entry_step_and_cache():
    bank = Bank(4, 4, 0)
    first, second = _run((8, 4), 4, 0), _run((4, 4), 4, 0)  # 2 blocks, then 1
    bank.add(first, "left", range(0, 2))
    bank.add(second, "left", range(2, 3))
    bank.factors = torch.zeros(3, 4, 4)
    assert bank.due_rows([1, 1], start=1, frequency=3, stagger=False).rows == "all"
    assert bank.due_rows([2, 2], start=1, frequency=3, stagger=False) is None
    assert bank.due_rows([3, 1], start=1, frequency=3, stagger=False).rows == "all"  # a multiple, the start
    due = bank.due_rows([3, 2], start=1, frequency=3, stagger=False)
    assert due.rows.tolist() == due.mine.tolist() == [0, 1] and due.by_rank is None
    # Staggered: ordinal k is refreshed when t mod 3 == k mod 3 (after the start step).
    assert bank.due_rows([4, 4], start=1, frequency=3, stagger=True).rows.tolist() == [1]
    assert bank.due_rows([7, 7], start=1, frequency=3, stagger=True).rows.tolist() == [
        1
    ]  # same phase: cached
    assert len(bank._due) == 5
    assert [list(rows) for _, rows in bank.rows_by_run()] == [[0, 1], [2]]


def test_bank_due_rows_split_by_owner():
    bank = Bank(4, 4, 0, owners=[0, 1, 1], rank=1, world_size=3)
    bank.add(_run((8, 4), 4, 0), "left", range(0, 2))
    bank.add(_run((4, 4), 4, 0), "left", range(2, 3))
    bank.factors = torch.zeros(3, 4, 4)
    due = bank.due_rows([1, 1], start=1, frequency=3, stagger=False)
    assert due.rows == "all" and due.mine.tolist() == [1, 2]
    assert [(None if r is None else r.tolist(), n) for r, n in due.by_rank] == [
        ([0], 1),
        ([1, 2], 2),
        (None, 0),
    ]
    due = bank.due_rows([3, 2], start=1, frequency=3, stagger=False)  # rows 0 and 1 only
    assert due.rows.tolist() == [0, 1] and due.mine.tolist() == [1]
