"""Helpers shared by the test files."""

from __future__ import annotations

from typing import Any

import torch

from dash_shampoo.linalg import inverse_root


def root_and_iterations(
    A: torch.Tensor, p: int, method: str, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inverse_root(A, p, method, **options)`` and the per-matrix iteration counts it reports."""
    iterations = torch.empty(A.shape[0], dtype=torch.int64)
    return inverse_root(A, p, method, iterations=iterations, **options), iterations
