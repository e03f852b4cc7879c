"""Batched inverse p-th roots ``A^(-1/p)`` of stacks of symmetric PSD matrices, shape (N, n, n).

:func:`inverse_root` is the one entry point. It validates its options once (:class:`RootOptions`),
adds the ridge ``eps·I`` to every matrix, estimates the spectral scale of the iterative methods,
sets the matmul precision once and, on the CPU, solves the stack in cache-sized chunks; each
method is then a short loop over the whole (chunk of the) stack, with no loop over matrices:

- ``"eigh"``: ``Q diag(λ^(-1/p)) Qᵀ`` from ``torch.linalg.eigh``; exact up to rounding.
- ``"newton"``: coupled Newton iteration (Guo & Higham) for any integer ``p``.
- ``"ndb"``: inverse-free Newton–Denman–Beavers (coupled Newton–Schulz) for the square root and
  inverse square root; ``p = 2^k`` by composition.
- ``"chebyshev"``: a Chebyshev series of ``x^(-1/p)`` evaluated with Clenshaw.

The iterative solvers scale each matrix by ``s >= λ_max`` (:func:`spectral_scale`), iterate in
fp32 (matmuls at ``precision``, see :mod:`dash_shampoo.linalg.precision`) and undo the scaling, so
their result approximates ``A^(-1/p)`` itself, not a multiple of it. Inputs of any floating dtype
are computed in fp32 (fp64 inputs in fp64) and returned in the input dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .._checks import check_choice, check_number, check_stack
from .precision import PRECISIONS, Precision, baddbmm, matmul_precision
from .precision import matmul as bmm
from .scaling import SCALINGS, Scaling, _spectral_scale

Method = Literal["eigh", "newton", "ndb", "chebyshev"]
METHODS: tuple[str, ...] = ("eigh", "newton", "ndb", "chebyshev")
EigenFix = Literal["shift", "pinv", "abs"]
EIGEN_FIXES: tuple[str, ...] = ("shift", "pinv", "abs")


def _compute_dtype(A: torch.Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def _eye_like(A: torch.Tensor) -> torch.Tensor:
    return torch.eye(A.shape[-1], device=A.device, dtype=A.dtype).expand_as(A)


def ridge(
    A: torch.Tensor, eps: float, relative_eps: float, mean_eigenvalue: torch.Tensor | None = None
) -> float | torch.Tensor:
    """The ridge added to each matrix: ``eps + relative_eps · tr(A)/n`` (a float when
    ``relative_eps`` is 0, else one per matrix, shape (N,), in the compute dtype). ``mean_eigenvalue``:
    ``tr(A)/n`` when the caller has it."""
    if not relative_eps:
        return eps
    if mean_eigenvalue is None:
        mean_eigenvalue = A.to(_compute_dtype(A)).diagonal(dim1=-2, dim2=-1).mean(dim=-1)
    return mean_eigenvalue * relative_eps + eps


def _power_of_two_scale(diagonal: torch.Tensor, p: float) -> torch.Tensor:
    """Per matrix the exponent ``k`` of ``2^k`` near ``max_ij |X_ij|``, a multiple of ``p`` when ``p``
    is an integer: ``X / 2^k`` has entries of order one (no overflow or underflow in the iterations,
    for inputs from 1e-38 to 3e38) and the root ``(X / 2^k)^(-1/p) · 2^(-k/p)`` is rescaled exactly.

    The largest entry of a PSD matrix is on its diagonal (``|X_ij| <= sqrt(X_ii X_jj)``), so only
    the ``diagonal`` (N, n) is read (NaN and inf on it propagate; an indefinite input gets a scale
    that is merely not tight)."""
    exponent = torch.frexp(diagonal.abs().amax(dim=-1)).exponent
    exponent = exponent.to(torch.int64).clamp(-120, 120)
    step = int(p) if float(p).is_integer() else 1
    return torch.div(exponent, step, rounding_mode="trunc") * step  # |k| <= 120: 2^±k is normal


def _power_per_matrix(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent`` for a per-matrix vector, computed in float64 and rounded back: the CPU's
    vectorised and scalar ``pow`` differ in the last bit, and which one a matrix gets depends on the
    size of its batch; rounded from float64 the result is the same in any batch."""
    return x.double().pow(exponent).to(x.dtype)


