"""Batched matrix functions on stacks of symmetric PSD matrices, shape (N, n, n)."""

from .precision import PRECISIONS, bmm, round_to
from .roots import (
    EIGEN_FIXES,
    METHODS,
    chebyshev_inverse_root,
    eigh_inverse_root,
    eigh_with_fallback,
    inverse_root,
    ndb_inverse_root,
    newton_inverse_root,
    root_matmuls,
)
from .scaling import SCALINGS, power_iteration, spectral_scale

__all__ = [
    "EIGEN_FIXES",
    "METHODS",
    "PRECISIONS",
    "SCALINGS",
    "bmm",
    "chebyshev_inverse_root",
    "eigh_inverse_root",
    "eigh_with_fallback",
    "inverse_root",
    "ndb_inverse_root",
    "newton_inverse_root",
    "power_iteration",
    "root_matmuls",
    "round_to",
    "spectral_scale",
]
