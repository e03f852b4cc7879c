"""Benchmark shape sets: taken from the real models, factor counts as DASH builds them."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from dash_shampoo import DASH
from dash_shampoo.bench.shapes import RANK_953M, SET_NAMES, factor_counts, make_parameters, shape_set
from dash_shampoo.models import SIZES, Llama


def test_953m_rank_gives_the_reference_factor_counts() -> None:
    # dash-algorithm.md §4.2: rank 0 of 8 of the 953M model at block 1024.
    assert factor_counts(RANK_953M, 1024) == {256: 2, 512: 8, 1024: 230}
    assert shape_set("953m-rank") is RANK_953M


def test_model_sets_are_the_models_parameters() -> None:
    assert set(SIZES) < set(SET_NAMES) and "953m-rank" in SET_NAMES
    mini = shape_set("mini")
    assert [shape for _, shape in mini.shapes] == [tuple(p.shape) for p in Llama(SIZES["mini"]).parameters()]
    assert ("blocks.0.attention.wqkv.weight", (768, 256)) in mini.shapes
    assert mini.numel == Llama(SIZES["mini"]).num_parameters()
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        shape_set("huge")


def test_factor_counts_match_the_factors_dash_inverts() -> None:
    shapes = shape_set("micro")
    params = make_parameters(shapes, torch.device("cpu"))
    optimizer = DASH(params, block_size=64, root_method="eigh")
    inverted: Counter[int] = Counter()

    def count(call, solve):  # type: ignore[no-untyped-def]
        inverted[call.factors.shape[-1]] += call.factors.shape[0]
        return solve()

    optimizer.register_root_hook(count)
    optimizer.step()
    assert dict(inverted) == factor_counts(shapes, 64)


def test_make_parameters_is_seeded() -> None:
    first = make_parameters(shape_set("micro"), torch.device("cpu"), seed=3)
    again = make_parameters(shape_set("micro"), torch.device("cpu"), seed=3)
    assert all(torch.equal(a, b) and torch.equal(a.grad, b.grad) for a, b in zip(first, again))
