"""Blocking: matrix views, regions (full, edge, corner), sides, and exact cut/put-back round trips."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dash_shampoo.blocking import Blocking

SHAPES = [(), (1,), (7,), (1, 9), (16, 16), (17, 33), (33, 17), (5, 3), (4, 3, 2, 2), (1, 1, 5), (9, 1)]


@pytest.mark.parametrize("one_dim", ["shampoo", "adam"])
@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 5, 16, 17, 100])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_exact(shape, block_size, one_dim):
    plan = Blocking.build(shape, block_size, one_dim)
    x = torch.randn(shape)
    blocks = plan.to_blocks(x)
    assert len(blocks) == len(plan.regions)
    for region, b in zip(plan.regions, blocks):
        assert tuple(b.shape) == (region.count, *region.block)
    assert sum(b.numel() for b in blocks) == x.numel()
    y = plan.from_blocks(blocks)
    assert y.shape == x.shape
    assert torch.equal(y, x)
    # every element lands in exactly one block
    assert sorted(torch.cat([b.flatten() for b in blocks]).tolist()) == sorted(x.flatten().tolist())


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=4).map(tuple),
    block_size=st.integers(1, 12),
    one_dim=st.sampled_from(["shampoo", "adam"]),
)
def test_round_trip_hypothesis(shape, block_size, one_dim):
    plan = Blocking.build(shape, block_size, one_dim)
    x = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
    blocks = plan.to_blocks(x)
    assert torch.equal(plan.from_blocks(blocks), x)
    R, C = plan.matrix_shape
    assert R * C == x.numel()
    assert plan.num_blocks == sum(r.count for r in plan.regions)
    # The regions tile the matrix: their areas add up, and every block is at most block_size.
    assert sum(r.count * r.block[0] * r.block[1] for r in plan.regions) == R * C
    for r in plan.regions:
        if plan.preconditioned:
            assert 1 <= r.block[0] <= block_size and 1 <= r.block[1] <= block_size
        assert r.block[0] <= R and r.block[1] <= C
    # Each block view equals the matching block of the stack.
    matrix = x.reshape(R, C)
    for region, stack in zip(plan.regions, blocks):
        for k in range(region.count):
            assert torch.equal(region.block_view(matrix, k), stack[k])


@pytest.mark.parametrize(
    ("shape", "one_dim", "matrix_shape", "preconditioned"),
    [
        ((), "shampoo", (1, 1), False),
        ((1,), "shampoo", (1, 1), False),
        ((1, 1, 1), "shampoo", (1, 1), False),
        ((7,), "shampoo", (7, 1), True),
        ((7,), "adam", (1, 7), False),
        ((1, 9), "shampoo", (9, 1), True),
        ((9, 1), "shampoo", (9, 1), True),
        ((1, 9), "adam", (1, 9), False),
        ((1, 1, 5), "shampoo", (5, 1), True),
        ((16, 1, 1, 3), "shampoo", (16, 3), True),
        ((4, 3, 2, 2), "shampoo", (4, 12), True),
        ((4, 3, 2, 2), "adam", (4, 12), True),
        ((1, 3, 4), "shampoo", (3, 4), True),
        ((5, 3), "adam", (5, 3), True),
    ],
)
def test_matrix_view(shape, one_dim, matrix_shape, preconditioned):
    plan = Blocking.build(shape, 4, one_dim)
    assert plan.matrix_shape == matrix_shape
    assert plan.preconditioned is preconditioned
    assert plan.shape == tuple(shape)


def _regions(plan):
    return [(r.row_start, r.col_start, r.grid, r.block) for r in plan.regions]


def test_regions_full_edge_corner():
    plan = Blocking.build((17, 33), 16, "shampoo")
    assert _regions(plan) == [
        (0, 0, (1, 2), (16, 16)),  # full
        (0, 32, (1, 1), (16, 1)),  # right edge
        (16, 0, (1, 2), (1, 16)),  # bottom edge
        (16, 32, (1, 1), (1, 1)),  # corner
    ]
    assert plan.num_blocks == 6
    assert [plan.sides(r) for r in plan.regions] == [
        [("left", 16), ("right", 16)],
        [("left", 16)],
        [("right", 16)],
        [],
    ]


def test_regions_tall():
    plan = Blocking.build((33, 17), 16, "shampoo")
    assert _regions(plan) == [
        (0, 0, (2, 1), (16, 16)),
        (0, 16, (2, 1), (16, 1)),
        (32, 0, (1, 1), (1, 16)),
        (32, 16, (1, 1), (1, 1)),
    ]


@pytest.mark.parametrize("shape", [(16, 16), (32, 48)])
def test_divisible_has_only_full_blocks(shape):
    plan = Blocking.build(shape, 16, "shampoo")
    assert len(plan.regions) == 1
    assert plan.regions[0].block == (16, 16)
    assert plan.num_blocks == (shape[0] // 16) * (shape[1] // 16)


@pytest.mark.parametrize(
    ("shape", "block"), [((5, 3), (5, 3)), ((4, 3, 2, 2), (4, 12)), ((15, 15), (15, 15))]
)
def test_smaller_than_block_is_one_corner(shape, block):
    plan = Blocking.build(shape, 16, "shampoo")
    assert _regions(plan) == [(0, 0, (1, 1), block)]
    assert plan.sides(plan.regions[0]) == [("left", block[0]), ("right", block[1])]


def test_vector_chunks_left_factor_only():
    plan = Blocking.build((10,), 4, "shampoo")
    assert _regions(plan) == [(0, 0, (2, 1), (4, 1)), (8, 0, (1, 1), (2, 1))]
    assert [plan.sides(r) for r in plan.regions] == [[("left", 4)], [("left", 2)]]
    # a rest chunk of length 1 gets no factor
    plan = Blocking.build((9,), 4, "shampoo")
    assert [plan.sides(r) for r in plan.regions] == [[("left", 4)], []]


def test_vector_one_dim_adam_is_one_unpreconditioned_block():
    plan = Blocking.build((10,), 4, "adam")
    assert _regions(plan) == [(0, 0, (1, 1), (1, 10))]
    assert plan.sides(plan.regions[0]) == []
    # one_dim does not change matrices
    assert _regions(Blocking.build((10, 6), 4, "adam")) == _regions(Blocking.build((10, 6), 4, "shampoo"))


def test_scalar_and_block_size_one():
    plan = Blocking.build((), 4, "shampoo")
    assert _regions(plan) == [(0, 0, (1, 1), (1, 1))]
    assert plan.sides(plan.regions[0]) == []
    plan = Blocking.build((3, 2), 1, "shampoo")
    assert _regions(plan) == [(0, 0, (3, 2), (1, 1))]
    assert plan.sides(plan.regions[0]) == []


def test_blocks_are_row_major_over_the_grid():
    x = torch.arange(8 * 12.0).reshape(8, 12)
    plan = Blocking.build((8, 12), 4, "shampoo")
    (stack,) = plan.to_blocks(x)
    assert stack.shape == (6, 4, 4)
    for k in range(6):
        i, j = divmod(k, 3)
        assert torch.equal(stack[k], x[4 * i : 4 * i + 4, 4 * j : 4 * j + 4])


@pytest.mark.parametrize("shape", [(6, 6), (4, 4), (8, 4)])
def test_to_blocks_copies(shape):
    x = torch.randn(shape)
    plan = Blocking.build(x.shape, 4, "shampoo")
    for b in plan.to_blocks(x):
        b.zero_()
    assert (x != 0).all()


def test_from_blocks_is_a_new_tensor():
    x = torch.randn(6, 6)
    plan = Blocking.build(x.shape, 4, "shampoo")
    blocks = [b.clone() for b in plan.to_blocks(x)]
    y = plan.from_blocks(blocks)
    y.zero_()
    assert (x != 0).all()
    assert all((b != 0).all() for b in blocks)


def test_non_contiguous_input_round_trips():
    x = torch.randn(9, 7).T  # (7, 9), not contiguous
    plan = Blocking.build(x.shape, 4, "shampoo")
    assert torch.equal(plan.from_blocks(plan.to_blocks(x)), x)