def _symmetric(X: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
    """``(X + Xᵀ)/2`` (times a per-matrix ``factor`` (N,)): exactly symmetric, in two passes."""
    half = 0.5 if factor is None else (0.5 * factor)[:, None, None]
    return torch.add(X, X.mT).mul_(half)


#: What each solver returns: ``(R, c)`` whose root is ``c · (R + Rᵀ)/2`` (``c`` per matrix, or None
#: for 1), so the last scalings and the symmetrisation are two passes in :func:`_solve`.
Unfinished = tuple[torch.Tensor, torch.Tensor | None]


# ---------------------------------------------------------------------------------------------
# Eigendecomposition
# ---------------------------------------------------------------------------------------------


def eigh_with_fallback(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched ``torch.linalg.eigh`` that reports failures per matrix instead of raising.

    Non-finite matrices are replaced by the identity before the call. If the batched call raises,
    the stack is retried in float64; if that raises too, each matrix is decomposed alone in float64
    and the ones that still fail are replaced by the identity.

    Returns:
        ``(eigenvalues (N, n), eigenvectors (N, n, n), failed (N,) bool)`` in ``A``'s dtype (fp32 for
        16-bit inputs); ``failed`` marks non-finite inputs, failed decompositions and non-finite
        outputs.
    """
    X = A.to(_compute_dtype(A))
    finite = torch.isfinite(X).flatten(1).all(dim=1)
    values, vectors, failed = _eigh(torch.where(finite[:, None, None], X, _eye_like(X)), ~finite)
    bad_values = ~torch.isfinite(values).all(dim=1)
    return values, vectors, failed | bad_values | ~torch.isfinite(vectors).flatten(1).all(dim=1)


def _eigh(
    X: torch.Tensor, failed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``torch.linalg.eigh`` of the stack, in float64 if that raises, matrix by matrix if that
    raises too; ``failed`` (None: none so far) gains the matrices that still fail (None when the
    batched call succeeded and none had failed)."""
    try:
        return (*torch.linalg.eigh(X), failed)
    except RuntimeError:
        pass
    try:
        values, vectors = torch.linalg.eigh(X.double())
    except RuntimeError:
        known = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device) if failed is None else failed
        values, vectors, failed = _eigh_one_by_one(X.double(), known)
    return values.to(X.dtype), vectors.to(X.dtype), failed


