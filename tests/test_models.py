"""The shared model definition: sizes, and parameter shapes read on the meta device."""

from __future__ import annotations

import pytest
import torch

from dash_shampoo.models import SIZES, Llama, model_config, parameter_shapes


@pytest.mark.parametrize("size", ["micro", "tiny", "mini"])
def test_meta_shapes_are_the_real_model_shapes(size: str) -> None:
    real = Llama(SIZES[size])
    assert parameter_shapes(SIZES[size]) == [(name, tuple(p.shape)) for name, p in real.named_parameters()]


def test_shapes_of_the_largest_size_cost_no_memory() -> None:
    shapes = dict(parameter_shapes(SIZES["350m"]))
    assert shapes["embedding.weight"] == (32000, 1024)
    assert shapes["blocks.0.attention.wqkv.weight"] == (3 * 1024, 1024)  # fused q, k, v
    assert shapes["blocks.23.mlp.w2.weight"] == (1024, 2816)
    assert not any("wq." in name or "wk." in name for name in shapes)


def test_a_meta_model_draws_no_weights() -> None:
    with torch.device("meta"):
        model = Llama(SIZES["micro"])
    assert all(p.is_meta for p in model.parameters())


def test_size_vocabulary_is_a_default_the_data_replaces() -> None:
    assert model_config("mini").vocab_size == 4096 and model_config("124m").vocab_size == 32000
    assert model_config("124m", vocab_size=256).padded_vocab == 256
    # the trainer's tiny model is unchanged by the sizes the benchmarks added
    tiny = model_config("tiny")
    assert (tiny.vocab_size, tiny.d_model, tiny.n_layer, tiny.n_head, tiny.hidden) == (256, 128, 4, 4, 384)
