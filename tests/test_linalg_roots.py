"""Accuracy and behaviour of the batched inverse-root solvers in ``dash_shampoo.linalg.roots``.

Every accuracy test compares with a float64 reference written out here: ``Q diag(λ^(-1/p)) Qᵀ``
from ``torch.linalg.eigh`` of ``A + eps·I`` in float64. Test matrices are ``Q diag(λ) Qᵀ`` with
``Q`` a random orthogonal matrix (QR of a Gaussian matrix from a seeded generator, signs fixed) and
``λ`` chosen: log-spaced from 1 down to ``1/cond``, clustered, rank-deficient, zero, n = 1.
fp32 inputs are compared with the reference of the fp32 matrix itself (upcast), so the rounding of
the input to fp32 is not counted against the solver.

Tolerances (``rounding_bound``): a backward-stable fp32 computation perturbs each eigenvalue by
about ``sqrt(n)·ε·λ_max``; the smallest eigenvalue then moves by ``sqrt(n)·ε·cond`` relatively and
its root ``λ^(-1/p)`` by ``1/p`` of that, plus ``sqrt(n)·ε`` for the products that rebuild the
matrix: ``rel_err <= sqrt(n)·ε·(1 + cond/p)``. ``X^p`` undoes the ``1/p``, so the residual bound is
``sqrt(n)·ε·(p + cond)``. Measured errors sit 3x to 40x below these bounds (numbers in each test).

The iterative methods (coupled Newton, NDB) run a fixed number of steps: on ill-conditioned
matrices they have not converged after the default 10 steps, which the tests assert with windows
around the measured errors (a factor 3 each way), next to the step counts that do converge.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import random_orthogonal, root_and_iterations, spd_stack

from dash_shampoo.linalg import (
    EIGEN_FIXES,
    METHODS,
    eigh_with_fallback,
    inverse_root,
)

EPS32 = torch.finfo(torch.float32).eps  # 2^-23 ≈ 1.19e-7
EPS64 = torch.finfo(torch.float64).eps  # 2^-52 ≈ 2.2e-16
N_DIM = 32  # matrix size of the accuracy tests
N_STACK = 4  # matrices per stack
P_VALUES = {"eigh": (1, 2, 3, 4), "newton": (1, 2, 3, 4), "ndb": (1, 2, 4, 8), "chebyshev": (1, 2, 3, 4)}
METHOD_P = [(m, p) for m in METHODS for p in P_VALUES[m]]
# Chebyshev settings whose series error (~exp(-2·d·sqrt(a)) = exp(-16) = 1e-7) is below fp32
# rounding, for tests about everything but the series itself.
CONVERGED_CHEBYSHEV = {"degree": 80, "interval_lower": 1e-2}


pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------
# Test matrices and the float64 reference
# ---------------------------------------------------------------------------------------------


def log_spectrum(n: int, cond: float) -> torch.Tensor:
    """n eigenvalues log-spaced from 1 down to 1/cond (λ_max = 1, condition number cond)."""
    return torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)


def log_stack(cond: float, n: int = N_DIM, N: int = N_STACK, seed: int = 0) -> torch.Tensor:
    return spd_stack(log_spectrum(n, cond).expand(N, n), seed)


def clustered_spectrum(n: int) -> torch.Tensor:
    """Half the eigenvalues within 1e-6 of 1, half within 1e-8 of 1e-2 (cond 100, multiplicities)."""
    top = 1 + 1e-6 * torch.arange(n // 2, dtype=torch.float64)
    bottom = 1e-2 + 1e-8 * torch.arange(n - n // 2, dtype=torch.float64)
    return torch.cat([top, bottom])


def rank_deficient(
    n: int = 16, rank: int = 8, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PSD matrix of the given rank (nonzero spectrum log-spaced in [1e-2, 1]) and its range."""
    generator = torch.Generator().manual_seed(seed)
    Q = random_orthogonal(n, generator)
    lam = torch.cat([log_spectrum(rank, 1e2), torch.zeros(n - rank, dtype=torch.float64)])
    A = (Q * lam) @ Q.mT
    return ((A + A.mT) / 2)[None], Q[:, :rank], lam[:rank]


