"""Helpers shared by the test files: test matrices, parameters and gradients, a one-thread fixture."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from dash_shampoo.linalg import inverse_root
from dash_shampoo.optimizer import STACKINGS

__all__ = [
    "OPTIMIZER_SHAPES",
    "STACKINGS",
    "make_grads",
    "make_params",
    "random_orthogonal",
    "root_and_iterations",
    "run_steps",
    "set_grads",
    "spd_stack",
]

#: Parameter shapes that exercise every blocking case at small block sizes: a scalar, vectors,
#: size-1 dimensions, a matrix, one not divisible by common block sizes, an N-D tensor.
OPTIMIZER_SHAPES = [(), (5,), (1, 7), (9, 1), (6, 4), (9, 13), (3, 2, 2, 2)]


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One torch thread for the module: on small matrices intra-op threads only cost
    synchronisation, and on a loaded 2-core machine OpenMP spin-waiting made the solver tests 15x
    slower (58 s instead of 4 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------------------------


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random float64 orthogonal matrix (QR of a Gaussian matrix, signs fixed so it is unique)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def spd_stack(spectra: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """float64 stack ``Q_i diag(spectra_i) Q_iᵀ`` of shape (N, n, n), one random Q per matrix."""
    generator = torch.Generator().manual_seed(seed)
    N, n = spectra.shape
    Q = torch.stack([random_orthogonal(n, generator) for _ in range(N)])
    A = (Q * spectra[:, None, :].to(torch.float64)) @ Q.mT
    return (A + A.mT) / 2


def root_and_iterations(
    A: torch.Tensor, p: int, method: str, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inverse_root(A, p, method, **options)`` and the per-matrix iteration counts it reports."""
    iterations = torch.empty(A.shape[0], dtype=torch.int64)
    return inverse_root(A, p, method, iterations=iterations, **options), iterations


# ---------------------------------------------------------------------------------------------
# Parameters and gradients
# ---------------------------------------------------------------------------------------------


def make_params(
    shapes: Sequence[tuple[int, ...]] = OPTIMIZER_SHAPES, seed: int = 0, dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """Leaf tensors of ``shapes`` with standard normal values from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def make_grads(
    shapes: Sequence[tuple[int, ...]] = OPTIMIZER_SHAPES, steps: int = 4, seed: int = 1
) -> list[list[torch.Tensor]]:
    """``steps`` lists of standard normal gradients for ``shapes``."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None]) -> None:
    """``p.grad = g`` (a copy in ``p``'s dtype; ``None`` stays ``None``) for each pair."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone().to(p.dtype)


def run_steps(
    opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[Sequence[torch.Tensor]]
) -> None:
    """One optimizer step per entry of ``grads``."""
    for step_grads in grads:
        set_grads(params, step_grads)
        opt.step()
