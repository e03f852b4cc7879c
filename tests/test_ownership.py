"""Who owns which blocks: ``split_costs``, ``Ownership`` and ``block_cost`` (pure functions, no ranks)."""

from __future__ import annotations

import itertools

import pytest

from dash_shampoo.distributed import Ownership, block_cost, split_costs


@pytest.mark.parametrize("parts", [1, 2, 3, 5])
@pytest.mark.parametrize(
    "costs",
    [
        [1.0] * 12,
        [5.0, 1.0, 1.0, 1.0, 9.0, 2.0, 2.0],
        [100.0, 1.0, 1.0, 1.0, 1.0],  # one block dominates
        [0.0, 0.0, 0.0],  # no cost at all: blocks are shared by count
        [3.0],  # fewer blocks than parts: some segments are empty
    ],
)
def test_split_costs_cuts_contiguous_segments_within_one_block_of_an_equal_share(costs, parts):
    bounds = split_costs(costs, parts)
    assert len(bounds) == parts + 1 and bounds[0] == 0 and bounds[-1] == len(costs)
    assert bounds == sorted(bounds)  # contiguous, in order, every block exactly once
    share = sum(costs) / parts
    for a, b in itertools.pairwise(bounds):
        # No segment exceeds its share by more than the cost of one block (the one at its edge).
        assert sum(costs[a:b]) <= share + max(costs) + 1e-9


def test_split_costs_equal_costs_split_evenly():
    assert split_costs([1.0] * 12, 3) == [0, 4, 8, 12]
    assert split_costs([0.0] * 6, 2) == [0, 3, 6]


def test_ownership_owner_chunks_and_imbalance():
    costs = [1.0] * 10
    ownership = Ownership([0, 4, 7, 10], costs)
    assert [ownership.owner_of(i) for i in range(10)] == [0] * 4 + [1] * 3 + [2] * 3
    # Blocks 3..8 of the sequence: one from rank 0, three from rank 1, two from rank 2 (first relative).
    assert ownership.chunks(3, 6) == [(0, 0, 1), (1, 1, 3), (2, 4, 2)]
    assert ownership.chunks(7, 3) == [(2, 0, 3)]
    assert ownership.imbalance() == pytest.approx(4 / (10 / 3))
    assert Ownership([0, 5, 10], costs).imbalance() == 1.0


def test_ownership_with_empty_segments():
    ownership = Ownership([0, 1, 1, 1], [2.0])  # rank 0 owns the only block
    assert ownership.chunks(0, 1) == [(0, 0, 1)]
    assert ownership.imbalance() == pytest.approx(2.0 / (2.0 / 3))


def test_block_cost_is_the_refresh_share():
    # A 4x6 block with both sides preconditioned, refreshed every 10 steps by a 54-matmul solver:
    # 54 · 2 · (4³ + 6³) / 10 (the per-step products are done by every rank: they do not count).
    assert block_cost([4, 6], 10, 54) == pytest.approx(54 * 2 * (64 + 216) / 10)
    assert block_cost([8], 1, 20) == pytest.approx(20 * 2 * 512)
    assert block_cost([], 1, 20) == 0.0
