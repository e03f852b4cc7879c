"""Batched matrix functions on stacks of symmetric PSD matrices, shape (N, n, n)."""

from .precision import PRECISIONS, bmm, matmul_precision, round_to
from .roots import (
    EIGEN_FIXES,
    METHODS,
    RootOptions,
    eigh_with_fallback,
    inverse_root,
    ridge,
    root_matmuls,
    solve_inverse_root,
)
from .scaling import SCALINGS, power_iteration, spectral_scale

__all__ = [
    "EIGEN_FIXES",
    "METHODS",
    "PRECISIONS",
    "SCALINGS",
    "RootOptions",
    "bmm",
    "eigh_with_fallback",
    "inverse_root",
    "matmul_precision",
    "power_iteration",
    "ridge",
    "root_matmuls",
    "round_to",
    "solve_inverse_root",
    "spectral_scale",
]
