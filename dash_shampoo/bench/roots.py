"""Solver study (``dash-shampoo bench roots``): accuracy, time and Newton iteration counts of the roots.

Test matrices: stacks of ``count`` symmetric PSD ``n × n`` matrices shaped like Shampoo factors
``L = EMA of g gᵀ``: ``A = Q diag(λ) Qᵀ`` with a random orthogonal ``Q`` (QR of a Gaussian matrix from
a seeded ``torch.Generator``), a power-law spectrum ``λ_i = i^(-alpha)`` for ``i <= r`` (so
``λ_max = 1``) and an exactly rank-deficient tail ``λ_i = 0`` for ``i > r``. The rank fractions
``r / n`` of the matrices of a stack are spread evenly over ``[0.25, 0.75]``. The stack is built in
float64 and stored in float32, as the optimizer stores its factors. As every ``λ_max`` is 1, the one
scalar ridge ``eps`` (``--eps``, default ``1e-6``) is ``eps = 1e-6 · λ_max`` for every matrix.

Accuracy study: each configuration (method × scaling × steps or degree × matmul precision) computes
``(A + eps·I)^(-1/p)`` in float32 for the whole stack; reported are

- ``err``: relative Frobenius error ``||X − X*||_F / ||X*||_F`` per matrix (median and max over the
  stack), with ``X*`` from a float64 ``eigh`` of the same float32 ``A`` plus ``eps·I``;
- ``dir``: error of the normalised preconditioned direction, ``||D/||D|| − D*/||D*|| ||_F`` with
  ``D = X_L G X_R`` (``X_L`` the root of matrix ``i``, ``X_R`` that of matrix ``i + 1`` of the stack,
  ``G`` Gaussian), the quantity a grafted Shampoo step uses (grafting sets the step's norm);
- ``err_target`` (Chebyshev only): the error against the function the series approximates by
  design, ``(A + eps·I + a·s·I)^(-1/p)`` (``a = interval_lower``, ``s`` the spectral scale);
- ``time``: median wall time of one call on the whole stack (``time.perf_counter``; one warm-up
  call, whose result gives the errors, then ``--repeats`` timed calls; ``torch.cuda.synchronize``
  around each call on CUDA).

``eigh`` runs ``plain`` in fp32 and fp64: ``inverse_root`` on ``A + eps·I`` (ridge added in the input
precision, as the iterative solvers do) with ``eps=0`` and ``eigen_fix="abs"``, i.e.
``Q diag(λ^(-1/p)) Qᵀ``; and ``shift`` in fp32: the optimizer's default call (``eps`` passed,
``eigen_fix="shift"``), which adds ``eps`` twice and so computes ``(A + 2·eps·I)^(-1/p)``.

Scaling study: ``newton`` and ``ndb`` with each ``--tol`` and up to ``--max-steps`` iterations (per
stage for ``ndb``), matmuls in ``--iter-precision``: per scaling, the iterations each matrix needs to
reach ``max|M − I| < tol`` and the tightness ``s / λ_max`` of the scale it used, for the spectra
``--iter-alphas`` (flatter spectra make the Frobenius norm a looser bound). A first run stops at
``--first-cap`` iterations and is repeated with ``--max-steps`` only if some matrix was cut short by
that cap (a converged matrix is frozen, so the other counts are the same in both runs).

Sizes above ``--full-max-size`` run a reduced accuracy grid and sizes above ``--iter-max-size`` no
scaling study, so the ``full`` preset (:data:`PRESETS`) takes minutes on a CPU; ``quick`` is a smoke
test. Options left unset take the preset's values; the markdown output states what was run.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..linalg import METHODS, PRECISIONS, SCALINGS, inverse_root
from ..linalg.scaling import spectral_scale
from ..results import RunRecord, markdown_table, metadata_lines, save_plot, write_report
from .timing import sync, timed, torch_threads

#: Scaling each iterative method uses by default in :func:`dash_shampoo.linalg.inverse_root`.
DEFAULT_SCALING = {"newton": "power_multi", "ndb": "power_multi", "chebyshev": "bound"}
#: Rank fractions ``r / n`` of the matrices of a stack are spread evenly over this interval.
RANK_FRACTIONS = (0.25, 0.75)
#: Spectral-scale options: the library defaults, passed explicitly so that the reported ``s`` is the
#: one the solvers used.
SCALE_OPTIONS: dict[str, Any] = {"scaling_steps": 10, "num_vectors": 16, "safety": 2.0}

#: Named option sets (``--preset``): ``full`` is the committed study, ``quick`` a smoke test.
FULL: dict[str, Any] = {
    "sizes": [256, 512, 1024], "count": 4, "roots": [4], "repeats": 3, "threads": None,
    "methods": list(METHODS), "scalings": list(SCALINGS), "steps": [5, 10, 20], "degrees": [20, 40, 80],
    "precisions": list(PRECISIONS), "large_precisions": ["fp32"], "full_max_size": 256,
    "tol": [1e-5, 1e-3], "max_steps": 100, "first_cap": 25, "iter_alphas": [0.25, 1.0], "iter_max_size": 512,
}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "full": FULL,
    "quick": {
        **FULL, "sizes": [16], "count": 2, "roots": [2, 4], "repeats": 1, "threads": 1, "steps": [6],
        "degrees": [12], "full_max_size": 16, "max_steps": 40, "first_cap": 20, "iter_alphas": [1.0],
        "iter_max_size": 16,
    },
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``dash-shampoo bench roots``; unset options take the preset's values."""
    parser.description = "Inverse-root solver study: error vs float64 eigh, time per stack, iterations."
    add = parser.add_argument
    add("--preset", choices=tuple(PRESETS), default="full", help="option set (quick: a smoke test)")
    add("--sizes", type=int, nargs="+", help="block sizes n (default 256 512 1024)")
    add("--count", type=int, help="matrices per stack (default 4)")
    add("--roots", type=int, nargs="+", help="roots p (default 4; e.g. --roots 2 4)")
    add("--methods", nargs="+", choices=METHODS, help="solvers (default all)")
    add("--scalings", nargs="+", choices=SCALINGS, help="spectral scalings (default all)")
    add("--steps", type=int, nargs="+", help="fixed iterations of newton/ndb (default 5 10 20)")
    add("--degrees", type=int, nargs="+", help="Chebyshev degrees (default 20 40 80)")
    add("--precisions", nargs="+", choices=PRECISIONS, help="matmul precisions (default all)")
    add("--large-precisions", nargs="+", choices=PRECISIONS, help="precisions above --full-max-size (fp32)")
    add(
        "--full-max-size",
        type=int,
        help="largest size with the full accuracy grid; larger sizes run each method's default "
        "scaling only, in --large-precisions (default 256)",
    )
    add("--alpha", type=float, default=1.0, help="power-law exponent of the spectrum (default 1.0)")
    add("--eps", type=float, default=1e-6, help="ridge; λ_max = 1, so it is relative (default 1e-6)")
    add("--interval-lower", type=float, default=1e-3, help="Chebyshev relative lower end (default 1e-3)")
    add("--tol", type=float, nargs="+", help="tolerances of the iteration study (default 1e-5 1e-3)")
    add("--max-steps", type=int, help="iteration cap of the iteration study (default 100)")
    add("--first-cap", type=int, help="cap of the first, cheaper iteration run (default 25)")
    add("--iter-precision", choices=PRECISIONS, default="fp32", help="precision of the iteration study")
    add("--iter-alphas", type=float, nargs="+", help="spectra of the iteration study (default 0.25 1)")
    add("--iter-max-size", type=int, help="largest size of the iteration study (default 512)")
    add("--repeats", type=int, help="timed calls per configuration after one warm-up (default 3)")
    add("--threads", type=int, help="torch CPU threads during the run (default: torch's; quick: 1)")
    add("--seed", type=int, default=0, help="seed of the matrices and of power iteration (default 0)")
    add("--device", default=None, help="torch device (default cuda if available, else cpu)")
    add("--out", default="benchmarks/results", help="output folder ('' to write nothing)")
    add("--no-plot", action="store_true", help="do not write the PNG")


