"""Matmul precision: ``round_tf32``, ``round_to``, ``bmm`` and the ``precision`` of the solvers.

Unit roundoffs u (half the spacing of numbers in [1, 2)): fp32 2^-24, TF32 and fp16 2^-11 (10
stored mantissa bits), bf16 2^-8 (7 stored bits). On the CPU every reduced precision is emulated:
inputs rounded, products accumulated in fp32.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import spd_stack

from dash_shampoo.linalg import PRECISIONS, bmm, inverse_root, root_matmuls, round_to
from dash_shampoo.linalg.precision import round_tf32

EPS32 = torch.finfo(torch.float32).eps
UNIT = {"fp32": 2.0**-24, "tf32": 2.0**-11, "fp16": 2.0**-11, "bf16": 2.0**-8}
N_DIM = 32


pytestmark = pytest.mark.usefixtures("single_thread")


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# round_tf32
# ---------------------------------------------------------------------------------------------


def test_round_tf32_keeps_representable_values():
    values = f32([0.0, -0.0, 1.0, -1.0, 1 + 2**-10, -(2 - 2**-10), 3.5, 2.0**-126, 2.0**100 * (1 + 2**-9)])
    out = round_tf32(values)
    assert out.dtype == torch.float32
    assert torch.equal(out, values)
    assert torch.equal(torch.signbit(out), torch.signbit(values))  # -0.0 stays -0.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1 + 2**-12, 1.0),  # a quarter ulp (ulp 2^-10): down
        (1 + 2**-11 - 2**-23, 1.0),  # just below half an ulp: down
        (1 + 2**-11, 1 + 2**-10),  # exactly half: away from zero (ties-to-even would give 1)
        (-(1 + 2**-11), -(1 + 2**-10)),
        (1 + 2**-11 + 2**-23, 1 + 2**-10),  # just above half: up
        (1 + 2**-10 + 2**-12, 1 + 2**-10),
        (1024.5, 1025.0),  # 2^10·(1 + 2^-11): a tie at a larger exponent
        (2 - 2**-23, 2.0),  # rounding up carries into the exponent
        (-(2**-126) * (1 + 2**-11), -(2**-126) * (1 + 2**-10)),  # smallest normal exponent
    ],
)
def test_round_tf32_rounds_to_nearest_ties_away(value, expected):
    assert round_tf32(f32([value])).item() == expected


def test_round_tf32_keeps_non_finite():
    values = f32([float("inf"), float("-inf"), float("nan")])
    out = round_tf32(values)
    assert out[0] == float("inf") and out[1] == float("-inf") and torch.isnan(out[2])


def test_round_tf32_matches_a_float64_reference():
    # Random normal fp32 numbers of all signs and exponents 2^-100..2^100: x = m·2^e with
    # 0.5 <= |m| < 1; TF32 keeps 11 significant bits, so the result is round_half_away(m·2^11)·2^(e−11).
    generator = torch.Generator().manual_seed(0)
    x = (
        torch.randn(20000, generator=generator, dtype=torch.float64)
        * 2.0 ** torch.randint(-100, 100, (20000,), generator=generator)
    ).float()
    m, e = torch.frexp(x.double())
    expected = torch.sign(m) * torch.floor(m.abs() * 2.0**11 + 0.5) * 2.0 ** (e - 11).double()
    out = round_tf32(x)
    assert torch.equal(out.double(), expected)
    assert ((out.view(torch.int32) & 0x1FFF) == 0).all()  # the 13 dropped mantissa bits are clear
    assert ((out.double() - x.double()).abs() <= 2.0**-11 * x.double().abs()).all()


def test_round_tf32_non_contiguous_input():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(round_tf32(x.t()), round_tf32(x.t().contiguous()))
    assert round_tf32(x.t()).shape == (5, 6)


# ---------------------------------------------------------------------------------------------
# round_to
# ---------------------------------------------------------------------------------------------


def test_round_to_fp32_is_the_identity():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    assert round_to(x, "fp32") is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_round_to_keeps_dtype_and_rounds_to_u(precision, dtype):
    # Magnitudes within fp16's normal range (6e-5 .. 65504), where u = 2^-11 holds.
    generator = torch.Generator().manual_seed(3)
    x = (torch.rand(4000, generator=generator, dtype=torch.float64) * 8 - 4).exp2().to(dtype)
    x = x * torch.where(torch.rand(4000, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
    out = round_to(x, precision)
    assert out.dtype == dtype
    if precision == "tf32":
        assert torch.equal(out, round_tf32(x.float()).to(dtype))
    else:
        half = torch.bfloat16 if precision == "bf16" else torch.float16
        assert torch.equal(out, x.to(half).to(dtype))
    relative = ((out.double() - x.double()).abs() / x.double().abs()).max().item()
    # At most u, and at least u/2: among 4000 random values some land near a midpoint.
    assert UNIT[precision] / 2 < relative <= UNIT[precision]
    assert torch.equal(round_to(out, precision), out)  # idempotent


# ---------------------------------------------------------------------------------------------
# bmm
# ---------------------------------------------------------------------------------------------


def _operands(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    a = torch.randn(3, 16, 24, generator=generator, dtype=torch.float64)
    b = torch.randn(3, 24, 8, generator=generator, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


def test_bmm_fp32_is_torch_bmm():
    a, b = _operands()
    assert torch.equal(bmm(a, b), torch.bmm(a, b))
    assert torch.equal(bmm(a, b, "fp32"), torch.bmm(a, b))


def test_bmm_fp64_with_fp32_precision_stays_fp64():
    a, b = _operands(torch.float64)
    out = bmm(a, b, "fp32")
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.bmm(a, b))


@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_bmm_rounds_inputs_and_accumulates_in_fp32(precision):
    a, b = _operands()
    out = bmm(a, b, precision)
    assert out.dtype == torch.float32 and out.shape == (3, 16, 8)
    assert torch.equal(out, torch.bmm(round_to(a, precision), round_to(b, precision)))
    # Against the exact product of the fp32 inputs: each product a_ik·b_kj is off by <= 2u
    # relative (both inputs rounded), the fp32 sum adds <= k·ε32; so |error| <= (2u + k·ε32)·|a||b|.
    exact = torch.bmm(a.double(), b.double())
    magnitude = torch.bmm(a.double().abs(), b.double().abs())
    ratio = ((out.double() - exact).abs() / magnitude).max().item()
    assert ratio <= 2 * UNIT[precision] + 24 * EPS32
    # ...and the rounding does happen: the worst entry is off by more than u/4 of its magnitude
    # (fp32 products are off by ~1e-7).
    assert ratio > UNIT[precision] / 4


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bmm_exact_on_representable_inputs(precision):
    # Small integers are exact in every format, and so are their fp32 sums: all precisions agree.
    generator = torch.Generator().manual_seed(5)
    a = torch.randint(-8, 9, (2, 5, 7), generator=generator).float()
    b = torch.randint(-8, 9, (2, 7, 3), generator=generator).float()
    assert torch.equal(bmm(a, b, precision), torch.bmm(a.double(), b.double()).float())


def test_bmm_fp64_with_half_precision_rounds_inputs():
    a, b = _operands(torch.float64)
    out = bmm(a, b, "bf16")
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.bmm(a.to(torch.bfloat16).double(), b.to(torch.bfloat16).double()))


# ---------------------------------------------------------------------------------------------
# precision of the solvers
# ---------------------------------------------------------------------------------------------


def _well_conditioned() -> torch.Tensor:
    """Four 32 x 32 SPD matrices, eigenvalues log-spaced in [0.1, 1] (cond 10), random bases."""
    lam = torch.logspace(0, -1, N_DIM, dtype=torch.float64)
    return spd_stack(lam.expand(4, N_DIM)).float()


def _target(A: torch.Tensor, p: int, method: str, a: float) -> torch.Tensor:
    """float64 ``(A + r·I)^(-1/p)``: r = 0, or Chebyshev's relative ridge a·s (s the bound scale)."""
    A = A.double()
    ridge = torch.zeros(A.shape[0], dtype=torch.float64)
    if method == "chebyshev":
        ridge = a * torch.minimum(torch.linalg.matrix_norm(A), A.abs().sum(-1).amax(-1))
    lam, Q = torch.linalg.eigh(A + ridge[:, None, None] * torch.eye(A.shape[-1], dtype=torch.float64))
    return (Q * lam.pow(-1.0 / p)[..., None, :]) @ Q.mT


