"""Spectral scales (``spectral_scale``, ``power_iteration``) and their effect on the Newton solvers.

λ_max of every test matrix is known exactly (it is built as ``Q diag(λ) Qᵀ`` in float64); fp32
matrices are compared with the float64 eigenvalues of the fp32 matrix itself. Slack ``1e-5`` on a
bound that holds in exact arithmetic covers fp32 rounding of the norms and of the Rayleigh
quotients (a few ε32 = 1.2e-7 times sqrt(n)).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import root_and_iterations, spd_stack

from dash_shampoo.linalg import SCALINGS, inverse_root, power_iteration, spectral_scale

N_DIM = 32
SLACK = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


def _spectra(n: int) -> dict[str, torch.Tensor]:
    f64 = torch.float64
    return {
        "log_cond_1e1": torch.logspace(0, -1, n, dtype=f64),
        "log_cond_1e4": torch.logspace(0, -4, n, dtype=f64),
        "log_cond_1e8": torch.logspace(0, -8, n, dtype=f64),
        "clustered": torch.cat(
            [1 + 1e-6 * torch.arange(n // 2, dtype=f64), torch.full((n - n // 2,), 1e-2, dtype=f64)]
        ),
        "flat": torch.ones(n, dtype=f64),
        "rank_one": torch.cat([torch.ones(1, dtype=f64), torch.zeros(n - 1, dtype=f64)]),
        "top_two_close": torch.cat(
            [torch.tensor([1.0, 0.999], dtype=f64), torch.linspace(0.5, 0.01, n - 2, dtype=f64)]
        ),
        "linear": torch.linspace(1, 0.01, n, dtype=f64),
    }


SPECTRA = tuple(_spectra(N_DIM))


def stack(name: str, dtype: torch.dtype = torch.float32, N: int = 4, seed: int = 5) -> torch.Tensor:
    # Magnitudes 1, 10, 0.1, 1000 so that a scale mixed up between matrices shows.
    magnitudes = torch.tensor([1.0, 10.0, 0.1, 1000.0], dtype=torch.float64)[:N]
    spectra = _spectra(N_DIM)[name].expand(N, N_DIM) * magnitudes[:, None]
    return spd_stack(spectra, seed).to(dtype)


def lambda_max(A: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(A.to(torch.float64)).amax(dim=-1)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# spectral_scale: the four estimates against λ_max
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", SPECTRA)
def test_fro_is_an_upper_bound_within_sqrt_n(name, dtype):
    # λ_max <= ||A||_F = sqrt(Σ λ²) <= sqrt(rank)·λ_max (measured ratios 1 (rank one) .. 5.66 (flat)).
    A = stack(name, dtype)
    lam = lambda_max(A)
    scale = spectral_scale(A, "fro").double()
    assert scale.dtype == torch.float64 and scale.shape == (4,)
    assert (scale >= lam * (1 - SLACK)).all()
    assert (scale <= math.sqrt(N_DIM) * lam * (1 + SLACK)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", SPECTRA)
def test_bound_is_between_lambda_max_and_fro(name, dtype):
    # min(||A||_F, ||A||_∞) dominates the spectral radius and never exceeds the Frobenius norm;
    # measured tighter than fro on every spectrum but rank one and log (where they tie).
    A = stack(name, dtype)
    bound = spectral_scale(A, "bound")
    fro = spectral_scale(A, "fro")
    assert (bound.double() >= lambda_max(A) * (1 - SLACK)).all()
    assert (bound <= fro).all()


def test_bound_uses_the_row_sum_when_it_is_smaller():
    # Flat spectrum c·I: ||A||_F = sqrt(n)·c but every row sum of |A| is c, so "bound" is exact.
    A = 3.0 * torch.eye(N_DIM).expand(2, N_DIM, N_DIM)
    assert torch.equal(spectral_scale(A, "bound"), torch.full((2,), 3.0))
    torch.testing.assert_close(spectral_scale(A, "fro"), torch.full((2,), 3.0 * math.sqrt(N_DIM)))


# Smallest measured λ-ratio over the spectra above, 10 power steps, safety 1: one start vector
# 0.78 (log cond 1e4: a start vector with a small component on the top eigenvector), 16 vectors
# 0.988 (linear spectrum, λ_2/λ_1 = 0.97).
POWER_LOWER = {"power": 0.5, "power_multi": 0.9}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["power", "power_multi"])
@pytest.mark.parametrize("name", SPECTRA)
def test_power_estimates_are_lower_bounds_within_a_factor(name, method, dtype):
    # A Rayleigh quotient never exceeds λ_max; after 10 steps it is within the measured factor, so
    # the default safety 2 (the factor assumed by "power": 0.5) makes it an upper bound.
    A = stack(name, dtype)
    lam = lambda_max(A)
    estimate = spectral_scale(A, method, safety=1.0, generator=seeded()).double()
    assert (estimate <= lam * (1 + SLACK)).all()
    assert (estimate >= POWER_LOWER[method] * lam).all()
    with_safety = spectral_scale(A, method, generator=seeded()).double()
    assert (with_safety >= lam).all()


@pytest.mark.parametrize("method", SCALINGS)
def test_safety_multiplies_only_the_power_estimates(method):
    A = stack("log_cond_1e4")
    one = spectral_scale(A, method, safety=1.0, generator=seeded(3))
    three = spectral_scale(A, method, safety=3.0, generator=seeded(3))
    if method in ("power", "power_multi"):
        torch.testing.assert_close(three, 3.0 * one, rtol=1e-6, atol=0)
    else:
        assert torch.equal(three, one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", SCALINGS)
def test_zero_matrix_gives_finite_positive_scale(method, dtype):
    # Documented: never below the smallest positive normal number, so A / s is defined.
    A = torch.zeros(3, 5, 5, dtype=dtype)
    scale = spectral_scale(A, method)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(scale, torch.full((3,), torch.finfo(dtype).tiny, dtype=dtype))


@pytest.mark.parametrize("method", SCALINGS)
def test_scale_is_per_matrix(method):
    # Each matrix's scale is its own: the same matrices alone give the same numbers. Power
    # iteration draws one start block for the whole stack, so it is compared through its bounds.
    A = stack("log_cond_1e1")
    batched = spectral_scale(A, method, generator=seeded())
    alone = torch.cat([spectral_scale(A[i : i + 1], method, generator=seeded()) for i in range(4)])
    if method in ("fro", "bound"):
        assert torch.equal(batched, alone)
    else:
        # Both within [λ_max, 2·λ_max] (safety 2), and so within a factor 2 of each other.
        lam = lambda_max(A)
        for scale in (batched, alone):
            assert (scale.double() >= lam).all() and (scale.double() <= 2 * lam * (1 + SLACK)).all()


# ---------------------------------------------------------------------------------------------
# power_iteration: determinism, generator use, the global RNG
# ---------------------------------------------------------------------------------------------


def test_power_iteration_is_deterministic_for_a_seed():
    A = stack("linear")
    first = power_iteration(A, steps=3, num_vectors=4, generator=seeded(11))
    second = power_iteration(A, steps=3, num_vectors=4, generator=seeded(11))
    assert torch.equal(first, second)
    assert torch.equal(power_iteration(A, steps=3), power_iteration(A, steps=3))  # default seed


def test_power_iteration_uses_the_generator():
    # steps = 0 is the Rayleigh quotient of the random start vector itself: it depends on the seed,
    # and a generator used once has moved on.
    A = stack("linear")
    a = power_iteration(A, steps=0, generator=seeded(1))
    b = power_iteration(A, steps=0, generator=seeded(2))
    assert not torch.equal(a, b)
    generator = seeded(1)
    power_iteration(A, steps=0, generator=generator)
    assert not torch.equal(power_iteration(A, steps=0, generator=generator), a)


@pytest.mark.parametrize(
    "call",
    [
        lambda A: power_iteration(A),
        lambda A: power_iteration(A, generator=seeded(4)),
        lambda A: spectral_scale(A, "power"),
        lambda A: spectral_scale(A, "power_multi", generator=seeded(4)),
        lambda A: inverse_root(A, 2, "newton"),
        lambda A: inverse_root(A, 2, "ndb", scaling="power"),
    ],
    ids=["default", "seeded", "scale_power", "scale_multi", "newton", "ndb"],
)
def test_global_rng_is_untouched(call):
    A = stack("linear")
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    call(A)
    assert torch.equal(torch.get_rng_state(), before)


def test_power_iteration_rayleigh_quotients_increase_to_lambda_max():
    # For a PSD matrix the Rayleigh quotient of A^k v does not decrease with k (same start vector,
    # same seed) and is <= λ_max; with a gap λ_2/λ_1 = 0.74 (log cond 1e4) 100 steps converge.
    A = stack("log_cond_1e4", torch.float64)
    lam = lambda_max(A)
    previous = torch.zeros(4, dtype=torch.float64)
    for steps in (0, 1, 2, 5, 10, 100):
        estimate = power_iteration(A, steps=steps, generator=seeded(1))
        assert estimate.shape == (4,)
        assert (estimate >= previous * (1 - 1e-12)).all()
        assert (estimate <= lam * (1 + 1e-12)).all()
        previous = estimate
    torch.testing.assert_close(previous, lam, rtol=1e-10, atol=0)


def test_power_iteration_zero_matrix_is_zero():
    assert torch.equal(power_iteration(torch.zeros(2, 4, 4)), torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# The scale's effect on the Newton iterations
# ---------------------------------------------------------------------------------------------


def _flat(p_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return spd_stack(torch.full((1, N_DIM), 3.0, dtype=torch.float64), seed=3).to(p_dtype)


@pytest.mark.parametrize("solver", ["newton", "ndb"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_power_scaling_needs_fewer_iterations_than_fro_on_flat_spectrum(solver, p):
    # A = 3·I (in a random basis): ||A||_F = sqrt(32)·λ_max puts the scaled spectrum at 1/5.7 of
    # where power iteration (exact here, times safety 2) puts it. Measured iterations to tol 1e-5:
    # Newton fro 6, 5, 4 vs power 5, 3, 3; NDB fro 6, 6, 11 vs power 4, 4, 8 (p = 1, 2, 4).
    A = _flat()
    expected = 3.0 ** (-1.0 / p) * torch.eye(N_DIM, dtype=torch.float64)
    counts = {}
    for scaling in ("fro", "power", "power_multi"):
        X, iterations = root_and_iterations(
            A, p, solver, steps=60, tol=1e-5, scaling=scaling, generator=seeded()
        )
        counts[scaling] = iterations.item()
        assert (X.double() - expected).abs().max().item() < 1e-5  # all converge
    assert counts["power"] < counts["fro"]
    assert counts["power_multi"] < counts["fro"]


def test_ndb_with_exact_scale_stops_at_once():
    # With s = λ_max exactly (bound scale of 3·I, safety irrelevant), B = A/s = I: NDB's first
    # check sees Z·Y = I and stops with 0 iterations and the exact root 3^(-1/2)·I.
    A = 3.0 * torch.eye(N_DIM).expand(2, N_DIM, N_DIM)
    X, iterations = root_and_iterations(A, 2, "ndb", steps=10, tol=1e-6, scaling="bound")
    assert iterations.tolist() == [0, 0]
    torch.testing.assert_close(X, 3.0**-0.5 * torch.eye(N_DIM).expand(2, N_DIM, N_DIM), rtol=1e-7, atol=0)


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"method": "trace"},
            ValueError,
            "scaling must be one of 'fro', 'power', 'power_multi', 'bound'; got 'trace'",
        ),
        ({"steps": -1}, ValueError, "scaling_steps must be in [0, inf]; got -1"),
        ({"steps": 1.5}, TypeError, "scaling_steps must be an integer; got 1.5 of type float"),
        ({"num_vectors": 0}, ValueError, "num_vectors must be in [1, inf]; got 0"),
        ({"safety": 0.0}, ValueError, "safety must be in (0, inf]; got 0.0"),
        ({"safety": -1}, ValueError, "safety must be in (0, inf]; got -1"),
        ({"safety": float("nan")}, ValueError, "safety must be finite; got nan"),
    ],
)
def test_spectral_scale_argument_errors(kwargs, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        spectral_scale(torch.eye(3)[None], **kwargs)


# ---------------------------------------------------------------------------------------------
# Extreme magnitudes: unscaled, the squares in the norms of fp32 matrices with entries ~1e-25 or
# ~1e20 underflow or overflow, and the documented guarantees fail; the estimates normalise first.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fro", "bound"])
def test_norm_scales_hold_for_tiny_matrices(method):
    A = 1e-25 * stack("log_cond_1e1", N=1)
    assert (spectral_scale(A, method).double() >= lambda_max(A) * (1 - SLACK)).all()


@pytest.mark.parametrize("method", ["power", "power_multi"])
def test_power_scale_holds_for_huge_matrices(method):
    A = 1e20 * stack("log_cond_1e1", N=1)
    estimate = spectral_scale(A, method, safety=1.0).double()
    assert (estimate >= 0.5 * lambda_max(A)).all()


def test_power_iteration_is_a_lower_bound_for_tiny_matrices():
    A = 1e-30 * stack("log_cond_1e1", N=1)
    assert (power_iteration(A).double() <= lambda_max(A) * (1 + SLACK)).all()
