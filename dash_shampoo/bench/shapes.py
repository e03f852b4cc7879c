"""Parameter shape sets for the benchmarks: the models of :mod:`dash_shampoo.models`, and one set that
is not a model.

A model's set is the parameters of the real ``Llama`` of that size (with the size's vocabulary),
read on the meta device (:func:`dash_shampoo.models.parameter_shapes`): an untied embedding and
head ``(V, d)``, per layer one fused ``wqkv`` ``(3d, d)``, ``wo`` ``(d, d)``, SwiGLU ``w1, w3``
``(h, d)`` and ``w2`` ``(d, h)``, two RMSNorm vectors ``(d,)``, and a final one.

``953m-rank`` is one rank's share of the paper's 953M model (d = 2048, 16 layers, SwiGLU hidden
5632, vocab 32000, untied) at block size 1024 on 8 GPUs. The reference implementation's comment
gives rank 0 ``{1024²: 230, 256²: 2, 512²: 8}`` factor matrices (dash-algorithm.md §4.2); the set
below gives exactly those counts at block 1024: one ``(32000, 2048)`` embedding (126 + 2·256²),
two ``(5632, 2048)`` ``w1``-like matrices (2 × (22 + 2·512²)), two ``(2048, 5632)`` ``w2``-like
matrices (2 × (22 + 2·512²)) and two ``(2048, 2048)`` ``wo``-like matrices (2 × 8). The RMSNorm
vectors are left out (they would add ``(1024, 1)`` blocks that the comment does not count).

``llama-21m`` is the set the kernel and byte counts are compared on (:mod:`dash_shampoo.bench.counts`):
a Llama with separate ``q, k, v, o`` projections (21.0M parameters).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from ..blocking import Blocking
from ..models import SIZES, parameter_shapes

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeSet:
    """A named list of parameter shapes.

    Attributes:
        name: the ``--models`` name.
        description: one line for the report.
        shapes: ``(parameter name, shape)`` pairs in model order.
    """

    name: str
    description: str
    shapes: tuple[tuple[str, Shape], ...]

    @property
    def numel(self) -> int:
        """Total number of parameter elements."""
        return sum(math.prod(shape) for _, shape in self.shapes)


RANK_953M = ShapeSet(
    "953m-rank",
    "one rank (of 8) of the paper's 953M Llama at block 1024: 230×1024², 2×256², 8×512² factors",
    (
        ("embedding", (32000, 2048)),
        ("mlp.w1.a", (5632, 2048)),
        ("mlp.w1.b", (5632, 2048)),
        ("mlp.w2.a", (2048, 5632)),
        ("mlp.w2.b", (2048, 5632)),
        ("attention.wo.a", (2048, 2048)),
        ("attention.wo.b", (2048, 2048)),
    ),
)


def _llama_21m() -> ShapeSet:
    d, hidden, vocab = 512, 1376, 8192
    layer = [(f"{name}", (d, d)) for name in ("wq", "wk", "wv", "wo")]
    layer += [("w1", (hidden, d)), ("w3", (hidden, d)), ("w2", (d, hidden)), ("norm1", (d,)), ("norm2", (d,))]
    shapes = [("embedding", (vocab, d))]
    shapes += [(f"layer{i}.{name}", shape) for i in range(4) for name, shape in layer]
    shapes += [("norm", (d,)), ("head", (vocab, d))]
    return ShapeSet(
        "llama-21m",
        "Llama-style d=512, 4 layers, q/k/v/o 512×512 each, SwiGLU 1376, RMSNorm, vocab 8192, untied",
        tuple(shapes),
    )


LLAMA_21M = _llama_21m()
_NOT_MODELS = {s.name: s for s in (RANK_953M, LLAMA_21M)}
#: Every set's name: the model sizes, then the sets that are not a model.
SET_NAMES: tuple[str, ...] = (*SIZES, *_NOT_MODELS)


def shape_set(name: str) -> ShapeSet:
    """The set called ``name``: a model size of :data:`dash_shampoo.models.SIZES`, ``953m-rank`` or
    ``llama-21m``.

    Raises:
        ValueError: unknown name.
    """
    if name in _NOT_MODELS:
        return _NOT_MODELS[name]
    if name not in SIZES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(SET_NAMES)}")
    config = SIZES[name]
    description = (
        f"Llama d={config.d_model}, {config.n_layer} layers, hidden {config.hidden}, "
        f"vocab {config.padded_vocab}"
    )
    return ShapeSet(name, description, tuple(parameter_shapes(config)))


def factor_counts(shapes: ShapeSet, block_size: int, one_dim: str = "shampoo") -> dict[int, int]:
    """Number of Shampoo factor matrices per side length that DASH builds at ``block_size``.

    Counts both sides of every block (a side of size 1 has no factor), as
    :meth:`dash_shampoo.blocking.Blocking.sides` does; ``{n: count}`` sorted by ``n``.
    """
    counts: Counter[int] = Counter()
    for _, shape in shapes.shapes:
        plan = Blocking.build(shape, block_size, one_dim)  # type: ignore[arg-type]
        for region in plan.regions:
            for _, size in plan.sides(region):
                counts[size] += region.count
    return dict(sorted(counts.items()))


def make_parameters(
    shapes: ShapeSet, device: torch.device, seed: int = 0, grad_scale: float = 1e-3
) -> list[torch.Tensor]:
    """Leaf float32 tensors of ``shapes`` (``N(0, 0.02²)``) with gradients ``N(0, grad_scale²)``.

    Values and gradients come from one ``torch.Generator`` seeded ``seed`` (on the CPU, then moved
    to ``device``), so every run and every optimizer sees the same tensors. The gradient is set once
    and the benchmark reuses it at every step.
    """
    generator = torch.Generator().manual_seed(seed)
    params = []
    for _, shape in shapes.shapes:
        value = torch.randn(shape, generator=generator) * 0.02
        grad = torch.randn(shape, generator=generator) * grad_scale
        p = value.to(device).requires_grad_(True)
        p.grad = grad.to(device)
        params.append(p)
    return params