def _error(method: str, p: int, precision: str) -> float:
    A = _well_conditioned()
    # Chebyshev at degree 80 with a = 1e-2 has a series error ~1e-7 (exp(-16)), below all roundings.
    kwargs = {"degree": 80, "interval_lower": 1e-2} if method == "chebyshev" else {}
    X = inverse_root(A, p, method, precision=precision, **kwargs)
    assert X.dtype == torch.float32
    R = _target(A, p, method, 1e-2)
    return (torch.linalg.matrix_norm(X.double() - R) / torch.linalg.matrix_norm(R)).max().item()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("method", ["newton", "ndb", "chebyshev"])
def test_solver_error_follows_the_matmul_precision(method, p, precision):
    # Measured (cond 10, n = 32, default steps/degree 80): fp32 1e-7 .. 8.5e-7; tf32 and fp16
    # 2.4e-4 .. 1.6e-3 (0.5u .. 3.2u, u = 4.9e-4); bf16 1.8e-3 .. 1.2e-2 (0.45u .. 3.0u,
    # u = 3.9e-3). The Newton iterations are self-correcting, so the rounding of ~3 matmuls a step
    # does not add up over the steps. Window [u/10, 8u]; the lower end shows the precision is used.
    err = _error(method, p, precision)
    if precision == "fp32":
        assert err < math.sqrt(N_DIM) * EPS32 * (1 + 10 / p)  # the fp32 bound of test_linalg_roots
    else:
        assert UNIT[precision] / 10 < err < 8 * UNIT[precision]


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("method", ["newton", "ndb", "chebyshev"])
def test_solver_errors_are_ordered_by_precision(method, p):
    errors = {precision: _error(method, p, precision) for precision in PRECISIONS}
    assert errors["fp32"] < errors["tf32"] < errors["bf16"]
    assert errors["fp32"] < errors["fp16"] < errors["bf16"]
    # TF32 and fp16 keep the same 10 mantissa bits: measured within 10 % of each other (equal
    # for Newton p = 2, 4: no value leaves fp16's range).
    assert 1 / 1.5 < errors["tf32"] / errors["fp16"] < 1.5


