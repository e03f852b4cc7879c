"""Parameter sets shaped like real models, for the optimizer-step benchmark (``bench step``).

Every set is a list of ``(name, shape)`` pairs; :func:`make_parameters` turns it into leaf tensors
with random gradients. The Llama-style sets follow :mod:`dash_shampoo.models`: an untied
embedding and head ``(V, d)``, per layer ``wq, wk, wv, wo`` ``(d, d)``, SwiGLU ``w1, w3`` ``(h, d)``
and ``w2`` ``(d, h)`` (``h = 8/3·d`` rounded up to ``multiple_of``), two RMSNorm vectors ``(d,)``
per layer and a final one.

``953m-rank`` is one rank's share of the paper's 953M model (d = 2048, 16 layers, SwiGLU hidden
5632, vocab 32000, untied) at block size 1024 on 8 GPUs. The reference implementation's comment
gives rank 0 ``{1024²: 230, 256²: 2, 512²: 8}`` factor matrices (dash-algorithm.md §4.2); the set
below gives exactly those counts at block 1024: one ``(32000, 2048)`` embedding (126 + 2·256²),
two ``(5632, 2048)`` ``w1``-like matrices (2 × (22 + 2·512²)), two ``(2048, 5632)`` ``w2``-like
matrices (2 × (22 + 2·512²)) and two ``(2048, 2048)`` ``wo``-like matrices (2 × 8). The RMSNorm
vectors are left out (they would add ``(1024, 1)`` blocks that the comment does not count).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from ..blocking import Blocking

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelShapes:
    """A named list of parameter shapes.

    Attributes:
        name: the ``--model`` name.
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


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def llama_shapes(d_model: int, n_layer: int, vocab: int, multiple_of: int = 256) -> list[tuple[str, Shape]]:
    """Parameter shapes of a Llama-style decoder (untied embedding and head, SwiGLU, RMSNorm)."""
    hidden = _round_up(int(8 * d_model / 3), multiple_of)
    shapes: list[tuple[str, Shape]] = [("embedding", (vocab, d_model))]
    for i in range(n_layer):
        shapes += [
            (f"blocks.{i}.attention_norm", (d_model,)),
            *((f"blocks.{i}.attention.{w}", (d_model, d_model)) for w in ("wq", "wk", "wv", "wo")),
            (f"blocks.{i}.mlp_norm", (d_model,)),
            (f"blocks.{i}.mlp.w1", (hidden, d_model)),
            (f"blocks.{i}.mlp.w3", (hidden, d_model)),
            (f"blocks.{i}.mlp.w2", (d_model, hidden)),
        ]
    shapes += [("norm", (d_model,)), ("head", (vocab, d_model))]
    return shapes


def _rank_953m() -> list[tuple[str, Shape]]:
    return [
        ("embedding", (32000, 2048)),
        ("mlp.w1.a", (5632, 2048)),
        ("mlp.w1.b", (5632, 2048)),
        ("mlp.w2.a", (2048, 5632)),
        ("mlp.w2.b", (2048, 5632)),
        ("attention.wo.a", (2048, 2048)),
        ("attention.wo.b", (2048, 2048)),
    ]


MODELS: dict[str, ModelShapes] = {
    "tiny": ModelShapes(
        "tiny", "Llama-style d=64, 2 layers, vocab 512 (for tests)", tuple(llama_shapes(64, 2, 512, 64))
    ),
    "mini": ModelShapes(
        "mini", "Llama-style d=256, 4 layers, hidden 768, vocab 4096", tuple(llama_shapes(256, 4, 4096))
    ),
    "small": ModelShapes(
        "small", "Llama-style d=512, 8 layers, hidden 1536, vocab 32000", tuple(llama_shapes(512, 8, 32000))
    ),
    "124m": ModelShapes(
        "124m", "Llama-style d=768, 12 layers, hidden 2048, vocab 32000", tuple(llama_shapes(768, 12, 32000))
    ),
    "350m": ModelShapes(
        "350m",
        "Llama-style d=1024, 24 layers, hidden 2816, vocab 32000",
        tuple(llama_shapes(1024, 24, 32000)),
    ),
    "953m-rank": ModelShapes(
        "953m-rank",
        "one rank (of 8) of the paper's 953M Llama at block 1024: 230×1024², 2×256², 8×512² factors",
        tuple(_rank_953m()),
    ),
}


def factor_counts(shapes: ModelShapes, block_size: int, one_dim: str = "shampoo") -> dict[int, int]:
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
    shapes: ModelShapes, device: torch.device, seed: int = 0, grad_scale: float = 1e-3
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