def _eigh_one_by_one(
    X: torch.Tensor, failed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = torch.ones(X.shape[:-1], dtype=X.dtype, device=X.device)
    vectors = _eye_like(X).clone()
    failed = failed.clone()
    for i in range(X.shape[0]):
        try:
            values[i], vectors[i] = torch.linalg.eigh(X[i])
        except RuntimeError:
            failed[i] = True
    return values, vectors, failed


def _eigh_root(
    A: torch.Tensor, p: float, eps: float, added: float | torch.Tensor, eigen_fix: EigenFix, finite: bool
) -> torch.Tensor:
    """``A^(-1/p)`` by eigendecomposition of the ridged ``X = A + r·I``, eigenvalues treated first.

    ``A`` itself is decomposed (``A + r·I`` has the same eigenvectors and eigenvalues ``λ_A + r``,
    so no ridged copy of the stack is formed). With ``λ = λ_A + r`` the eigenvalues of ``X``, ``r``
    the ridge (``added``: ``eps``, plus the relative part):

    - ``"shift"`` (Shampoo's treatment): ``λ ← λ − min(λ_min, 0) + eps``, so the smallest is at least
      ``eps`` (``eps`` is thus added twice to a PSD matrix, as in Distributed Shampoo and DASH).
    - ``"pinv"``: pseudo-inverse root of ``A`` itself: eigenvalues ``λ_A`` at or below
      ``max(r, n·ε_machine·λ_max)`` contribute zero instead of a huge value, and the kept ones
      are inverted without the ridge (``r`` serves only as the cut-off).
    - ``"abs"``: ``λ ← |λ_A| + r``.

    Returns ``R + Rᵀ`` with ``R = (Q diag(λ^(-1/p)/2)) Qᵀ`` (exactly symmetric, one pass). Matrices
    whose decomposition fails come out as NaN (their weights are NaN: for ``finite`` inputs, whose
    decomposition fails by raising or with NaN eigenvalues, no pass checks the stack; else see
    :func:`eigh_with_fallback`). With
    ``eps = 0`` a singular matrix gives non-finite entries (``0^(-1/p) = inf``, and ``inf · 0 = NaN``
    in the product with the eigenvectors) except with ``"pinv"``.
    """
    if finite:  # NaN eigenvalues give NaN weights below; only matrices that failed alone are marked
        values, vectors, failed = _eigh(A, None)
    else:
        values, vectors, failed = eigh_with_fallback(A)
    r = added[:, None] if isinstance(added, torch.Tensor) else added
    if eigen_fix == "shift":
        values = values + r
        values = values - values.amin(dim=-1, keepdim=True).clamp_max(0) + eps
        weights = values.pow(-1.0 / p)
    elif eigen_fix == "abs":
        weights = (values.abs() + r).pow(-1.0 / p)
    else:
        n = values.shape[-1]
        cutoff = torch.maximum(
            n * torch.finfo(values.dtype).eps * values.amax(dim=-1, keepdim=True), torch.as_tensor(r)
        )
        cut = values <= cutoff  # NaN compares false: it stays NaN
        weights = torch.where(cut, 0.0, values.clamp_min(torch.finfo(values.dtype).tiny).pow(-1.0 / p))
    half = weights.mul(0.5)
    if failed is not None:
        half.masked_fill_(failed[:, None], float("nan"))
    root = (vectors * half[:, None, :]) @ vectors.mT
    return torch.add(root, root.mT)


# ---------------------------------------------------------------------------------------------
# Iterations with a per-matrix stopping rule kept on the device
# ---------------------------------------------------------------------------------------------


def _max_abs_deviation_from_identity(M: torch.Tensor) -> torch.Tensor:
    """``max_ij |M − I|_ij`` per matrix, shape (N,)."""
    D = M.clone()
    D.diagonal(dim1=-2, dim2=-1).sub_(1)
    return D.abs().flatten(1).amax(dim=1)


def _shifted_identity(M: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``a·M + b·I`` as a new tensor (scaled copy plus a diagonal add: no identity stack is formed)."""
    out = M * a
    out.diagonal(dim1=-2, dim2=-1).add_(b)
    return out


class _StoppingRule:
    """Which matrices still iterate: all of them without ``tol``; with it, those whose ``max|M − I|``
    has stayed at or above ``tol`` (a mask on the device, no host synchronisation). Counts each
    matrix's iterations into ``iterations`` when given."""

    def __init__(self, X: torch.Tensor, tol: float | None, iterations: torch.Tensor | None) -> None:
        self.tol = tol
        self.iterations = iterations
        self.active = torch.ones(X.shape[0], dtype=torch.bool, device=X.device) if tol is not None else None

    def check(self, M: torch.Tensor) -> None:
        """Stop the matrices whose ``M`` (the iteration's ``X^p A`` or ``Z Y``) is within ``tol`` of I."""
        if self.active is not None:
            self.active &= _max_abs_deviation_from_identity(M) >= self.tol

    def update(self, *pairs: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """The new value of each ``(new, old)`` pair where the matrix is active, else the old one."""
        if self.iterations is not None:
            self.iterations += 1 if self.active is None else self.active
        if self.active is None:
            return [new for new, _ in pairs]
        keep = self.active[:, None, None]
        return [torch.where(keep, new, old) for new, old in pairs]


def _power(N: torch.Tensor, p: int, precision: Precision) -> torch.Tensor:
    """``N^p`` for integer ``p >= 1`` by repeated squaring."""
    result = None
    base = N
    while True:
        if p & 1:
            result = base if result is None else bmm(result, base, precision)
        p >>= 1
        if not p:
            return result
        base = bmm(base, base, precision)


def _newton_root(
    X: torch.Tensor, p: int, scale: torch.Tensor, options: RootOptions, iterations: torch.Tensor | None
) -> Unfinished:
    """``X^(-1/p)`` by the coupled Newton iteration, for any integer ``p >= 1``.

    With ``z = (p + 1) / (2 s)``, start from ``X_0 = z^(1/p) I`` and ``M_0 = z X`` (eigenvalues in
    ``(0, (p+1)/2]``) and iterate

        ``N_k = ((p + 1) I − M_k) / p``,  ``X_{k+1} = X_k N_k``,  ``M_{k+1} = N_k^p M_k``,

    so ``M_k = X_k^p X → I`` and ``X_k → X^(-1/p)``. The products that form ``M`` run at
    ``precision``; ``X_k N_k`` accumulates the root in fp32 (on CUDA with ``"tf32"`` it is a TF32
    product too, since the TF32 flag is set once for the solver call, as in the authors' runs with
    TF32 on globally; the accuracy is set by the ``M`` products either way).
    """
    precision = options.precision
    z = ((p + 1) / (2 * scale))[:, None, None]
    M = X * z
    root = _eye_like(X) * _power_per_matrix(z, 1.0 / p)
    rule = _StoppingRule(X, options.tol, iterations)
    for _ in range(options.steps):
        rule.check(M)
        N = _shifted_identity(M, -1.0 / p, (p + 1) / p)
        new_root = bmm(root, N, "fp32")
        new_M = bmm(_power(N, p, precision), M, precision)
        root, M = rule.update((new_root, root), (new_M, M))
    return root, None


def _ndb_stage(
    X: torch.Tensor,
    scale: torch.Tensor,
    steps: int,
    rule: _StoppingRule,
    precision: Precision,
    want: Literal["Y", "Z"],
) -> torch.Tensor:
    """Coupled Newton–Schulz iteration for ``B = X / s``: ``Y → B^(1/2)``, ``Z → B^(-1/2)``.

    ``E_k = (3 I − Z_k Y_k) / 2``, ``Y_{k+1} = Y_k E_k``, ``Z_{k+1} = E_k Z_k`` from ``Y_0 = B``,
    ``Z_0 = I`` (three matmuls a step, no inverse; the first step needs one, and the last skips the
    product that is not wanted). It converges while the spectrum of ``B`` lies in ``(0, 2)``.
    Returns ``Y`` or ``Z`` as wanted, not yet rescaled.
    """
    Y = X / scale[:, None, None]
    if rule.active is not None or steps < 2:
        return _ndb_stage_masked(Y, steps, rule, precision, want)
    # Without a per-matrix stopping mask the iterates can overwrite their buffers (what a masked
    # update must keep): one allocation per buffer instead of three a step, the same arithmetic.
    E = _shifted_identity(Y, -0.5, 1.5)  # step 0: Z Y = Y
    Y = bmm(Y, E, precision)
    Z, E = E, torch.empty_like(E)  # Z_1 = E_0
    rule.update()
    scratch = torch.empty_like(Y)
    for k in range(1, steps):
        last = k == steps - 1
        bmm(Z, Y, precision, out=E)
        E.mul_(-0.5).diagonal(dim1=-2, dim2=-1).add_(1.5)
        if not (last and want == "Z"):
            Y, scratch = bmm(Y, E, precision, out=scratch), Y
        if not (last and want == "Y"):
            Z, scratch = bmm(E, Z, precision, out=scratch), Z
        rule.update()
    return Y if want == "Y" else Z


def _ndb_stage_masked(
    Y: torch.Tensor, steps: int, rule: _StoppingRule, precision: Precision, want: Literal["Y", "Z"]
) -> torch.Tensor:
    """:func:`_ndb_stage` from ``Y = B``, each step's iterates new tensors (a matrix whose stopping
    rule has fired keeps its old ones)."""
    Z = _eye_like(Y)
    for k in range(steps):
        ZY = Y if k == 0 else bmm(Z, Y, precision)
        rule.check(ZY)
        # E is formed once for both products (a baddbmm per product would first copy its addend
        # into its output: more bytes than this one pass).
        E = _shifted_identity(ZY, -0.5, 1.5)
        last = k == steps - 1
        new_Y = Y if last and want == "Z" else bmm(Y, E, precision)
        new_Z = Z if last and want == "Y" else E if k == 0 else bmm(E, Z, precision)
        Y, Z = rule.update((new_Y, Y), (new_Z, Z))
    return Y if want == "Y" else Z


def _ndb_root(
    X: torch.Tensor, p: int, scale: torch.Tensor, options: RootOptions, iterations: torch.Tensor | None
) -> Unfinished:
    """``X^(-1/p)`` for ``p = 2^k`` by Newton–Denman–Beavers stages (see :func:`_ndb_stage`).

    ``p = 2``: one stage, ``X^(-1/2) = Z / sqrt(s)``. ``p = 2^k``: ``k − 1`` square-root stages
    (``S ← Y·sqrt(s)``) then one inverse-square-root stage; the scale of each later stage is the
    square root of the previous one, since ``λ_max(X^(1/2)) = λ_max(X)^(1/2)`` (no new estimate).
    ``p = 1``: ``X^(-1) = (X^(-1/2))²``. Each stage runs ``steps`` iterations (fewer per matrix once
    ``max|Z Y − I| < tol`` when ``tol`` is given); ``iterations`` counts those of all stages.
    """
    steps, precision = options.steps, options.precision
    for _ in range(max(int(math.log2(p)), 1) - 1):
        Y = _ndb_stage(X, scale, steps, _StoppingRule(X, options.tol, iterations), precision, "Y")
        X = _symmetric(Y, scale.sqrt())
        scale = scale.sqrt()
    Z = _ndb_stage(X, scale, steps, _StoppingRule(X, options.tol, iterations), precision, "Z")
    if p == 1:
        return bmm(Z, Z, "fp32"), 1 / scale
    return Z, 1 / scale.sqrt()


# ---------------------------------------------------------------------------------------------
# Chebyshev series with Clenshaw's recurrence
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _chebyshev_coefficients_fp64(p: float, degree: int, lower: float) -> torch.Tensor:
    """Coefficients ``c_0..c_d`` (``c_0`` already halved) of ``f(t) = ((t + 1)/2 + lower)^(-1/p)`` on
    ``t ∈ [−1, 1]``, i.e. ``x^(-1/p)`` on ``x ∈ [lower, 1 + lower]``, by the discrete Chebyshev
    transform on ``N = max(1024, 8(d + 1))`` Chebyshev nodes, in float64.
    """
    nodes = max(1024, 8 * (degree + 1))
    theta = math.pi * (torch.arange(nodes, dtype=torch.float64) + 0.5) / nodes
    values = ((torch.cos(theta) + 1) / 2 + lower).pow(-1.0 / p)
    k = torch.arange(degree + 1, dtype=torch.float64)
    coefficients = (2.0 / nodes) * (values[None, :] * torch.cos(k[:, None] * theta[None, :])).sum(dim=1)
    coefficients[0] /= 2
    return coefficients


@functools.lru_cache(maxsize=64)
def chebyshev_coefficients(p: float, degree: int, lower: float, dtype: torch.dtype) -> tuple[float, ...]:
    """The coefficients of :func:`_chebyshev_coefficients_fp64` rounded to ``dtype``, as floats."""
    return tuple(_chebyshev_coefficients_fp64(p, degree, lower).to(dtype).tolist())


def _chebyshev_root(
    X: torch.Tensor, p: float, scale: torch.Tensor, options: RootOptions, iterations: torch.Tensor | None
) -> Unfinished:
    """``(X + a·s·I)^(-1/p)`` by a degree-``d`` Chebyshev series, ``a = interval_lower`` (no iterations).

    With ``B = X / s`` (spectrum in ``[0, 1]`` when ``s >= λ_max``), the series approximates
    ``(B + a·I)^(-1/p)`` on ``[a, 1 + a]`` in the variable ``T = 2B − I``; Clenshaw's recurrence
    ``b_k = 2 T b_{k+1} − b_{k+2} + c_k I``, result ``T b_1 − b_2 + c_0 I``, costs ``d`` matmuls
    (``b_d = c_d I`` needs none). Multiplying by ``s^(-1/p)`` undoes the scaling. The relative ridge
    ``a·s`` keeps the function smooth on the interval: the series converges geometrically at a rate
    set by ``a`` (about ``exp(−2 d sqrt(a))``), so eigenvalues far below ``a·λ_max`` are damped, not
    inverted. The default ``"bound"`` scaling guarantees ``s >= λ_max``, so no eigenvalue leaves the
    interval.
    """
    precision = options.precision
    coefficients = chebyshev_coefficients(float(p), options.degree, float(options.interval_lower), X.dtype)
    T = X * (2 / scale)[:, None, None]
    T.diagonal(dim1=-2, dim2=-1).sub_(1)
    b_next = _eye_like(X) * coefficients[-1]  # b_{k+1}, from b_d = c_d I
    b_after = torch.zeros_like(X)  # b_{k+2}
    for c in reversed(coefficients[1:-1]):
        b_k = baddbmm(b_after, T, b_next, -1.0, 2.0, precision)
        b_k.diagonal(dim1=-2, dim2=-1).add_(c)
        b_after, b_next = b_next, b_k
    result = bmm(T, b_next, precision).sub_(b_after)
    result.diagonal(dim1=-2, dim2=-1).add_(coefficients[0])
    return result, _power_per_matrix(scale, -1.0 / p)


# ---------------------------------------------------------------------------------------------
# Options and the entry point
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RootOptions:
    """The options of :func:`inverse_root`, validated once on construction.

    Attributes:
        method: ``"eigh"``, ``"newton"`` (coupled Newton), ``"ndb"`` (Newton–Denman–Beavers) or
            ``"chebyshev"`` (Chebyshev series with Clenshaw).
        eps: ridge added to the diagonal before the root, ``>= 0``.
        relative_eps: a further ridge relative to each matrix's scale, ``relative_eps · tr(A)/n``
            (the mean eigenvalue), ``>= 0``: the root then sees eigenvalues of at least that
            fraction of the mean, whatever the magnitude of the matrix.
        eigen_fix: eigenvalue treatment of ``"eigh"``: ``"shift"``, ``"pinv"`` or ``"abs"``.
        steps: iterations of ``"newton"`` and ``"ndb"`` (per stage); the maximum when ``tol`` is set.
        tol: per-matrix stopping tolerance on ``max|M − I|`` for the iterative methods.
        scaling: spectral scale of the iterative methods: ``"fro"``, ``"power"``,
            ``"power_multi"`` or ``"bound"``; ``None`` on construction picks ``"power_multi"`` for
            the Newton methods and ``"bound"`` for Chebyshev (the attribute is never ``None``).
        scaling_steps, num_vectors, safety: power-iteration steps, vectors and safety factor.
        precision: matmul precision of the iterative methods: ``"fp32"``, ``"tf32"``, ``"bf16"``
            or ``"fp16"`` (fp32 accumulation).
        degree, interval_lower: Chebyshev degree and relative lower end of the fit interval.

    Raises:
        ValueError, TypeError: an option is outside its allowed values (the message names it).
    """

    method: Method = "eigh"
    eps: float = 0.0
    relative_eps: float = 0.0
    eigen_fix: EigenFix = "shift"
    steps: int = 10
    tol: float | None = None
    scaling: Scaling | None = None
    scaling_steps: int = 10
    num_vectors: int = 16
    safety: float = 2.0
    precision: Precision = "fp32"
    degree: int = 40
    interval_lower: float = 1e-3

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("eigen_fix", self.eigen_fix, EIGEN_FIXES)
        check_choice("precision", self.precision, PRECISIONS)
        if self.scaling is None:
            object.__setattr__(self, "scaling", "bound" if self.method == "chebyshev" else "power_multi")
        check_choice("scaling", self.scaling, SCALINGS)
        check_number("eps", self.eps, low=0)
        check_number("relative_eps", self.relative_eps, low=0)
        check_number("steps", self.steps, low=1, integer=True)
        if self.tol is not None:
            check_number("tol", self.tol, low=0, low_open=True)
        check_number("scaling_steps", self.scaling_steps, low=0, integer=True)
        check_number("num_vectors", self.num_vectors, low=1, integer=True)
        check_number("safety", self.safety, low=0, low_open=True)
        check_number("degree", self.degree, low=1, integer=True)
        check_number("interval_lower", self.interval_lower, low=0, low_open=True)

    def check_root(self, p: float) -> None:
        """Raise ``ValueError`` unless ``p`` is a root this method computes (see :func:`inverse_root`)."""
        check_number("p", p, low=0, low_open=True)
        if self.method == "newton" and (not isinstance(p, int) or isinstance(p, bool)):
            raise ValueError(f"p must be an integer >= 1 for method 'newton'; got {p!r}")
        if self.method == "ndb" and not (isinstance(p, int) and p >= 1 and p & (p - 1) == 0):
            raise ValueError(f"p must be 1 or a power of two (2, 4, 8, ...) for method 'ndb'; got {p!r}")


def inverse_root(
    A: torch.Tensor,
    p: float,
    method: Method = "eigh",
    *,
    eps: float = 0.0,
    relative_eps: float = 0.0,
    eigen_fix: EigenFix = "shift",
    steps: int = 10,
    tol: float | None = None,
    scaling: Scaling | None = None,
    scaling_steps: int = 10,
    num_vectors: int = 16,
    safety: float = 2.0,
    precision: Precision = "fp32",
    degree: int = 40,
    interval_lower: float = 1e-3,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    iterations: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """``(A + eps·I)^(-1/p)`` for every matrix of the symmetric PSD stack ``A`` (N, n, n).

    Exactly so for ``"newton"`` and ``"ndb"`` (up to convergence). ``"eigh"`` treats the eigenvalues
    of ``A + eps·I`` by ``eigen_fix`` (``"shift"`` adds ``eps`` a second time; see
    :func:`_eigh_root`); ``"chebyshev"`` adds the relative ridge ``interval_lower · s`` as well (see
    :func:`_chebyshev_root`). The options are those of :class:`RootOptions`; a caller that solves
    many stacks with the same options builds one and calls :func:`solve_inverse_root`.

    Args:
        A: stack of symmetric PSD matrices, any floating dtype, any N >= 0 and n >= 1.
        p: the root. ``"eigh"`` and ``"chebyshev"``: any real ``p > 0``; ``"newton"``: an integer
            ``>= 1``; ``"ndb"``: 1 or a power of two.
        method, eps, eigen_fix, steps, tol, scaling, scaling_steps, num_vectors, safety, precision,
            degree, interval_lower: see :class:`RootOptions`.
        generator: random source of power iteration; the global RNG is never used.
        start: the power iteration's start vectors ``(N, n, k)`` instead of random ones (``k = 1``
            for ``"power"``, ``num_vectors`` for ``"power_multi"``; see
            :func:`~dash_shampoo.linalg.scaling.hashed_start_vectors`).
        out: optional output tensor of ``A``'s shape and dtype.
        iterations: optional int64 tensor of shape (N,) that receives each matrix's iterations
            (all stages of ``"ndb"``; zeros for ``"eigh"`` and ``"chebyshev"``).
        check: refuse finite matrices that are visibly not symmetric PSD (see
            :func:`check_symmetric_psd`: one pass over ``A`` and one host synchronisation).

    Returns:
        The roots in ``A``'s dtype (``out`` when given). A matrix whose eigendecomposition fails
        comes out as NaN; other matrices are unaffected.

    Raises:
        TypeError: ``A`` is not a floating tensor of shape (N, n, n), or ``out``, ``iterations`` or
            ``generator`` is not what is described above.
        ValueError: an option is outside its allowed values, or (with ``check``) a matrix of ``A`` is
            not symmetric or has a negative diagonal entry.
    """
    check_stack("A", A)
    if check:
        check_symmetric_psd(A)
    options = RootOptions(
        method, eps, relative_eps, eigen_fix, steps, tol, scaling, scaling_steps, num_vectors, safety,
        precision, degree, interval_lower,
    )  # fmt: skip
    return solve_inverse_root(A, p, options, generator=generator, start=start, out=out, iterations=iterations)


def check_symmetric_psd(A: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first finite matrix of ``A`` (N, n, n) that is not symmetric
    (``max|A − Aᵀ| > 64·n·ε·max|A|``) or has a diagonal entry below ``−64·n·ε·max|A|``.

    Both are necessary conditions of positive semi-definiteness, cheap to test; an indefinite matrix
    with a non-negative diagonal passes. Non-finite matrices are left to the solver (their roots
    come out as NaN, or are refused by the optimizer).
    """
    X = A.to(_compute_dtype(A))
    magnitude = X.abs().amax(dim=(-2, -1))
    tol = 64 * X.shape[-1] * torch.finfo(X.dtype).eps * magnitude
    asymmetry = (X - X.mT).abs().amax(dim=(-2, -1))
    lowest = X.diagonal(dim1=-2, dim2=-1).amin(dim=-1)
    finite = torch.isfinite(magnitude)
    for name, bad in (("not symmetric", asymmetry > tol), ("not positive semi-definite", lowest < -tol)):
        bad &= finite
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            detail = (
                f"max|A - A^T| = {float(asymmetry[i]):.3g}"
                if name == "not symmetric"
                else (f"a diagonal entry is {float(lowest[i]):.3g}")
            )
            raise ValueError(
                f"A[{i}] is {name} ({detail}, max|A| = {float(magnitude[i]):.3g}); inverse_root needs "
                "symmetric positive semi-definite matrices (pass check=False to skip this test)"
            )


def solve_inverse_root(
    A: torch.Tensor,
    p: float,
    options: RootOptions,
    *,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    iterations: torch.Tensor | None = None,
    finite: bool = False,
    ridge_of: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`inverse_root` with options validated beforehand (see there for the arguments);
    ``finite``: the caller guarantees that every matrix of ``A`` is finite (fewer passes for eigh);
    ``ridge_of``: :func:`ridge` of ``A`` with these options, when the caller has computed it.

    On the CPU the stack is solved in chunks of :data:`CPU_CHUNK_ELEMENTS` per torch thread; on an
    accelerator in one batched call. The matmul precision is set once for the whole call.
    """
    check_stack("A", A)
    options.check_root(p)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    _check_like("out", out, A.shape, A.dtype)
    _check_like("iterations", iterations, A.shape[:1], torch.int64)
    if start is not None and (start.ndim != 3 or start.shape[:2] != A.shape[:2]):
        raise TypeError(
            f"start must have shape (N, n, k) = ({A.shape[0]}, {A.shape[1]}, k); got {tuple(start.shape)}"
        )
    if iterations is not None:
        iterations.zero_()
    size = matrices_per_chunk(A, CPU_CHUNK_ELEMENTS)
    with matmul_precision(options.precision, A.device):
        if size >= A.shape[0] and out is None:
            return _solve(A, p, options, generator, start, iterations, finite, ridge_of).to(A.dtype)
        result = torch.empty_like(A) if out is None else out
        for first in range(0, A.shape[0], size):
            rows = slice(first, first + size)
            counts = None if iterations is None else iterations[rows]
            vectors = None if start is None else start[rows]
            added = ridge_of[rows] if isinstance(ridge_of, torch.Tensor) else ridge_of
            result[rows] = _solve(A[rows], p, options, generator, vectors, counts, finite, added)
    return result


def _solve(
    A: torch.Tensor,
    p: float,
    options: RootOptions,
    generator: torch.Generator | None,
    start: torch.Tensor | None,
    iterations: torch.Tensor | None,
    finite: bool = False,
    added: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """One chunk: ridge, scale, the method's loop; the root in the compute dtype.

    ``finite``: the caller guarantees finite matrices (see :func:`eigh_with_fallback`); ``added``:
    the chunk's :func:`ridge` when the caller has computed it.
    """
    if added is None:
        added = ridge(A, options.eps, options.relative_eps)
    A = A.to(_compute_dtype(A))
    if options.method == "eigh":
        return _eigh_root(A, p, options.eps, added, options.eigen_fix, finite)
    # X = (A + r·I) / 2^k: one pass over the stack (the ridge is added to the scaled diagonal).
    diagonal = A.diagonal(dim1=-2, dim2=-1) + (added[:, None] if isinstance(added, torch.Tensor) else added)
    exponent = _power_of_two_scale(diagonal, p)
    X = torch.ldexp(A, -exponent[:, None, None])
    X.diagonal(dim1=-2, dim2=-1).copy_(torch.ldexp(diagonal, -exponent[:, None]))
    scale = _spectral_scale(
        X, options.scaling, options.scaling_steps, options.num_vectors, options.safety, generator, start, True
    )
    solver = {"newton": _newton_root, "ndb": _ndb_root, "chebyshev": _chebyshev_root}[options.method]
    R, factor = solver(X, p, scale, options, iterations)
    if float(p).is_integer():
        undo = torch.ldexp(torch.ones_like(scale), torch.div(-exponent, int(p), rounding_mode="trunc"))
    else:
        undo = _power_per_matrix(torch.ldexp(torch.ones_like(scale), exponent), -1.0 / p)
    return _symmetric(R, undo if factor is None else factor * undo)


def _check_like(name: str, value: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype) -> None:
    if value is not None and (
        not isinstance(value, torch.Tensor) or value.shape != shape or value.dtype != dtype
    ):
        got = (
            f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
        )
        raise TypeError(f"{name} must be a tensor of shape {tuple(shape)} and dtype {dtype}; got {got}")


# On the CPU a stack is solved in chunks of at most this many matrix elements per buffer and torch
# thread (512 KiB of fp32): the iterations' few buffers then stay in the cores' caches. Measured on
# one thread (NDB, p = 4): 128 x 128 stacks 1.7x and 256 x 256 stacks 1.3x faster than one call on
# the whole stack; eigh, Newton and Chebyshev gain 1.1-1.5x.
CPU_CHUNK_ELEMENTS = 1 << 17


def root_matmuls(method: str, p: int, *, steps: int = 10, degree: int = 40) -> int | None:
    """The ``n × n`` matmuls of one inverse ``p``-th root by ``method`` (``None`` for ``"eigh"``,
    which is not made of matmuls); spectral scaling's matrix-vector products not included.

    ``ndb`` (``p = 2^k``): ``k`` stages (one for ``p ≤ 2``) of ``3(steps − 1)`` (the first step
    needs one, the last two), plus one for ``p = 1``: ``p = 4``, 10 steps: 54. ``newton``: per step
    ``X·N``, ``N^p`` by repeated squaring (``⌊log₂ p⌋ + popcount(p) − 1``) and ``N^p·M``: ``p = 4``:
    4. ``chebyshev``: ``degree`` (Clenshaw).
    """
    check_choice("method", method, METHODS)
    if method == "ndb":
        stages = max(int(math.log2(p)), 1)
        count = stages * 3 * (steps - 1) if steps > 1 else stages - 1
        return count + (1 if p == 1 else 0)
    if method == "newton":
        return steps * (2 + int(math.log2(p)) + bin(p).count("1") - 1)
    if method == "chebyshev":
        return degree
    return None


def matrices_per_chunk(stacked: torch.Tensor, elements: int) -> int:
    """Matrices of an ``(N, m, n)`` stack per chunk: all ``N`` on an accelerator; on the CPU as many
    as fit in ``elements`` per torch thread (at least one); all under ``torch.compile``, which fuses
    the passes itself."""
    if stacked.device.type != "cpu" or torch.compiler.is_compiling():
        return max(stacked.shape[0], 1)
    return max(1, elements * torch.get_num_threads() // (stacked.shape[-2] * stacked.shape[-1]))
