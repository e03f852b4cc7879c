"""On the CPU, solver calls and the per-step elementwise work run over cache-sized chunks of a stack.

Chunking must not change the result: each chunk computes the same per-block formulas. The only
allowed difference is float32 rounding of batched kernels that depend on the batch a block sits in
(and the power-iteration start vectors, drawn per chunk), hence the tolerances below.
"""

from __future__ import annotations

import pytest
import torch

import dash_shampoo.linalg.roots as roots
import dash_shampoo.optimizer as optimizer_module
from dash_shampoo import DASH
from dash_shampoo.linalg import inverse_root


def _spd_stack(count: int, n: int) -> torch.Tensor:
    g = torch.randn(count, n, 2 * n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (g @ g.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)).float()


@pytest.mark.parametrize("method", ["eigh", "newton", "ndb", "chebyshev"])
def test_chunked_roots_match_one_call(method, monkeypatch):
    A = _spd_stack(7, 12)
    whole = inverse_root(A, 4, method)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # chunks scale with the thread count
    monkeypatch.setattr(roots, "CPU_CHUNK_ELEMENTS", 2 * 12 * 12)  # chunks of 2, 2, 2, 1 matrices
    assert roots.matrices_per_chunk(A, roots.CPU_CHUNK_ELEMENTS) == 2
    out = torch.full_like(A, float("nan"))
    chunked = inverse_root(A, 4, method, out=out)
    assert chunked is out
    # Well-conditioned (λ in [0.1, ~6]): every method converges far below 1e-5 relative; the power
    # iteration's start vectors differ per chunk, which moves the iterative results by rounding only.
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.randn(20, 13) * 0.1)
    model.b = torch.nn.Parameter(torch.randn(13) * 0.1)
    model.late = torch.nn.Parameter(torch.randn(16, 8) * 0.1)  # gets its first gradient at step 3
    return model


def _train(chunk_elements: int | None, monkeypatch) -> torch.Tensor:
    if chunk_elements is not None:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # chunks scale with the thread count
        monkeypatch.setattr(optimizer_module, "CPU_CHUNK_ELEMENTS", chunk_elements)
    model = _model()
    optimizer = DASH(
        model.parameters(),
        lr=0.01,
        block_size=8,
        momentum=0.9,
        nesterov=True,
        start_preconditioning_step=2,
        root_method="eigh",
        root_eps=1e-4,
        precondition_frequency=2,
    )
    x = torch.randn(6, 13, generator=torch.Generator().manual_seed(1))
    for step in range(1, 7):
        optimizer.zero_grad(set_to_none=True)
        loss = (torch.tanh(x @ model.a.T) * (1 + model.b.sum())).pow(2).mean()
        if step >= 3:
            loss = loss + model.late.pow(2).sum()
        loss.backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_chunked_direction_matches_whole_stack(monkeypatch):
    whole = _train(None, monkeypatch)
    # 64 elements: one 8 x 8 block per chunk, so every stack (rows at different steps, some before
    # the start step, with momentum) is split into single rows.
    chunked = _train(64, monkeypatch)
    assert roots.matrices_per_chunk(torch.zeros(5, 8, 8), optimizer_module.CPU_CHUNK_ELEMENTS) == 1
    # The same formulas per block on the same inputs: only bmm batch-dependent rounding differs.
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