# ---------------------------------------------------------------------------------------------
# Test problems and references
# ---------------------------------------------------------------------------------------------


def make_stack(n: int, count: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """Float64 stack (count, n, n) of ``Q diag(λ) Qᵀ`` with ``λ_i = i^(-alpha)`` for ``i <= r``, else 0.

    ``Q`` is the orthogonal factor of the QR decomposition of a Gaussian matrix (signs fixed so it
    is Haar distributed); ``r = round(f n)`` with ``f`` spread evenly over :data:`RANK_FRACTIONS`.
    """
    low, high = RANK_FRACTIONS
    fractions = [low + (high - low) * j / (count - 1) for j in range(count)] if count > 1 else [0.5]
    gaussian = torch.randn(count, n, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(gaussian)
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))[:, None, :]
    index = torch.arange(1, n + 1, dtype=torch.float64)
    values = torch.stack(
        [torch.where(index <= max(1, round(f * n)), index.pow(-alpha), 0.0) for f in fractions]
    )
    A = (Q * values[:, None, :]) @ Q.mT
    return 0.5 * (A + A.mT)


@dataclass
class Problem:
    """One stack in float32 on the device, with its float64 eigendecomposition and reference roots."""

    A: torch.Tensor  # (N, n, n) float32, the solver input
    values: torch.Tensor  # (N, n) float64 eigenvalues of A + eps·I
    vectors: torch.Tensor  # (N, n, n) float64 eigenvectors
    G: torch.Tensor  # (N, n, n) float64 Gaussian "gradients" for the direction error
    eps: float
    alpha: float
    references: dict[int, torch.Tensor] = field(default_factory=dict)
    directions: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def lambda_max(self) -> torch.Tensor:
        """``λ_max(A + eps·I)`` per matrix, float64."""
        return self.values[:, -1]

    def function(self, weights: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``Q diag(w(λ)) Qᵀ`` in float64 for the eigenvalues ``λ`` of ``A + eps·I``."""
        return (self.vectors * weights(self.values)[:, None, :]) @ self.vectors.mT

    def reference(self, p: int) -> torch.Tensor:
        """``(A + eps·I)^(-1/p)`` in float64 (cached)."""
        if p not in self.references:
            self.references[p] = self.function(lambda lam: lam.pow(-1.0 / p))
        return self.references[p]

    def direction(self, roots: torch.Tensor) -> torch.Tensor:
        """Unit-Frobenius ``X_i G_i X_(i+1)`` per matrix (``X_(i+1)`` wraps around the stack), float64."""
        roots = roots.to(torch.float64)
        D = roots @ self.G @ roots.roll(-1, dims=0)
        return D / torch.linalg.matrix_norm(D, keepdim=True)

    def reference_direction(self, p: int) -> torch.Tensor:
        """:meth:`direction` of the float64 reference roots (cached)."""
        if p not in self.directions:
            self.directions[p] = self.direction(self.reference(p))
        return self.directions[p]

    def row(self, study: str, p: int) -> dict[str, Any]:
        """The fields every result row about this stack starts with."""
        return {"study": study, "n": self.A.shape[-1], "count": self.A.shape[0], "alpha": self.alpha, "p": p}

    def ridged(self, dtype: torch.dtype) -> torch.Tensor:
        """``A + eps·I`` formed in ``dtype`` (a new tensor), as the solvers form it."""
        X = self.A.to(dtype, copy=True)
        X.diagonal(dim1=-2, dim2=-1).add_(self.eps)
        return X


def make_problem(n: int, count: int, alpha: float, eps: float, seed: int, device: torch.device) -> Problem:
    """Build the stack for size ``n`` (generator seed ``seed + n``) and its float64 eigh on ``device``."""
    generator = torch.Generator().manual_seed(seed + n)
    A = make_stack(n, count, alpha, generator).to(torch.float32)
    G = torch.randn(count, n, n, generator=generator, dtype=torch.float64)
    X = A.to(torch.float64)
    X.diagonal(dim1=-2, dim2=-1).add_(eps)
    values, vectors = torch.linalg.eigh(X.to(device))
    if float(values.min()) <= 0:
        raise SystemExit(f"A + eps·I is not positive definite at n={n}; use a larger --eps")
    return Problem(A=A.to(device), values=values, vectors=vectors, G=G.to(device), eps=eps, alpha=alpha)


def relative_errors(root: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``||X − X*||_F / ||X*||_F`` per matrix, computed in float64, shape (N,)."""
    root = root.to(torch.float64)
    return torch.linalg.matrix_norm(root - reference) / torch.linalg.matrix_norm(reference)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _median(values: torch.Tensor) -> float:
    """Median of a 1-D tensor (mean of the two middle values for even length), as a float."""
    return float(statistics.median(values.tolist()))


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def grid(n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The accuracy configurations at size ``n``: dicts of method, scaling, steps/degree, precision.

    Up to ``--full-max-size``: every method × scaling × steps (or degree) × precision. Above it: each
    method's default scaling (:data:`DEFAULT_SCALING`), ``--large-precisions`` only. ``eigh`` always
    runs ``plain`` in fp32 and fp64 and ``shift`` in fp32 (see the module docstring).
    """
    full = n <= args.full_max_size
    configs: list[dict[str, Any]] = []
    for method in args.methods:
        if method == "eigh":
            configs += [
                {"method": "eigh", "variant": "plain", "precision": "fp32"},
                {"method": "eigh", "variant": "plain", "precision": "fp64"},
                {"method": "eigh", "variant": "shift", "precision": "fp32"},
            ]
            continue
        key = "degree" if method == "chebyshev" else "steps"
        budgets = args.degrees if method == "chebyshev" else args.steps
        for scaling in args.scalings if full else [DEFAULT_SCALING[method]]:
            for budget in budgets:
                for precision in args.precisions if full else args.large_precisions:
                    configs.append(
                        {"method": method, "scaling": scaling, key: budget, "precision": precision}
                    )
    return configs


def solver_scale(problem: Problem, scaling: str, seed: int) -> torch.Tensor:
    """The spectral scale ``s`` (N,) that the solvers compute from fp32 ``A + eps·I``, as float64.

    Same input, options and generator seed as the solver calls, hence the same ``s``.
    """
    scale = spectral_scale(
        problem.ridged(torch.float32),
        scaling,
        steps=SCALE_OPTIONS["scaling_steps"],
        num_vectors=SCALE_OPTIONS["num_vectors"],
        safety=SCALE_OPTIONS["safety"],
        generator=_generator(problem.A.device, seed),
    )
    return scale.to(torch.float64)


def accuracy_row(
    problem: Problem, p: int, config: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Run one configuration: errors of the warm-up result, median time of ``args.repeats`` calls."""
    device = problem.A.device
    method, precision = config["method"], config["precision"]
    if method == "eigh":
        dtype = torch.float64 if precision == "fp64" else torch.float32

        def call() -> torch.Tensor:
            if config["variant"] == "plain":
                root = inverse_root(problem.ridged(dtype), p, "eigh", eps=0.0, eigen_fix="abs")
            else:
                root = inverse_root(problem.A.to(dtype), p, "eigh", eps=problem.eps, eigen_fix="shift")
            return root.to(torch.float32)

    else:
        options: dict[str, Any] = {"eps": problem.eps, "scaling": config["scaling"], "precision": precision}
        if method == "chebyshev":
            options.update(degree=config["degree"], interval_lower=args.interval_lower)
        else:
            options.update(steps=config["steps"])

        def call() -> torch.Tensor:
            generator = _generator(device, args.seed)
            return inverse_root(problem.A, p, method, generator=generator, **options, **SCALE_OPTIONS)

    root, times = timed(call, args.repeats, device)
    errors = relative_errors(root, problem.reference(p))
    direction = torch.linalg.matrix_norm(problem.direction(root) - problem.reference_direction(p))
    row: dict[str, Any] = {
        **problem.row("accuracy", p),
        "scaling": None,
        "steps": None,
        "degree": None,
        "variant": None,
        **config,
        "eps": problem.eps,
        "err_median": _finite_or_none(_median(errors)),
        "err_max": _finite_or_none(float(errors.max())),
        "errors": [_finite_or_none(e) for e in errors.tolist()],
        "dir_err_median": _finite_or_none(_median(direction)),
        "dir_err_max": _finite_or_none(float(direction.max())),
        "time_s": statistics.median(times),
        "times_s": times,
    }
    if method == "chebyshev":
        shift = (args.interval_lower * solver_scale(problem, config["scaling"], args.seed))[:, None]
        target = problem.function(lambda lam: (lam + shift).pow(-1.0 / p))
        row["interval_lower"] = args.interval_lower
        row["err_target_median"] = _finite_or_none(_median(relative_errors(root, target)))
    return row


def iteration_row(
    problem: Problem, p: int, method: str, scaling: str, tol: float, args: argparse.Namespace
) -> dict[str, Any]:
    """Iterations to ``max|M − I| < tol`` per matrix for ``newton`` or ``ndb`` with ``scaling``.

    The first run is capped at ``args.first_cap`` iterations (per stage for ``ndb``). A matrix was cut
    short by the cap when its count equals the cap (``newton``) or, for ``ndb``, whose count sums
    its stages, when a second run with one more iteration allowed gives a larger count. If any was,
    the study is rerun with ``args.max_steps``; there ``reached_tol`` counts matrices whose count is
    below the cap: exact for ``newton``, a lower bound for ``ndb`` (a sum of stages can exceed the cap
    although no stage reached it).
    """
    device = problem.A.device

    def solve(cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        iterations = torch.empty(problem.A.shape[0], dtype=torch.int64, device=device)
        options = {"eps": problem.eps, "steps": cap, "tol": tol, "scaling": scaling, **SCALE_OPTIONS}
        generator = _generator(device, args.seed)
        options.update(precision=args.iter_precision, generator=generator, iterations=iterations)
        return inverse_root(problem.A, p, method, **options), iterations

    start = time.perf_counter()
    cap = min(args.first_cap, args.max_steps)
    root, iterations = solve(cap)
    if method == "newton":
        cut = iterations >= cap
    else:
        cut = solve(cap + 1)[1] != iterations
    reached = ~cut
    if bool(cut.any()) and cap < args.max_steps:
        cap = args.max_steps
        root, iterations = solve(cap)
        reached = iterations < cap
    sync(device)
    elapsed = time.perf_counter() - start
    ratios = solver_scale(problem, scaling, args.seed) / problem.lambda_max
    errors = relative_errors(root, problem.reference(p))
    return {
        **problem.row("iterations", p),
        "method": method,
        "scaling": scaling,
        "precision": args.iter_precision,
        "tol": tol,
        "cap": cap,
        "iterations": iterations.tolist(),
        "iterations_median": _median(iterations.to(torch.float64)),
        "reached_tol": int(reached.sum()),
        "s_over_lmax": ratios.tolist(),
        "s_over_lmax_median": _median(ratios),
        "err_median": _finite_or_none(_median(errors)),
        "wall_s": elapsed,
    }


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".1e") -> str:
    return "—" if x is None else format(x, spec)


def _budget(row: dict[str, Any]) -> str:
    if row["method"] == "chebyshev":
        return f"d={row['degree']}"
    return "" if row["method"] == "eigh" else str(row["steps"])


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    """Markdown pivot: one line per (n, p, method, scaling, steps), one cell per precision.

    Cell: ``relative error (median) / direction error (median) / time per stack in ms``.
    """
    rows = [r for r in rows if r["study"] == "accuracy"]
    precisions = [q for q in ("fp64", *PRECISIONS) if any(r["precision"] == q for r in rows)]
    lines: dict[tuple, dict[str, str]] = {}
    for r in rows:
        scaling = r["scaling"] if r["method"] != "eigh" else r["variant"]
        key = (r["n"], r["p"], r["method"], scaling, _budget(r))
        err = _fmt(r["err_median"])
        if r["method"] == "chebyshev":
            err += f" (target {_fmt(r['err_target_median'])})"
        cell = f"{err} / {_fmt(r['dir_err_median'])} / {_fmt(r['time_s'] * 1e3, '.3g')}"
        lines.setdefault(key, {})[r["precision"]] = cell
    header = ["n", "p", "method", "scaling", "steps", *precisions]
    return markdown_table(
        header, ([*key, *(cells.get(q, "") for q in precisions)] for key, cells in lines.items())
    )


def iteration_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: iterations to tolerance and ``s / λ_max`` per (n, α, p, method, tol, scaling)."""
    header = ["n", "α", "p", "method", "tol", "scaling", "s/λmax median [min, max]"]
    header += ["iterations median [min, max]", "reached tol", "err median"]

    def cells(r: dict[str, Any]) -> list[object]:
        ratios, iters = r["s_over_lmax"], r["iterations"]
        return [
            *(r["n"], f"{r['alpha']:g}", r["p"], r["method"], f"{r['tol']:g}", r["scaling"]),
            f"{r['s_over_lmax_median']:.3g} [{min(ratios):.3g}, {max(ratios):.3g}]",
            f"{r['iterations_median']:g} [{min(iters)}, {max(iters)}]",
            f"{r['reached_tol']}/{r['count']} (cap {r['cap']})",
            _fmt(r["err_median"]),
        ]

    return markdown_table(header, (cells(r) for r in rows if r["study"] == "iterations"))


def markdown(report: dict[str, Any]) -> str:
    """The markdown report: header (command, device, versions, date, what was run) and both tables."""
    o = report["options"]
    join = ", ".join
    large = [n for n in o["sizes"] if n > o["full_max_size"]]
    defaults = join(f"{m}: {s}" for m, s in DEFAULT_SCALING.items())
    reduced = (
        f"Sizes {join(map(str, large))} (above --full-max-size {o['full_max_size']}) ran a reduced grid: "
        f"each method's default scaling only ({defaults}), precisions {join(o['large_precisions'])}."
        if large
        else "Every size ran the full grid."
    )
    iter_sizes = [n for n in o["sizes"] if n <= o["iter_max_size"]]
    emulated = (
        "On the CPU, tf32/bf16/fp16 are emulated (inputs rounded, fp32 products), so their times are "
        "not those of tensor cores, while their errors are the ones tensor cores give. "
        if report["device_type"] == "cpu"
        else ""
    )
    return "\n".join(
        [
            f"# Inverse-root solver study — {report['device']}",
            "",
            *metadata_lines(report),
            f"- preset `{o['preset']}`",
            f"- stacks: {o['count']} matrices per stack, sizes {join(map(str, o['sizes']))}; spectrum "
            f"λ_i = i^(-α) for i <= r (λ_max = 1), zero tail, rank fractions r/n spread over "
            f"[{RANK_FRACTIONS[0]}, {RANK_FRACTIONS[1]}]; random orthogonal eigenvectors; built in fp64, "
            f"stored in fp32; eps = {o['eps']:g} = {o['eps']:g}·λ_max; seed {o['seed']}.",
            f"- reference: float64 eigh of the same fp32 A + eps·I; roots p = {join(map(str, o['roots']))}.",
            "",
            f"## Iterations to max|M − I| < tol per scaling ({o['iter_precision']} matmuls)",
            "",
            f"Sizes {join(map(str, iter_sizes)) or 'none'} (<= --iter-max-size {o['iter_max_size']}), "
            f"spectra α = {join(f'{a:g}' for a in o['iter_alphas'])}, tolerances "
            f"{join(f'{t:g}' for t in o['tol'])}, at most {o['max_steps']} iterations (per stage for ndb; "
            f"first run capped at {o['first_cap']}, rerun only when a matrix was cut short). Iterations "
            "of newton; of ndb summed over its stages (p = 4: two). `reached tol` counts matrices that "
            "converged within the cap (after a rerun at the full cap: a lower bound for ndb). "
            "s/λmax: the solver's spectral scale over the true "
            f"largest eigenvalue of A + eps·I. Scale options {SCALE_OPTIONS}.",
            "",
            iteration_table(report["rows"]),
            "",
            "## Accuracy and time",
            "",
            f"Spectrum α = {o['alpha']:g}. Methods {join(o['methods'])}; scalings {join(o['scalings'])}; "
            f"steps {join(map(str, o['steps']))} (ndb: per stage); Chebyshev degrees "
            f"{join(map(str, o['degrees']))} with interval_lower {o['interval_lower']:g}; precisions "
            f"{join(o['precisions'])}. {reduced} eigh: `plain` = Q diag(λ^(-1/p)) Qᵀ of A + eps·I "
            "(fp32 and fp64), `shift` = the optimizer's default eigen_fix, which adds eps twice. "
            f"Timing: median of {o['repeats']} calls per stack after one warm-up call. {emulated}",
            "",
            "Cell: relative Frobenius error of the root (median over the stack) / error of the normalised "
            "direction L^(-1/p) G R^(-1/p) (median) / median time per stack in ms. Chebyshev approximates "
            "(A + eps·I + interval_lower·s·I)^(-1/p) by design: its error against that target is in "
            "parentheses. `—`: NaN or inf (the iteration diverged).",
            "",
            accuracy_table(report["rows"]),
            "",
        ]
    )


_COLORS = {"eigh": "black", "newton": "tab:blue", "ndb": "tab:orange", "chebyshev": "tab:green"}
_MARKERS = {"fp64": "D", "fp32": "o", "tf32": "s", "bf16": "^", "fp16": "v"}
#: Errors above this (and NaN/inf) are drawn at this height in the PNG.
_ERROR_CLIP = 10.0


def _accuracy_panel(ax: Any, accuracy: list[dict[str, Any]], n: int, title: str) -> None:
    """Error against time of every configuration at size ``n``: colour per method, marker per precision."""
    from matplotlib.ticker import NullFormatter

    for method, color in _COLORS.items():
        for precision, marker in _MARKERS.items():
            points = [
                (r["time_s"] * 1e3, min(r["err_median"] or math.inf, _ERROR_CLIP))
                for r in accuracy
                if (r["n"], r["method"], r["precision"]) == (n, method, precision)
            ]
            if points:
                xs, ys = zip(*points)
                ax.scatter(xs, ys, color=color, marker=marker, s=26, alpha=0.7)
    ax.axhline(_ERROR_CLIP, color="gray", linestyle=":", linewidth=0.8)
    ax.set(xscale="log", yscale="log", title=title)
    ax.set(xlabel="time per stack (ms)", ylabel="relative Frobenius error (median)")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, alpha=0.3)


def _iterations_panel(ax: Any, iterations: list[dict[str, Any]], tol: float, scalings: list[str]) -> None:
    """Median iterations to ``tol`` per scaling: a bar per (method, α), hatched where not reached."""
    combos = sorted({(r["method"], r["alpha"]) for r in iterations})
    alphas = sorted({r["alpha"] for r in iterations})
    width = 0.8 / max(1, len(combos))
    top = 1.0
    for k, (method, alpha) in enumerate(combos):
        for x, scaling in enumerate(scalings):
            key = (method, alpha, tol, scaling)
            found = [r for r in iterations if (r["method"], r["alpha"], r["tol"], r["scaling"]) == key]
            if not found:
                continue
            r = found[0]
            top = max(top, r["iterations_median"])
            ax.bar(
                x + (k - (len(combos) - 1) / 2) * width,
                r["iterations_median"],
                width,
                color=_COLORS[method],
                alpha=0.35 + 0.65 * (alphas.index(alpha) + 1) / len(alphas),
                hatch="//" if r["reached_tol"] < r["count"] else None,
                edgecolor="white",
                label=f"{method} α={alpha:g}" if x == 0 else None,
            )
    ax.set_xticks(range(len(scalings)), scalings)
    ax.set_ylim(0, 1.35 * top)
    ax.set(ylabel="iterations")
    ax.legend(fontsize=7, ncol=2, loc="upper center", title="hatched: tol not reached", title_fontsize=7)


def _scale_panel(ax: Any, iterations: list[dict[str, Any]], scalings: list[str]) -> None:
    """Median ``s / λ_max`` per scaling, a bar per spectrum."""
    alphas = sorted({r["alpha"] for r in iterations})
    width = 0.8 / max(1, len(alphas))
    for k, alpha in enumerate(alphas):
        ratios = []
        for scaling in scalings:
            found = [r for r in iterations if r["alpha"] == alpha and r["scaling"] == scaling]
            ratios.append(found[0]["s_over_lmax_median"] if found else 0)
        xs = [x + (k - (len(alphas) - 1) / 2) * width for x in range(len(scalings))]
        ax.bar(xs, ratios, width, label=f"α={alpha:g}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(scalings)), scalings)
    ax.set(ylabel="s / λmax")
    ax.legend(fontsize=7)


def plot(report: dict[str, Any], path: Path) -> bool:
    """Write the PNG: error vs time per size (top), iterations and s/λmax per scaling (bottom);
    False without matplotlib."""
    o, rows = report["options"], report["rows"]
    p = 4 if 4 in o["roots"] else o["roots"][0]
    accuracy = [r for r in rows if r["study"] == "accuracy" and r["p"] == p]
    iterations = [r for r in rows if r["study"] == "iterations" and r["p"] == p]
    iter_n = max((r["n"] for r in iterations), default=None)
    iterations = [r for r in iterations if r["n"] == iter_n]
    sizes, tols, scalings = o["sizes"], o["tol"], o["scalings"]
    ncols = max(len(sizes), len(tols) + 1)

    def draw(plt: Any) -> Any:
        from matplotlib.lines import Line2D

        fig, axes = plt.subplots(2, ncols, figsize=(4.8 * ncols, 8.6), squeeze=False)
        for j, n in enumerate(sizes):
            _accuracy_panel(axes[0][j], accuracy, n, f"p = {p}, n = {n}, α = {o['alpha']:g}")
        for j, tol in enumerate(tols):
            _iterations_panel(axes[1][j], iterations, tol, scalings)
            axes[1][j].set_title(f"iterations to tol {tol:g} (p = {p}, n = {iter_n}, median)")
        _scale_panel(axes[1][len(tols)], iterations, scalings)
        axes[1][len(tols)].set_title(f"spectral scale s / λmax (n = {iter_n}, median)")
        for ax in [*axes[0][len(sizes) :], *axes[1][len(tols) + 1 :]]:
            ax.axis("off")
        handles = [Line2D([], [], color=c, marker="o", linestyle="", label=m) for m, c in _COLORS.items()]
        handles += [
            Line2D([], [], color="gray", marker=m, linestyle="", label=q) for q, m in _MARKERS.items()
        ]
        handles.append(Line2D([], [], color="gray", linestyle=":", label=f"error ≥ {_ERROR_CLIP:g} or NaN"))
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=10, fontsize=8)
        fig.suptitle(f"Inverse-root solvers on {report['device']} (torch {report['torch']})", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
        return fig

    return save_plot(path, draw, dpi=100)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the preset and validate them."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.eps <= 0:
        raise SystemExit("--eps must be > 0 (the reference needs A + eps·I positive definite)")
    if args.count < 1 or min(args.sizes) < 2 or args.repeats < 1 or min(args.roots) < 1:
        raise SystemExit("--count, --repeats and --roots must be >= 1 and --sizes >= 2")
    return args


def _progress(row: dict[str, Any]) -> str:
    if row["study"] == "iterations":
        return (
            f"  iter n={row['n']:<5} α={row['alpha']:<4g} p={row['p']} {row['method']:<6} "
            f"tol={row['tol']:<6g} {row['scaling']:<11} s/λmax={row['s_over_lmax_median']:<6.3g} "
            f"iterations={row['iterations_median']:<5g} reached={row['reached_tol']}/{row['count']} "
            f"err={_fmt(row['err_median'])} ({row['wall_s']:.1f} s)"
        )
    scaling = row["scaling"] or row["variant"]
    return (
        f"  acc  n={row['n']:<5} p={row['p']} {row['method']:<9} {scaling:<11} {_budget(row):<5} "
        f"{row['precision']:<5} err={_fmt(row['err_median'])} dir={_fmt(row['dir_err_median'])} "
        f"time/stack={row['time_s'] * 1e3:.3g} ms"
    )


def _runs(method: str, p: int) -> bool:
    """``ndb`` needs ``p`` to be 1 or a power of two."""
    return method != "ndb" or p & (p - 1) == 0


def study_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Every accuracy row, then per size the iteration study (sizes up to ``--iter-max-size``)."""
    rows: list[dict[str, Any]] = []
    for n in args.sizes:
        problem = make_problem(n, args.count, args.alpha, args.eps, args.seed, device)
        for p in args.roots:
            for config in grid(n, args):
                if _runs(config["method"], p):
                    rows.append(accuracy_row(problem, p, config, args))
                    print(_progress(rows[-1]), flush=True)
        if n > args.iter_max_size:
            continue
        for alpha in args.iter_alphas:
            if alpha != args.alpha:
                spectrum = make_problem(n, args.count, alpha, args.eps, args.seed, device)
            else:
                spectrum = problem
            for p, method, tol, scaling in itertools.product(
                args.roots, ("newton", "ndb"), args.tol, args.scalings
            ):
                if method in args.methods and _runs(method, p):
                    rows.append(iteration_row(spectrum, p, method, scaling, tol, args))
                    print(_progress(rows[-1]), flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    """Run the study, print the markdown report and write roots-<device>.{json,md,png} to ``--out``."""
    args = _resolve(args)
    device = torch.device(args.device)
    with torch_threads(args.threads):
        record = RunRecord.start(args, device, "dash-shampoo bench roots")
        print(
            f"device: {record.device}; torch {torch.__version__}; {args.count} matrices per stack", flush=True
        )
        rows = study_rows(args, device)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "command_line", "benchmark")}
    report: dict[str, Any] = {**record.metadata(), "options": options, "rows": rows}
    text = markdown(report)
    print()
    print(text)
    if args.out:
        stem = record.stem(Path(args.out), "roots")
        written = write_report(stem, report, text, None if args.no_plot else plot, allow_nan=False)
        print("wrote " + ", ".join(map(str, written)))
    return 0