def reference_root(A: torch.Tensor, p: float, eps: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``(A + eps·I)^(-1/p)`` in float64: ``Q diag(λ^(-1/p)) Qᵀ`` from ``torch.linalg.eigh``.

    ``eps`` may be a tensor of shape (N,) (one ridge per matrix).
    """
    A = A.to(torch.float64)
    eps = torch.as_tensor(eps, dtype=torch.float64).reshape(-1, 1, 1)
    lam, Q = torch.linalg.eigh(A + eps * torch.eye(A.shape[-1], dtype=torch.float64))
    return (Q * lam.pow(-1.0 / p)[..., None, :]) @ Q.mT


def rel_err(X: torch.Tensor, R: torch.Tensor) -> float:
    """Largest relative Frobenius error ``||X − R||_F / ||R||_F`` over the stack."""
    X = X.to(torch.float64)
    return (torch.linalg.matrix_norm(X - R) / torch.linalg.matrix_norm(R)).max().item()


def residual(X: torch.Tensor, A: torch.Tensor, p: int, eps: float = 0.0) -> float:
    """Largest ``||X^p (A + eps·I) − I||_F / sqrt(n)`` over the stack (RMS entry of the residual)."""
    n = A.shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    M = torch.linalg.matrix_power(X.to(torch.float64), p) @ (A.to(torch.float64) + eps * eye)
    return (torch.linalg.matrix_norm(M - eye) / math.sqrt(n)).max().item()


def rounding_bound(n: int, cond: float, p: float, eps: float = EPS32) -> float:
    """Relative error of a root computed stably in precision ``eps`` (see the module docstring)."""
    return math.sqrt(n) * eps * (1 + cond / p)


def residual_bound(n: int, cond: float, p: float, eps: float = EPS32) -> float:
    return math.sqrt(n) * eps * (p + cond)


def bound_scale64(A: torch.Tensor) -> torch.Tensor:
    """The ``"bound"`` scale ``min(||A||_F, max row sum of |A|)`` in float64, shape (N,)."""
    A = A.to(torch.float64)
    return torch.minimum(torch.linalg.matrix_norm(A), A.abs().sum(dim=-1).amax(dim=-1))


def chebyshev_target(A: torch.Tensor, p: float, interval_lower: float, eps: float = 0.0) -> torch.Tensor:
    """What the Chebyshev solver approximates: ``(A + eps·I + a·s·I)^(-1/p)``, ``s`` the bound scale."""
    n = A.shape[-1]
    ridged = A.to(torch.float64) + eps * torch.eye(n, dtype=torch.float64)
    return reference_root(ridged, p, interval_lower * bound_scale64(ridged))


# ---------------------------------------------------------------------------------------------
# eigh
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [1e1, 1e4])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 2.5])
def test_eigh_fp32_matches_reference(p, cond):
    # Measured (n=32): cond 10: 1.1e-6 (p=1) .. 6.8e-7 (p=4); cond 1e4: 2.5e-4 (p=1), 4.3e-5 (p=4).
    # Residual measured 1.2e-6..2.3e-4. Bounds 7x (cond 10) to 40x (cond 1e4, p=4) above.
    A = log_stack(cond).float()
    X = inverse_root(A, p, "eigh")
    assert X.dtype == torch.float32
    assert rel_err(X, reference_root(A, p)) < rounding_bound(N_DIM, cond, p)
    if isinstance(p, int):
        assert residual(X, A, p) < residual_bound(N_DIM, cond, p)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_eigh_fp64_accurate_at_cond_1e8(p):
    # fp64 inputs are decomposed in fp64: measured rel err 8e-17, residual 2.7e-9 at cond 1e8,
    # against the fp64 bounds sqrt(n)·ε64·(1 + 1e8/p) >= 3e-8 and sqrt(n)·ε64·1e8 = 1.3e-7.
    A = log_stack(1e8)
    X = inverse_root(A, p, "eigh")
    assert X.dtype == torch.float64
    assert rel_err(X, reference_root(A, p)) < rounding_bound(N_DIM, 1e8, p, EPS64)
    assert residual(X, A, p) < residual_bound(N_DIM, 1e8, p, EPS64)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_eigh_fp32_cond_1e8_needs_a_ridge(p):
    # fp32 cannot resolve eigenvalues below ~ε·λ_max = 1e-7: without a ridge the measured error at
    # cond 1e8 is 0.19 (p=4) to 0.45 (p=1). With eps = 1e-4 (relative to λ_max = 1), the "shift"
    # treatment adds eps twice (documented), so the result is (A + 2·eps·I)^(-1/p): effective
    # condition number ~ 1/(2e-4) = 5e3, within the fp32 bound for that.
    A = log_stack(1e8).float()
    assert rel_err(inverse_root(A, p, "eigh"), reference_root(A, p)) > 0.1
    eps = 1e-4
    X = inverse_root(A, p, "eigh", eps=eps)
    assert rel_err(X, reference_root(A, p, 2 * eps)) < rounding_bound(N_DIM, 1 / (2 * eps), p)


def test_eigh_shift_adds_eps_twice_to_psd_matrices():
    # Documented (eigen_fix 'shift'): λ(A + eps·I) are shifted by eps again. The difference from
    # (A + eps·I)^(-1/p) is large here (smallest eigenvalue 1e-2 against eps = 1e-2: ~15 %).
    A = log_stack(1e2, n=8)
    eps = 1e-2
    X = inverse_root(A, 2, "eigh", eps=eps)
    assert rel_err(X, reference_root(A, 2, 2 * eps)) < 1e-14
    assert rel_err(X, reference_root(A, 2, eps)) > 0.05


def _indefinite(n: int = 8) -> torch.Tensor:
    lam = torch.linspace(-0.5, 1.0, n, dtype=torch.float64)
    return spd_stack(lam.expand(2, n), seed=4), lam


def _root_from_spectrum(A: torch.Tensor, weights_of) -> torch.Tensor:
    lam, Q = torch.linalg.eigh(A.to(torch.float64))
    return (Q * weights_of(lam)[..., None, :]) @ Q.mT


@pytest.mark.parametrize("p", [1, 2, 4])
def test_eigh_shift_on_indefinite_matrix(p):
    # "shift": λ(A + eps·I) − min(λ_min, 0) + eps = λ_A − λ_A,min + eps when A + eps·I is indefinite.
    A, _ = _indefinite()
    eps = 1e-3
    X = inverse_root(A, p, "eigh", eps=eps, check=False)  # check=False: indefinite on purpose
    expected = _root_from_spectrum(A, lambda lam: (lam - lam.amin(-1, keepdim=True) + eps).pow(-1.0 / p))
    # Smallest shifted eigenvalue is eps = 1e-3 against λ_max ≈ 1.5: cond 1.5e3, fp64 bound.
    assert rel_err(X, expected) < rounding_bound(8, 1.5e3, p, EPS64)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_eigh_abs_on_indefinite_and_psd(p):
    # "abs": (|λ_A| + eps)^(-1/p); on a PSD matrix that is (A + eps·I)^(-1/p) (eps once).
    A, _ = _indefinite()
    eps = 1e-3
    X = inverse_root(A, p, "eigh", eps=eps, eigen_fix="abs", check=False)
    expected = _root_from_spectrum(A, lambda lam: (lam.abs() + eps).pow(-1.0 / p))
    # The linspace spectrum has no eigenvalue at 0 (|λ| >= 0.07), so cond <= 1/0.07 < 20.
    assert rel_err(X, expected) < rounding_bound(8, 20, p, EPS64)
    B = log_stack(1e3, n=8).float()
    Y = inverse_root(B, p, "eigh", eps=eps, eigen_fix="abs")
    assert rel_err(Y, reference_root(B, p, eps)) < rounding_bound(8, 1e3, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_eigh_pinv_rank_deficient_is_pseudo_inverse_root(p, dtype):
    # With eps = 0, "pinv" gives Q_r diag(λ_r^(-1/p)) Q_rᵀ on the range and 0 on the null space.
    # The 8 zero eigenvalues come out of fp32 eigh as ±~1e-8, below the cutoff n·ε·λ_max = 1.9e-6.
    # Range condition number 100; measured fp32 9e-6 (p=1) .. 5.5e-6 (p=4), fp64 1e-14.
    A, Q_range, lam = rank_deficient()
    A = A.to(dtype)
    X = inverse_root(A, p, "eigh", eigen_fix="pinv")
    expected = (Q_range * lam.pow(-1.0 / p)) @ Q_range.mT
    eps = EPS32 if dtype == torch.float32 else EPS64
    assert rel_err(X, expected[None]) < rounding_bound(16, 1e2, p, eps)
    # X^p A is the orthogonal projector onto the range.
    projector = Q_range @ Q_range.mT
    Xp_A = torch.linalg.matrix_power(X.double(), p) @ A.double()
    assert torch.linalg.matrix_norm(Xp_A - projector).item() / 4 < residual_bound(16, 1e2, p, eps)
    # The null space is mapped to (nearly) zero: the fp32 eigenvectors leave the range by about
    # ε·λ_max/gap, so what remains is relative to ||X|| as small as the error bound.
    null = torch.linalg.svd(Q_range.mT).Vh[8:].mT  # orthonormal basis of the null space
    leak = torch.linalg.matrix_norm(X.double()[0] @ null) / torch.linalg.matrix_norm(X.double()[0])
    assert leak.item() < rounding_bound(16, 1e2, p, eps)


def test_eigh_pinv_zero_matrix_gives_zero_root():
    Z = torch.zeros(3, 5, 5)
    X = inverse_root(Z, 2, "eigh", eigen_fix="pinv")
    assert torch.equal(X, torch.zeros_like(Z))


def test_eigh_pinv_equals_shift_on_full_rank():
    A = log_stack(1e3, n=16).float()
    torch.testing.assert_close(
        inverse_root(A, 2, "eigh", eigen_fix="pinv"), inverse_root(A, 2, "eigh"), rtol=1e-6, atol=0
    )


def test_eigh_singular_without_ridge_is_not_finite():
    # Documented: with eps = 0 a singular matrix gives non-finite roots except with "pinv"
    # (a zero matrix gives inf weights and inf·0 = NaN entries).
    Z = torch.zeros(2, 4, 4)
    for fix in ("shift", "abs"):
        assert not torch.isfinite(inverse_root(Z, 2, "eigh", eigen_fix=fix)).any()


# ---------------------------------------------------------------------------------------------
# eigh fallback
# ---------------------------------------------------------------------------------------------


def _stack_with_bad_rows() -> torch.Tensor:
    A = log_stack(1e2, n=8, N=5).float()
    A[1, 2, 3] = float("nan")
    A[3, 0, 0] = float("inf")
    return A


def test_eigh_with_fallback_marks_non_finite_matrices():
    A = _stack_with_bad_rows()
    values, vectors, failed = eigh_with_fallback(A)
    assert failed.tolist() == [False, True, False, True, False]
    ok = ~failed
    expected_values, expected_vectors = torch.linalg.eigh(A[ok])
    # The good matrices are decomposed exactly as on their own.
    assert torch.equal(values[ok], expected_values)
    assert torch.equal(vectors[ok], expected_vectors)
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all()


def test_eigh_with_fallback_16_bit_inputs_give_fp32():
    A = log_stack(1e1, n=4, N=2).to(torch.bfloat16)
    values, vectors, failed = eigh_with_fallback(A)
    assert values.dtype == vectors.dtype == torch.float32
    assert not failed.any()


@pytest.mark.parametrize("eigen_fix", EIGEN_FIXES)
def test_inverse_root_nan_only_for_bad_rows(eigen_fix):
    A = _stack_with_bad_rows()
    X = inverse_root(A, 2, "eigh", eigen_fix=eigen_fix)
    bad = torch.tensor([False, True, False, True, False])
    assert torch.isnan(X[bad]).all()
    assert torch.isfinite(X[~bad]).all()
    # The good rows are the same as when computed without the bad ones.
    assert torch.equal(X[~bad], inverse_root(A[~bad], 2, "eigh", eigen_fix=eigen_fix))


def _fake_eigh(monkeypatch, should_fail):
    real = torch.linalg.eigh
    calls = []

    def fake(X, *args, **kwargs):
        calls.append((X.dtype, X.ndim))
        if should_fail(X):
            raise RuntimeError("fake eigh failure")
        return real(X, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", fake)
    return calls


def test_eigh_fallback_retries_in_float64(monkeypatch):
    A = log_stack(1e2, n=8, N=3).float()
    expected = inverse_root(A, 2, "eigh")
    calls = _fake_eigh(monkeypatch, lambda X: X.dtype == torch.float32)
    values, _, failed = eigh_with_fallback(A)
    assert calls == [(torch.float32, 3), (torch.float64, 3)]
    assert values.dtype == torch.float32 and not failed.any()
    X = inverse_root(A, 2, "eigh")
    assert X.dtype == torch.float32
    # fp64 decomposition rounded to fp32: differs from the fp32 one by the fp32 bound (cond 100).
    assert rel_err(X, expected.double()) < rounding_bound(8, 1e2, 2)


def test_eigh_fallback_one_by_one_isolates_the_failing_matrix(monkeypatch):
    A = log_stack(1e2, n=8, N=4).float()
    reference = reference_root(A, 2)
    A[2] = torch.eye(8) * 7.0  # marks the matrix the fake eigh refuses when given alone
    _fake_eigh(monkeypatch, lambda X: X.ndim == 3 or bool(X[0, 0] == 7.0))
    values, vectors, failed = eigh_with_fallback(A)
    assert failed.tolist() == [False, False, True, False]
    assert torch.equal(values[2], torch.ones(8)) and torch.equal(vectors[2], torch.eye(8))
    X = inverse_root(A, 2, "eigh")
    assert torch.isnan(X[2]).all()
    keep = [0, 1, 3]
    assert rel_err(X[keep], reference[keep]) < rounding_bound(8, 1e2, 2)


# ---------------------------------------------------------------------------------------------
# Coupled Newton
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_newton_converges_on_well_conditioned(p):
    # cond 10, default 10 steps: measured rel err 3-5e-7, residual 7e-7..1.7e-6.
    A = log_stack(1e1).float()
    X = inverse_root(A, p, "newton")
    assert rel_err(X, reference_root(A, p)) < rounding_bound(N_DIM, 1e1, p)
    assert residual(X, A, p) < residual_bound(N_DIM, 1e1, p)


# Measured rel err of the default 10 steps at cond 1e4 (n = 32, fp32): the iteration approaches
# each eigenvalue's root monotonically from below and has not reached the small ones yet.
NEWTON_10_STEPS_COND_1E4 = {1: 0.92, 2: 0.40, 3: 0.145, 4: 0.059}


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_newton_10_steps_not_converged_at_cond_1e4(p):
    A = log_stack(1e4).float()
    err = rel_err(inverse_root(A, p, "newton"), reference_root(A, p))
    measured = NEWTON_10_STEPS_COND_1E4[p]
    # Far above the fp32 bound (<= 6.7e-3): not converged. Below 1: monotone from below.
    assert measured / 3 < err < min(1.0, 3 * measured)
    assert err > 5 * rounding_bound(N_DIM, 1e4, p)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_newton_with_more_steps_converges_at_cond_1e4(p):
    # steps=50, tol=1e-6: measured 1.2e-4 (p=1) .. 1.2e-5 (p=4), like eigh.
    A = log_stack(1e4).float()
    X = inverse_root(A, p, "newton", steps=50, tol=1e-6)
    assert rel_err(X, reference_root(A, p)) < rounding_bound(N_DIM, 1e4, p)
    assert residual(X, A, p) < residual_bound(N_DIM, 1e4, p)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_newton_fp64_cond_1e8_needs_40_steps(p):
    # In fp64 only the iteration count matters. 10 steps: measured 0.84 (p=4) .. 1.0 (p=1).
    # 40 steps: measured 3.6e-10 .. 1.3e-9 (the small eigenvalues need ~log(1e8)/log(2.4) ~ 21
    # growth steps plus quadratic convergence).
    A = log_stack(1e8)
    R = reference_root(A, p)
    assert rel_err(inverse_root(A, p, "newton"), R) > 0.5
    X = inverse_root(A, p, "newton", steps=40)
    assert rel_err(X, R) < rounding_bound(N_DIM, 1e8, p, EPS64)
    assert residual(X, A, p) < residual_bound(N_DIM, 1e8, p, EPS64)


# ---------------------------------------------------------------------------------------------
# Newton–Denman–Beavers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_ndb_converges_on_well_conditioned(p):
    # cond 10, default 10 steps per stage: measured rel err 2.3-5.7e-7, residual 7e-7..2.5e-6.
    A = log_stack(1e1).float()
    X = inverse_root(A, p, "ndb")
    assert rel_err(X, reference_root(A, p)) < rounding_bound(N_DIM, 1e1, p)
    assert residual(X, A, p) < residual_bound(N_DIM, 1e1, p)


# Measured rel err of 10 steps per stage at cond 1e4 (n = 32, fp32). The smallest scaled
# eigenvalue 1e-4 grows by 9/4 per step and needs ~12 steps to reach O(1).
NDB_10_STEPS_COND_1E4 = {1: 0.78, 2: 0.475, 4: 0.34, 8: 0.12}


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_ndb_10_steps_not_converged_at_cond_1e4(p):
    A = log_stack(1e4).float()
    err = rel_err(inverse_root(A, p, "ndb"), reference_root(A, p))
    measured = NDB_10_STEPS_COND_1E4[p]
    assert measured / 3 < err < 3 * measured
    assert err > 5 * rounding_bound(N_DIM, 1e4, p)


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_ndb_with_25_steps_converges_at_cond_1e4(p):
    # Measured 1.2e-4 (p=1) .. 9.6e-6 (p=8), residual 2.4-4.6e-4.
    A = log_stack(1e4).float()
    X = inverse_root(A, p, "ndb", steps=25)
    assert rel_err(X, reference_root(A, p)) < rounding_bound(N_DIM, 1e4, p)
    assert residual(X, A, p) < residual_bound(N_DIM, 1e4, p)


@pytest.mark.parametrize("p", [1, 2, 4, 8])
def test_ndb_fp64_cond_1e8_needs_40_steps(p):
    # 10 steps: measured 0.45 (p=4), 1.0 (p=1, 2), 4.0 (p=8: the unconverged square roots of the
    # first stages feed the last stage a wrong matrix, so the error is not bounded by 1).
    # 40 steps: measured 1.5e-10 .. 2.1e-9, residual 1.4e-7.
    A = log_stack(1e8)
    R = reference_root(A, p)
    assert rel_err(inverse_root(A, p, "ndb"), R) > 0.15
    X = inverse_root(A, p, "ndb", steps=40)
    assert rel_err(X, R) < rounding_bound(N_DIM, 1e8, p, EPS64)
    # The Newton–Schulz residual is measured 1.2-1.7e-7, just above the generic bound 1.3e-7 for
    # p = 1, 2: ZY − I is not driven below ~ε64·cond by the coupled iteration; allow 4x.
    assert residual(X, A, p) < 4 * residual_bound(N_DIM, 1e8, p, EPS64)


# ---------------------------------------------------------------------------------------------
# Known limitation: the Newton iterations need a spectrum in (0, λ_max]
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["newton", "ndb"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_iterations_diverge_on_singular_fp32_without_ridge(method, p):
    # A rank-8 fp32 matrix has eigenvalues ~ -6e-9 from rounding. Both iterations amplify a
    # negative eigenvalue at every step (NDB: t ← t·((3 − t)/2)², Newton: m ← m·((p+1−m)/p)^p), so
    # with enough steps the result overflows: measured finite at 10 steps, NaN from 30 steps on.
    # This is the documented convergence condition (spectrum of the scaled matrix in (0, 2)).
    A, _, _ = rank_deficient()
    A = A.float()
    assert torch.linalg.eigvalsh(A.double()).min() < 0
    assert torch.isfinite(inverse_root(A, p, method)).all()
    assert not torch.isfinite(inverse_root(A, p, method, steps=50)).all()
    # A ridge of 1e-4·λ_max lifts the rounding eigenvalues: finite and accurate (cond 1e4).
    eps = 1e-4
    X = inverse_root(A, p, method, steps=50, eps=eps)
    assert torch.isfinite(X).all()
    assert rel_err(X, reference_root(A, p, eps)) < rounding_bound(16, 1 / eps, p)


@pytest.mark.parametrize("method", ["newton", "ndb"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_iterations_stay_finite_at_cond_1e8_with_relative_ridge(method, p):
    # fp32, cond 1e8, 100 steps: eps = 1e-6·λ_max keeps every eigenvalue of A + eps·I well above
    # the ~1e-8 rounding. Measured rel err against (A + eps·I)^(-1/p): 1.5e-3 .. 1.5e-2 (p=1),
    # within the fp32 bound for the effective condition number 1e6.
    A = log_stack(1e8).float()
    eps = 1e-6
    X = inverse_root(A, p, method, steps=100, eps=eps)
    assert torch.isfinite(X).all()
    assert rel_err(X, reference_root(A, p, eps)) < rounding_bound(N_DIM, 1 / eps, p)


# ---------------------------------------------------------------------------------------------
# Chebyshev
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cond", [1e1, 1e4, 1e8])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_chebyshev_matches_its_ridged_target(p, cond):
    # Chebyshev approximates (A + a·s·I)^(-1/p), s the "bound" scale (relative ridge a·s, see the
    # docstring). With a = 1e-2 the series error is ~exp(−2·d·sqrt(a)) = exp(−16) = 1e-7 at
    # d = 80, so what remains is fp32 rounding for the effective condition number
    # (λ_max + a·s)/(λ_min + a·s) <= 1 + 1/a. Measured 1e-7 .. 2e-6.
    a, degree = 1e-2, 80
    A = log_stack(cond).float()
    X = inverse_root(A, p, "chebyshev", degree=degree, interval_lower=a)
    target = chebyshev_target(A, p, a)
    truncation = 10 * math.exp(-2 * degree * math.sqrt(a))
    assert rel_err(X, target) < rounding_bound(N_DIM, 1 + 1 / a, p) + truncation
    if isinstance(p, int):
        s = bound_scale64(A)[:, None, None]
        ridged = A.double() + a * s * torch.eye(N_DIM, dtype=torch.float64)
        assert residual(X, ridged, p) < residual_bound(N_DIM, 1 + 1 / a, p) + p * truncation


@pytest.mark.parametrize("p", [1, 2, 4])
def test_chebyshev_series_converges_at_the_documented_rate(p):
    # fp64, a = 1e-3: the error against the exact target falls like exp(−2·d·sqrt(a))
    # (0.08, 1.8e-3, 3.2e-6 at d = 40, 100, 200), times a constant measured <= 7.1 (p=1).
    a = 1e-3
    A = log_stack(1e1)
    target = chebyshev_target(A, p, a)
    errors = []
    for degree in (40, 100, 200):
        err = rel_err(inverse_root(A, p, "chebyshev", degree=degree, interval_lower=a), target)
        assert err < 15 * math.exp(-2 * degree * math.sqrt(a))
        errors.append(err)
    # Geometric decrease: each step in degree buys at least 10x (measured 40x..300x).
    assert errors[0] > 10 * errors[1] > 100 * errors[2]


def test_chebyshev_default_is_a_ridged_approximation():
    # Defaults (degree 40, a = 1e-3) on cond 10, p = 4: measured 5.1e-3 against A^(-1/4) and 3.9e-3
    # against its own target: the series has not converged (factor exp(−2.5) = 0.08) and the
    # relative ridge biases the root by up to a·s/(p·λ_min) = 5.4e-3 (s = bound scale ≈ 2).
    A = log_stack(1e1).float()
    X = inverse_root(A, 4, "chebyshev")
    plain = rel_err(X, reference_root(A, 4))
    assert 1e-3 < plain < 1.5e-2
    assert 1e-3 < rel_err(X, chebyshev_target(A, 4, 1e-3)) < 1.2e-2
    # At degree 200 the series has converged and only the ridge bias is left: between 0.3x and 1x
    # of a·s/(p·λ_min) = 5.4e-3 (measured 3.0e-3: not every eigenvalue is the smallest).
    Y = inverse_root(A, 4, "chebyshev", degree=200)
    bias = (1e-3 * bound_scale64(A) / (4 * 0.1)).max().item()
    assert 0.3 * bias < rel_err(Y, reference_root(A, 4)) < bias


def test_chebyshev_default_p1_is_inaccurate():
    # Measured fact about the defaults: for p = 1 the degree-40 series of (x + 1e-3)^(-1) is far
    # from converged (coefficients ~ a^(-1/2) ρ^(-d), ρ^(-40) = 0.08): 0.51 relative error on a
    # cond-10 stack. Degree 200 brings it to 2.4e-5 against the target.
    A = log_stack(1e1).float()
    target = chebyshev_target(A, 1, 1e-3)
    assert rel_err(inverse_root(A, 1, "chebyshev"), target) > 0.15
    assert rel_err(inverse_root(A, 1, "chebyshev", degree=200), target) < 2e-4


# ---------------------------------------------------------------------------------------------
# Special spectra for every method
# ---------------------------------------------------------------------------------------------


def _expected_for(method: str, A: torch.Tensor, p: float, eps: float = 0.0, a: float = 1e-3) -> torch.Tensor:
    """The float64 root each method computes by its documentation."""
    if method == "chebyshev":
        return chebyshev_target(A, p, a, eps)
    if method == "eigh":
        return reference_root(A, p, 2 * eps)  # "shift" adds eps twice
    return reference_root(A, p, eps)


@pytest.mark.parametrize(("method", "p"), METHOD_P)
def test_clustered_eigenvalues(method, p):
    # cond 100 with two clusters of multiplicity 16: eigenvectors inside a cluster are arbitrary but
    # the root is well determined. Measured: eigh 1.3e-5, newton 2e-6, ndb 3.6e-6 (p=2), against
    # sqrt(n)·ε·(1 + 100/p) >= 1.9e-5. Chebyshev at degree 80, a = 1e-2 against its target.
    # Newton p = 1 needs more than the default 10 steps here (measured 5.9e-3 after 10: the
    # smallest scaled eigenvalue 5e-3 only doubles per step), so the iterations get 20.
    A = spd_stack(clustered_spectrum(N_DIM).expand(N_STACK, N_DIM), seed=2).float()
    kwargs = CONVERGED_CHEBYSHEV if method == "chebyshev" else {"steps": 20}
    X = inverse_root(A, p, method, **kwargs)
    assert rel_err(X, _expected_for(method, A, p, a=1e-2)) < rounding_bound(N_DIM, 1e2, p)


@pytest.mark.parametrize(("method", "p"), METHOD_P)
def test_one_by_one_matrices(method, p):
    # n = 1: the root of λ is λ^(-1/p) (Chebyshev: (λ·(1 + a))^(-1/p), the bound scale being λ).
    # A few fp32 roundings: 1e-6 relative.
    lam = torch.tensor([4.0, 0.25, 9.0, 1e-3], dtype=torch.float64)
    A = lam[:, None, None].float()
    kwargs = CONVERGED_CHEBYSHEV if method == "chebyshev" else {}
    X = inverse_root(A, p, method, **kwargs)
    expected = (lam * (1 + 1e-2) if method == "chebyshev" else lam).pow(-1.0 / p)
    torch.testing.assert_close(X.flatten().double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("method", "p"), METHOD_P)
def test_zero_matrices_with_ridge(method, p):
    # A = 0, eps > 0: every method gives a multiple of I: eps^(-1/p) (eigh "shift": (2·eps)^(-1/p);
    # Chebyshev: (eps·(1 + a))^(-1/p), the bound scale of eps·I being eps). fp32 roundings: 1e-6.
    eps = 1e-4
    A = torch.zeros(3, 6, 6)
    kwargs = CONVERGED_CHEBYSHEV if method == "chebyshev" else {}
    X = inverse_root(A, p, method, eps=eps, **kwargs)
    assert rel_err(X, _expected_for(method, A, p, eps, a=1e-2)) < 1e-6


# Measured relative error of the default Chebyshev series (degree 40, a = 1e-3) at the top of its
# interval, B = A/s = I (n = 1, or any matrix whose "bound" scale is tight): there all Chebyshev
# polynomials equal 1 and the truncated tail Σ_{k>40} c_k adds up with one sign.
CHEBYSHEV_DEFAULT_AT_TOP = {1: 2.44, 2: 0.0369, 3: 0.00744, 4: 0.00305}


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_chebyshev_default_error_at_the_top_of_the_interval(p):
    # A consequence of the default degree and interval (series factor exp(-2.5) times a^(-1/p)):
    # for p = 1 the largest eigenvalue's root comes out 3.4x too large. Checked in float64 against
    # coefficients from a 200000-node quadrature: it is the truncation, not the evaluation.
    lam = torch.tensor([4.0, 0.25], dtype=torch.float64)
    X = inverse_root(lam[:, None, None].float(), p, "chebyshev")
    expected = (lam * (1 + 1e-3)).pow(-1.0 / p)
    err = (X.flatten().double() / expected - 1).abs().max().item()
    measured = CHEBYSHEV_DEFAULT_AT_TOP[p]
    assert measured / 1.5 < err < measured * 1.5
    # Degree 200 (series factor exp(-12.6) = 3e-6): measured 1e-4 (p=1) .. 4e-8 (p=4).
    Y = inverse_root(lam[:, None, None].float(), p, "chebyshev", degree=200)
    assert (Y.flatten().double() / expected - 1).abs().max().item() < 2e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_empty_stack(method, dtype):
    A = torch.zeros(0, 5, 5, dtype=dtype)
    X = inverse_root(A, 2, method)
    assert X.shape == (0, 5, 5) and X.dtype == dtype
    out = torch.empty(0, 5, 5, dtype=dtype)
    assert inverse_root(A, 2, method, out=out) is out


# ---------------------------------------------------------------------------------------------
# API behaviour: dtypes, out=, the input is not modified, batching, finiteness
# ---------------------------------------------------------------------------------------------

UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_dtype_preserved_and_accurate(method, dtype):
    A = log_stack(1e1, n=16, N=3).to(dtype)
    kwargs = CONVERGED_CHEBYSHEV if method == "chebyshev" else {}
    X = inverse_root(A, 2, method, **kwargs)
    assert X.dtype == dtype
    # 16-bit: computed in fp32, so only the output rounding (unit roundoff u per entry, so <= u in
    # relative Frobenius norm) counts: measured fp16 2.7e-4 < 4.9e-4, bf16 2.0e-3 < 3.9e-3.
    if dtype in UNIT_ROUNDOFF:
        tol = UNIT_ROUNDOFF[dtype]
    elif dtype == torch.float32:
        tol = rounding_bound(16, 10, 2)
    else:  # fp64: measured 6e-17 (eigh), 2e-15 (Newton), 1.5e-8 (Chebyshev series at d = 80)
        tol = 1e-6 if method == "chebyshev" else rounding_bound(16, 10, 2, EPS64) * 10
    assert rel_err(X, _expected_for(method, A, 2, a=1e-2)) < tol


@pytest.mark.parametrize("method", METHODS)
def test_out_is_written_in_place_and_returned(method):
    A = log_stack(1e2, n=8, N=3).float()
    out = torch.full_like(A, float("nan"))
    pointer = out.data_ptr()
    result = inverse_root(A, 2, method, out=out)
    assert result is out and out.data_ptr() == pointer
    assert torch.equal(out, inverse_root(A, 2, method))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_input_is_not_modified(method, dtype):
    # eps > 0 makes every solver add to a diagonal: it must be a copy's.
    A = log_stack(1e2, n=8, N=3).to(dtype)
    before = A.clone()
    inverse_root(A, 2, method, eps=1e-3, tol=1e-5 if method in ("newton", "ndb") else None)
    assert torch.equal(A, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("method", "p"), METHOD_P)
def test_roots_are_exactly_symmetric(method, p, dtype):
    # Every solver symmetrises its result (the Newton products and Q diag Qᵀ are not symmetric to
    # the last bit otherwise; measured: unsymmetrised eigh roots differ from their transpose).
    A = log_stack(1e2, n=16, N=3).to(dtype)
    X = inverse_root(A, p, method)
    assert torch.equal(X, X.mT)


def _mixed_magnitude_stack() -> torch.Tensor:
    # Five matrices of different condition numbers and magnitudes (λ_max from 1e-3 to 1e3): a
    # solver that shared anything between matrices (a common scale, a common stopping mask) would
    # give different results batched and alone.
    conds = [1e1, 1e3, 1e2, 1e4, 3.0]
    mags = [1e-3, 1.0, 1e3, 10.0, 0.5]
    spectra = torch.stack([m * log_spectrum(16, c) for c, m in zip(conds, mags)])
    return spd_stack(spectra, seed=7).float()


@pytest.mark.parametrize(("method", "p"), METHOD_P)
def test_batched_equals_unbatched_with_deterministic_scaling(method, p):
    # "fro" scaling involves no random vectors, and the default 10 steps are not converged at
    # cond 1e3-1e4, so the result depends on every detail of the per-matrix computation.
    A = _mixed_magnitude_stack()
    kwargs = {"scaling": "fro", "tol": 1e-5} if method in ("newton", "ndb") else {"scaling": "fro"}
    if method == "eigh":
        kwargs = {}
    X = inverse_root(A, p, method, **kwargs)
    for i in range(A.shape[0]):
        alone = inverse_root(A[i : i + 1], p, method, **kwargs)
        torch.testing.assert_close(X[i : i + 1], alone, rtol=1e-6, atol=1e-6 * alone.abs().max().item())


@pytest.mark.parametrize("method", ["newton", "ndb", "chebyshev"])
def test_batched_equals_unbatched_with_power_scaling(method):
    # Power iteration draws different start vectors for a stack of 5 and for one matrix, so the
    # scale differs slightly (measured 2-5e-6 relative in the root); converged roots must agree
    # to the fp32 bound.
    A = log_stack(1e2, n=16, N=5).float()
    kwargs = {"scaling": "power_multi"}
    if method != "chebyshev":
        kwargs["steps"] = 30
    X = inverse_root(A, 2, method, **kwargs)
    for i in range(5):
        alone = inverse_root(A[i : i + 1], 2, method, **kwargs)
        assert rel_err(X[i : i + 1], alone.double()) < rounding_bound(16, 1e2, 2)


def _hard_inputs() -> list[torch.Tensor]:
    A_rank, _, _ = rank_deficient()
    rank_one = spd_stack(torch.cat([torch.ones(1), torch.zeros(15)]).double()[None], seed=3)
    return [
        torch.zeros(2, 16, 16),
        A_rank.float(),
        rank_one.float(),
        log_stack(1e8, n=16, N=2).float(),
        spd_stack(clustered_spectrum(16)[None], seed=5).float(),
        torch.eye(16).expand(2, 16, 16).clone(),
        torch.tensor([[[0.0]], [[1.0]], [[1e-9]]]),
        1e6 * log_stack(1e3, n=16, N=2).float(),
        1e-6 * log_stack(1e3, n=16, N=2).float(),
    ]


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("method", METHODS)
def test_finite_for_every_input_with_ridge(method, steps):
    # eps relative to the largest eigenvalue (1e-4·λ_max, or 1e-4 for a zero matrix), as a caller
    # would set it; the Newton methods also for 50 steps, where a negative rounding eigenvalue
    # would have overflowed (see test_iterations_diverge_on_singular_fp32_without_ridge).
    for A in _hard_inputs():
        lam_max = torch.linalg.eigvalsh(A.double()).amax().item()
        eps = 1e-4 * (lam_max if lam_max > 0 else 1.0)
        for p in P_VALUES[method]:
            X = inverse_root(A, p, method, eps=eps, steps=steps)
            assert torch.isfinite(X).all(), (A.shape, p)


# ---------------------------------------------------------------------------------------------
# Per-matrix iteration counts with tol
# ---------------------------------------------------------------------------------------------


def _easy_and_hard() -> torch.Tensor:
    easy = torch.linspace(1.0, 0.9, N_DIM, dtype=torch.float64)  # nearly the identity
    hard = log_spectrum(N_DIM, 1e4)
    return spd_stack(torch.stack([easy, hard]), seed=3).float()


@pytest.mark.parametrize(("solver", "p"), [(s, p) for s in ("newton", "ndb") for p in (1, 2, 4)])
def test_iteration_counts_are_per_matrix(solver, p):
    # Measured (tol 1e-4, at most 60): Newton [4, 18], [3, 15], [3, 13] and NDB [4, 15], [4, 15],
    # [7, 24] for p = 1, 2, 4 (NDB p = 4 counts both stages). Both roots converge.
    A = _easy_and_hard()
    X, iterations = root_and_iterations(A, p, solver, steps=60, tol=1e-4)
    assert iterations.dtype == torch.int64 and iterations.shape == (2,)
    easy, hard = iterations.tolist()
    assert 1 <= easy <= 8
    assert hard >= easy + 8
    assert hard < (60 if p < 4 or solver == "newton" else 120)  # stopped by tol, not by steps
    # The early stop costs accuracy no more than tol allows: within the fp32 bound of cond 1e4.
    assert rel_err(X, reference_root(A, p)) < rounding_bound(N_DIM, 1e4, p)


@pytest.mark.parametrize(
    ("solver", "p", "stages"), [("newton", 3, 1), ("ndb", 1, 1), ("ndb", 4, 2), ("ndb", 8, 3)]
)
def test_iteration_counts_without_tol_are_all_steps(solver, p, stages):
    # Without tol every matrix runs every step; NDB reports the sum over its log2(p) stages.
    _, iterations = root_and_iterations(_easy_and_hard(), p, solver, steps=7)
    assert iterations.tolist() == [7 * stages, 7 * stages]


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------


def _valid() -> torch.Tensor:
    return torch.eye(4).expand(2, 4, 4).clone()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"method": "cholesky"},
            "method must be one of 'eigh', 'newton', 'ndb', 'chebyshev'; got 'cholesky'",
        ),
        ({"method": None}, "method must be one of 'eigh', 'newton', 'ndb', 'chebyshev'; got None"),
        (
            {"scaling": "spectral"},
            "scaling must be one of 'fro', 'power', 'power_multi', 'bound'; got 'spectral'",
        ),
        ({"precision": "fp64"}, "precision must be one of 'fp32', 'tf32', 'bf16', 'fp16'; got 'fp64'"),
        ({"eigen_fix": "clip"}, "eigen_fix must be one of 'shift', 'pinv', 'abs'; got 'clip'"),
        ({"p": 0}, "p must be in (0, inf]; got 0"),
        ({"p": -2}, "p must be in (0, inf]; got -2"),
        ({"p": float("nan")}, "p must be finite; got nan"),
        ({"p": 3, "method": "ndb"}, "p must be 1 or a power of two (2, 4, 8, ...) for method 'ndb'; got 3"),
        (
            {"p": 2.0, "method": "ndb"},
            "p must be 1 or a power of two (2, 4, 8, ...) for method 'ndb'; got 2.0",
        ),
        ({"p": 2.5, "method": "newton"}, "p must be an integer >= 1 for method 'newton'; got 2.5"),
        ({"eps": -1e-3}, "eps must be in [0, inf]; got -0.001"),
        ({"eps": float("inf")}, "eps must be finite; got inf"),
        ({"steps": 0}, "steps must be in [1, inf]; got 0"),
        ({"tol": 0.0}, "tol must be in (0, inf]; got 0.0"),
        ({"tol": -1e-6}, "tol must be in (0, inf]; got -1e-06"),
        ({"degree": 0}, "degree must be in [1, inf]; got 0"),
        ({"safety": 0.0}, "safety must be in (0, inf]; got 0.0"),
        ({"safety": -2}, "safety must be in (0, inf]; got -2"),
        ({"scaling_steps": -1}, "scaling_steps must be in [0, inf]; got -1"),
        ({"num_vectors": 0}, "num_vectors must be in [1, inf]; got 0"),
        ({"interval_lower": 0.0}, "interval_lower must be in (0, inf]; got 0.0"),
    ],
)
def test_value_errors(kwargs, message):
    kwargs = {"p": 2, **kwargs}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        inverse_root(_valid(), **kwargs)


@pytest.mark.parametrize(
    ("A", "kwargs", "message"),
    [
        ([[[1.0]]], {}, "A must be a torch.Tensor of shape (N, n, n); got list"),
        (torch.eye(3), {}, "A must have shape (N, n, n); got (3, 3)"),
        (torch.zeros(2, 3, 4), {}, "A must have shape (N, n, n); got (2, 3, 4)"),
        (torch.zeros(1, 2, 3, 3), {}, "A must have shape (N, n, n); got (1, 2, 3, 3)"),
        (
            torch.eye(3, dtype=torch.int64)[None],
            {},
            "A must be a floating-point tensor; got dtype torch.int64",
        ),
        (torch.zeros(2, 0, 0), {}, "A must have n >= 1; got shape (2, 0, 0)"),
        (torch.eye(4)[None], {"steps": 2.0}, "steps must be an integer; got 2.0 of type float"),
        (torch.eye(4)[None], {"p": True}, "p must be a real number; got True of type bool"),
        (torch.eye(4)[None], {"p": "2"}, "p must be a real number; got '2' of type str"),
        (torch.eye(4)[None], {"generator": 0}, "generator must be a torch.Generator or None; got int"),
        (
            torch.eye(4)[None],
            {"out": torch.empty(1, 3, 3)},
            "out must be a tensor of shape (1, 4, 4) and dtype torch.float32; got (1, 3, 3) torch.float32",
        ),
        (
            torch.eye(4)[None],
            {"out": torch.empty(1, 4, 4, dtype=torch.float64)},
            "out must be a tensor of shape (1, 4, 4) and dtype torch.float32; got (1, 4, 4) torch.float64",
        ),
        (
            torch.eye(4)[None],
            {"out": [[0.0]]},
            "out must be a tensor of shape (1, 4, 4) and dtype torch.float32; got list",
        ),
    ],
)
def test_type_errors(A, kwargs, message):
    kwargs = {"p": 2, **kwargs}
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        inverse_root(A, **kwargs)


# ---------------------------------------------------------------------------------------------
# Extreme scales and inputs that are not symmetric positive semi-definite
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e38, 3e38, 1e-38])
def test_roots_of_matrices_at_the_ends_of_fp32(method, scale):
    """c·I near the largest and the smallest normal fp32 numbers: once ``2·scale`` overflowed and
    Newton returned zeros, NDB NaN. The root (c^(-1/4)) is representable, so it must come out,
    within fp32 rounding for the iterations and eigh (1e-6) and within the degree-40 Chebyshev
    approximation's error (measured 2.8e-3, bound 1e-2). No ridge: eps would dominate 1e-38."""
    A = torch.eye(6).expand(3, 6, 6) * scale
    X = inverse_root(A, 4, method, eps=0.0)
    expected = torch.eye(6) * scale**-0.25
    rtol = 1e-2 if method == "chebyshev" else 1e-6
    torch.testing.assert_close(X, expected.expand(3, 6, 6), rtol=rtol, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_non_symmetric_and_negative_definite_inputs_raise(method):
    A = torch.randn(2, 5, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^A\[0\] is not symmetric \(max\|A - A\^T\| = "):
        inverse_root(A, 4, method)
    negative = -torch.eye(5).expand(2, 5, 5).clone()
    negative[0] = torch.eye(5)
    with pytest.raises(ValueError, match=r"^A\[1\] is not positive semi-definite \(a diagonal entry is -1"):
        inverse_root(negative, 4, method)


def test_check_false_skips_the_input_test():
    """The opt-out for callers that know their input (the optimizer's factors are sums of g gᵀ):
    with eigen_fix='abs', -I has the root of I."""
    X = inverse_root(-torch.eye(3)[None], 2, "eigh", eigen_fix="abs", check=False)
    torch.testing.assert_close(X, torch.eye(3)[None])


def test_rounding_asymmetry_passes_the_check():
    """A factor accumulated in fp32 is symmetric only up to rounding: it is accepted."""
    G = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(1))
    A = G @ G.mT
    A = A + 1e-7 * A.abs().amax() * torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(inverse_root(A, 4, "ndb", eps=1e-3)).all()
