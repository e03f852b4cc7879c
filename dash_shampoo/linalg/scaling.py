"""Estimates of the largest eigenvalue of each matrix in a stack of symmetric PSD matrices.

The iterative inverse-root solvers need a scale ``s`` with ``λ_max(A) <= s`` (or nearly), so that
``A / s`` has its spectrum in ``(0, 1]``. Four ways to get it:

- ``"fro"``: ``s = ||A||_F = sqrt(Σ λ_i²) >= λ_max``. Always an upper bound, loose by up to ``sqrt(n)``.
- ``"power"``: ``steps`` power iterations from one random unit vector per matrix; the Rayleigh
  quotient ``vᵀAv <= λ_max`` times ``safety``.
- ``"power_multi"``: the same from ``num_vectors`` random vectors per matrix at once; the largest
  Rayleigh quotient times ``safety``. Tighter than one vector when the top eigenvalues cluster.
- ``"bound"``: ``min(||A||_F, max_i Σ_j |A_ij|)``. Both are norms that dominate the spectral radius,
  so the minimum is a guaranteed upper bound, usually tighter than the Frobenius norm alone.

Every estimate is computed on ``A / max_ij |A_ij|`` and scaled back, so fp32 matrices with entries
near the ends of the range (1e-30, 1e20) neither underflow nor overflow in the squares of the norms.
Start vectors come from the caller's ``torch.Generator``, or are given: :func:`hashed_start_vectors`
makes them a pure function of a key per matrix (an integer hash, the same on every device and for
any batch the matrix sits in). The global RNG is never touched.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .._checks import check_choice, check_number

Scaling = Literal["fro", "power", "power_multi", "bound"]
SCALINGS: tuple[str, ...] = ("fro", "power", "power_multi", "bound")


_MASK32 = 0xFFFFFFFF


def _hash32(x: Any) -> Any:
    """A bijective mix of 32-bit integers (Python ints or int64 tensors holding values below 2^32):
    xor-shift / multiply-by-odd rounds whose int64 products never overflow (constants < 2^31)."""
    for constant in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):
        x = x ^ (x >> 16)
        x = (x * constant) & _MASK32
    return x ^ (x >> 16)


def hashed_start_vectors(
    keys: torch.Tensor, salt: int | torch.Tensor, n: int, count: int, dtype: torch.dtype
) -> torch.Tensor:
    """Start vectors ``(K, n, count)``, uniform in ``[-1, 1)``, that depend only on each matrix's
    ``keys`` entry, the ``salt`` (an int, or one per matrix) and the position in the vector.

    Integer hashing on the keys' device: the same vectors on a CPU and a GPU, and for a matrix in
    any batch, chunk or rank. Only the low 32 bits of keys and salt are used.
    """
    salt = salt.to(torch.int64) & _MASK32 if isinstance(salt, torch.Tensor) else salt & _MASK32
    per_matrix = _hash32(_hash32(keys.to(torch.int64) & _MASK32) ^ _hash32(salt))
    position = torch.arange(n * count, device=keys.device, dtype=torch.int64).view(1, n, count)
    bits = _hash32((per_matrix.view(-1, 1, 1) + _hash32(position ^ 0x5BD1E995)) & _MASK32)
    return bits.to(dtype) * 2.0**-31 - 1


def power_iteration(
    A: torch.Tensor,
    *,
    steps: int = 10,
    num_vectors: int = 1,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Largest Rayleigh quotient ``max_k v_kᵀ A v_k`` after ``steps`` power iterations, per matrix.

    Args:
        A: symmetric PSD stack of shape (N, n, n), fp32 or fp64.
        steps: power iterations ``V ← A V / ||A V||`` (column-wise).
        num_vectors: random start vectors per matrix (``k``); the estimate is the largest quotient.
        generator: source of the start vectors (a fixed default seed when ``None``).
        start: the start vectors ``(N, n, k)`` themselves (then ``num_vectors`` and ``generator``
            are not used), e.g. from :func:`hashed_start_vectors`.

    Returns:
        Tensor of shape (N,) with lower bounds of ``λ_max`` (exact in the limit of many steps).
    """
    A, magnitude = _normalized(A)
    return _power_iteration(A, steps, num_vectors, generator, start) * magnitude


def _power_iteration(
    A: torch.Tensor,
    steps: int,
    num_vectors: int,
    generator: torch.Generator | None,
    start: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`power_iteration` of a stack whose entries are at most about 1 in magnitude.

    The columns are normalised after every second product: ``||A||₂ <= n``, so two products grow
    them by at most ``n²`` (and start vectors of norm up to ``sqrt(n)`` need no normalising).
    """
    n = A.shape[-1]
    if start is not None:
        V = start.to(A.dtype)
    else:
        if generator is None:
            generator = torch.Generator(device=A.device).manual_seed(0)
        V = torch.randn(A.shape[0], n, num_vectors, generator=generator, device=A.device, dtype=A.dtype)
    tiny = torch.finfo(A.dtype).tiny
    for k in range(steps):
        V = torch.bmm(A, V)
        if k % 2 == 1 or k == steps - 1:
            V = V / V.norm(dim=1, keepdim=True).clamp_min(tiny)
    if steps == 0:
        V = V / V.norm(dim=1, keepdim=True).clamp_min(tiny)
    quotients = (V * torch.bmm(A, V)).sum(dim=1)
    return quotients.amax(dim=-1).clamp_min(0)


def _normalized(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A / m, m)`` with ``m = max_ij |A_ij|`` per matrix (at least the smallest normal number)."""
    magnitude = A.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(A.dtype).tiny)
    return A / magnitude[:, None, None], magnitude


def spectral_scale(
    A: torch.Tensor,
    method: Scaling = "power",
    *,
    steps: int = 10,
    num_vectors: int = 16,
    safety: float = 2.0,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """A per-matrix scale ``s`` of shape (N,) with ``λ_max(A) <= s`` (guaranteed for fro/bound).

    ``safety`` multiplies only the power-iteration estimates (which are lower bounds); the Frobenius
    norm and the norm bound are already upper bounds. The result is never smaller than the smallest
    positive normal number, so ``A / s`` is always defined. ``start``: the power iteration's start
    vectors (see :func:`power_iteration`).
    """
    check_choice("scaling", method, SCALINGS)
    check_number("scaling_steps", steps, low=0, integer=True)
    check_number("num_vectors", num_vectors, low=1, integer=True)
    check_number("safety", safety, low=0, low_open=True)
    return _spectral_scale(A, method, steps, num_vectors, safety, generator, start)


def _spectral_scale(
    A: torch.Tensor,
    method: Scaling,
    steps: int,
    num_vectors: int,
    safety: float,
    generator: torch.Generator | None,
    start: torch.Tensor | None = None,
    normalized: bool = False,
) -> torch.Tensor:
    """:func:`spectral_scale` without the argument checks (for callers that validated them once);
    ``normalized``: the entries of ``A`` are at most about 1 (no pass to divide them by their peak)."""
    tiny = torch.finfo(A.dtype).tiny
    if normalized:
        magnitude: torch.Tensor | float = 1.0
    else:
        A, magnitude = _normalized(A)
    if method in ("fro", "bound"):
        scale = torch.linalg.matrix_norm(A, ord="fro")
        if method == "bound":
            scale = torch.minimum(scale, A.abs().sum(dim=-1).amax(dim=-1))
        scale = scale * magnitude
    else:
        vectors = 1 if method == "power" else num_vectors
        scale = safety * _power_iteration(A, steps, vectors, generator, start) * magnitude
    return scale.clamp_min(tiny)