def test_eigh_ignores_precision():
    # precision is documented for the iterative methods only.
    A = _well_conditioned()
    assert torch.equal(inverse_root(A, 2, "eigh", precision="bf16"), inverse_root(A, 2, "eigh"))


def _record_precisions(monkeypatch) -> list[str]:
    from dash_shampoo.linalg import roots

    calls: list[str] = []
    real, real_fused = roots.bmm, roots.baddbmm

    def spy(a, b, precision="fp32", out=None):
        calls.append(precision)
        return real(a, b, precision, out=out)

    def spy_fused(c, a, b, beta, alpha, precision="fp32"):
        calls.append(precision)
        return real_fused(c, a, b, beta, alpha, precision)

    monkeypatch.setattr(roots, "bmm", spy)  # the solvers' matmuls: plain and fused with an add
    monkeypatch.setattr(roots, "baddbmm", spy_fused)
    return calls


@pytest.mark.parametrize(
    ("method", "p", "steps"),
    [
        ("ndb", 1, 5), ("ndb", 2, 5), ("ndb", 4, 10), ("ndb", 8, 3), ("ndb", 4, 1),
        ("newton", 1, 3), ("newton", 3, 4), ("newton", 4, 10), ("newton", 6, 2),
        ("chebyshev", 4, 0),
    ],
)  # fmt: skip
def test_root_matmuls_counts_the_solver_calls(monkeypatch, method, p, steps):
    """The count the benchmark's FLOP rate and the ranks' cost balance use is the solvers' own."""
    calls = _record_precisions(monkeypatch)
    inverse_root(_well_conditioned(), p, method, steps=max(steps, 1), degree=13)
    assert len(calls) == root_matmuls(method, p, steps=max(steps, 1), degree=13)
    assert root_matmuls("eigh", 4) is None


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_newton_accumulates_the_root_in_fp32(monkeypatch, p):
    # Documented: X_{k+1} = X_k N_k in fp32, the products forming M = N^p M at `precision`. A step
    # costs 1 fp32 matmul and (squarings + multiplications of N^p) + 1 at precision: p = 1: 1,
    # p = 2: 2, p = 3: 3, p = 4: 3. (This split does not show in the accuracy: the error comes
    # from the M products, measured unchanged when X is also rounded.)
    calls = _record_precisions(monkeypatch)
    inverse_root(_well_conditioned(), p, "newton", steps=5, precision="bf16")
    at_precision = {1: 1, 2: 2, 3: 3, 4: 3}[p]
    assert calls.count("fp32") == 5
    assert calls.count("bf16") == 5 * at_precision
    assert len(calls) == 5 * (1 + at_precision)


def test_ndb_and_chebyshev_run_every_matmul_at_precision(monkeypatch):
    calls = _record_precisions(monkeypatch)
    # NDB p = 2, 5 steps: the first step needs 1 matmul (Z_0 = I), the middle ones 3, the last 2
    # (Y is not wanted): 12.
    inverse_root(_well_conditioned(), 2, "ndb", steps=5, precision="fp16")
    assert calls == ["fp16"] * 12
    calls.clear()
    # Chebyshev: degree matmuls (Clenshaw starts from b_d = c_d I, which needs none).
    inverse_root(_well_conditioned(), 2, "chebyshev", degree=17, precision="tf32")
    assert calls == ["tf32"] * 17
