"""The update maths of one DASH step: pure functions on ``(S, m, n)`` block stacks.

For a block ``g`` (m×n) with gradient EMA ``G~``, factors ``L`` (m×m) and ``R`` (n×n):

    L ← β_f L + (1 − β_f) g gᵀ,   R ← β_f R + (1 − β_f) gᵀ g          (sums when β_f = 1)
    U = L^(-1/p) · Ĝ · R^(-1/p),  Ĝ = G~ / (1 − β₁^t)
    P = U · ||D||_F / (||U||_F + 1e-16)                              (per-block grafting)
    M ← μ M + P,  update = lr · M  (Nesterov: lr · (P + μ M))         (optional momentum)

where ``D`` is the grafting method's own direction for the block (Adam: ``Ĝ / (sqrt(v̂) + ε)``).
Also here: which roots a step refreshes (:func:`refresh_due`, :func:`due_rows`), which refreshed
roots are accepted (:func:`accept_roots`), and the two passes of a step over a layout's stacks:
their statistics (:func:`update_statistics`) and their updates (:func:`stack_update`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from .linalg.roots import matrices_per_chunk

Grafting = Literal["adam", "adagrad", "rmsprop", "sgd", "none"]
GRAFTINGS: tuple[str, ...] = ("adam", "adagrad", "rmsprop", "sgd", "none")
Scalar = float | torch.Tensor


def accumulate_factor(factor: torch.Tensor, g: torch.Tensor, side: str, beta: float) -> None:
    """``factor ← β·factor + (1 − β)·g gᵀ`` (left) or ``gᵀ g`` (right), in place; a sum when β = 1."""
    a, b = (g, g.mT) if side == "left" else (g.mT, g)
    if beta >= 1:
        factor.baddbmm_(a, b)
    else:
        factor.baddbmm_(a, b, beta=beta, alpha=1 - beta)


def accumulate_second_moment(
    moments: list[torch.Tensor], grads: list[torch.Tensor], grafting: str, beta2: float
) -> None:
    """The grafting method's elementwise second moments of several stacks, in place, each op one
    ``_foreach`` call for all of them: EMA (Adam, RMSprop) or sum (AdaGrad)."""
    if grafting in ("adam", "rmsprop"):
        torch._foreach_mul_(moments, beta2)
        torch._foreach_addcmul_(moments, grads, grads, value=1 - beta2)
    elif grafting == "adagrad":
        torch._foreach_addcmul_(moments, grads, grads)


def grafting_direction(
    g_hat: torch.Tensor, moment: torch.Tensor | None, grafting: str, eps: float, bias2: Scalar
) -> tuple[torch.Tensor, Scalar]:
    """The grafting method's own update direction for the (bias-corrected) first moment ``g_hat``,
    as ``(D', c)`` with ``D = c·D'`` (``c`` a scalar or per row, so the caller can apply it with its
    own scalars in one pass).

    Adam: ``ĝ / (sqrt(v / b₂) + ε) = sqrt(b₂) · ĝ / (sqrt(v) + ε·sqrt(b₂))`` with
    ``b₂ = 1 − β₂^t`` (three passes: no ``v / b₂`` is formed); RMSprop and AdaGrad:
    ``ĝ / (sqrt(v) + ε)``; SGD and none: ``ĝ``.
    """
    if grafting == "adam":
        root_bias2 = math.sqrt(bias2) if not isinstance(bias2, torch.Tensor) else bias2.sqrt()
        return g_hat / moment.sqrt().add_(eps * root_bias2), root_bias2
    if grafting in ("rmsprop", "adagrad"):
        return g_hat / moment.sqrt().add_(eps), 1.0
    return g_hat, 1.0


def precondition(
    g_hat: torch.Tensor,
    left_root: torch.Tensor | None,
    right_root: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``U = L^(-1/p) Ĝ R^(-1/p)`` per block (a missing side is the identity), the last product
    written into ``out`` when given (``g_hat`` itself when no side is preconditioned)."""
    U = g_hat
    if left_root is not None:
        U = torch.bmm(left_root, U, out=out if right_root is None else None)
    if right_root is not None:
        U = torch.bmm(U, right_root, out=out)
    return U


def block_norms(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each block, shape (S, 1, 1), in float64 without overflow or underflow for
    any finite input (the fp32 sum of squares overflows for entries of ~1e19/sqrt(mn) and underflows
    for ~1e-23).

    On an accelerator one reduction accumulating in float64 (no host synchronisation). On the CPU,
    whose float64 reduction of fp32 input is not vectorised (20x slower), the fp32 norm, and only
    when some block's norm is not finite or below 2^-60 (deciding that costs no device sync there;
    under ``torch.compile`` both are computed and the choice is made on the device) the norms of the
    blocks scaled by a power of two near their largest entry.
    """
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True, dtype=torch.float64)
    norms = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
    rescale = (norms < 2.0**-60).any() | ~torch.isfinite(norms).all()
    if torch.compiler.is_compiling():  # the same choice, made on the device
        return torch.where(rescale, _scaled_block_norms(x), norms.double())
    return _scaled_block_norms(x) if bool(rescale) else norms.double()


def _scaled_block_norms(x: torch.Tensor) -> torch.Tensor:
    """:func:`block_norms` of each block divided by ``2^k`` near its largest entry, times ``2^k``."""
    # max|x| as max(max x, −min x): two vectorised reductions (abs().amax() and the inf-norm are not).
    largest = torch.maximum(x.amax(dim=(1, 2), keepdim=True), -x.amin(dim=(1, 2), keepdim=True))
    exponent = torch.frexp(largest).exponent.clamp(-120, 120)
    scale = torch.ldexp(torch.ones_like(largest), -exponent)
    return torch.ldexp(torch.linalg.vector_norm(x * scale, dim=(1, 2), keepdim=True).double(), exponent)


def graft_ratio(U: torch.Tensor, direction: torch.Tensor, scale: Scalar = 1.0) -> torch.Tensor:
    """The per-block factor ``scale·||D|| / (||U|| + 1e-16)``, shape (S, 1, 1), that rescales ``U``
    to the Frobenius norm of ``direction`` times ``scale`` (a scalar or per row); formed in float64
    and capped at the largest value of ``U``'s dtype (zero blocks of ``U`` stay zero)."""
    ratio = block_norms(direction) * scale / (block_norms(U) + 1e-16)
    return ratio.clamp_max(torch.finfo(U.dtype).max).to(U.dtype)


def graft(U: torch.Tensor, direction: torch.Tensor, scale: Scalar = 1.0) -> torch.Tensor:
    """``U`` times :func:`graft_ratio` (one pass over ``U``)."""
    return U * graft_ratio(U, direction, scale)


def row_values(
    steps: Sequence[int], counts: Sequence[int], fn: Callable[[int], float | bool], device: torch.device
) -> float | bool | torch.Tensor:
    """``fn(t)`` for the rows of a stack whose runs (``counts`` rows each) are at ``steps``: a Python
    scalar when all runs share one step, else a ``(S, 1, 1)`` tensor with one value per row."""
    if all(t == steps[0] for t in steps):
        return fn(steps[0])
    values = [fn(t) for t, count in zip(steps, counts) for _ in range(count)]
    return torch.tensor(values, device=device).view(-1, 1, 1)


def update_direction(
    first_moment: torch.Tensor,
    moment: torch.Tensor | None,
    left_root: torch.Tensor | None,
    right_root: torch.Tensor | None,
    momentum_buffer: torch.Tensor | None,
    *,
    grafting: str,
    eps: float,
    bias1: Scalar,
    bias2: Scalar,
    started: bool | torch.Tensor,
    momentum: float,
    nesterov: bool,
    lr: Scalar,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Scalar | None]:
    """The update ``lr · P`` of a stack's blocks, momentum applied, as ``(direction, scale)`` with
    ``update = scale · direction``: ``scale`` None when the direction is the update itself, else a
    number or one factor per block (S, 1, 1), so that the caller applies it while writing the
    update, not in a pass of its own.

    ``P`` is homogeneous of degree one in ``Ĝ = first_moment / b₁`` (``U``, the grafting direction
    and so the grafted ``P`` all scale with it), so ``1/b₁``, ``lr`` and the grafting method's own
    scalar are applied together: on the per-block grafting ratio, or in one pass over the direction.

    Args:
        first_moment: the gradient EMA ``G~`` (or the gradient) (S, m, n); ``Ĝ = G~ / bias1``.
        moment: the grafting method's second moment (S, m, n), or None when it has none.
        left_root, right_root: ``L^(-1/p)`` (S, m, m) and ``R^(-1/p)`` (S, n, n); None for a side
            that is not preconditioned (both None: the grafting direction alone).
        momentum_buffer: ``M`` (S, m, n), updated in place with ``P`` (None without momentum).
        grafting, eps: the grafting method and its ε.
        bias1, bias2: ``1 − β₁^t`` and Adam's ``1 − β₂^t`` (scalars or per row, (S, 1, 1)).
        started: whether each row is at or past the start step (a bool, or (S, 1, 1) per row);
            before it the direction is the grafting method's own.
        momentum, nesterov: ``μ`` and whether to use Nesterov's form.
        lr: the learning rate (a float or a tensor).
        out: where ``U`` is written when the result is ``(U, per-block factor)``.
    """
    direction, graft_scale = grafting_direction(first_moment, moment, grafting, eps, bias2)
    scale = graft_scale / bias1 if momentum > 0 else graft_scale / bias1 * lr
    preconditioned = left_root is not None or right_root is not None
    if preconditioned and started is not False:
        plain = started is True and momentum == 0
        U = precondition(first_moment, left_root, right_root, out if plain else None)
        if plain:
            return U, scale if grafting == "none" else graft_ratio(U, direction, scale)
        shampoo = U * scale if grafting == "none" else graft(U, direction, scale)
        direction = shampoo if started is True else torch.where(started, shampoo, direction * scale)
        if momentum == 0:
            return direction, None
    elif momentum == 0:
        return direction, scale
    else:
        direction = direction * scale
    momentum_buffer.mul_(momentum).add_(direction)
    if nesterov:
        return direction.add_(momentum_buffer, alpha=momentum), lr
    return momentum_buffer, lr


def refresh_due(step: int, start: int, frequency: int, ordinal: int | None = None) -> bool:
    """Whether a factor's root is refreshed at ``step``: at the start step, then every ``frequency``
    steps; with staggering (``ordinal``, the factor's ordinal in the layout) at the steps after the
    start whose phase ``step mod frequency`` equals ``ordinal mod frequency``."""
    if step <= start:
        return step == start
    phase = step % frequency
    return phase == 0 if ordinal is None else ordinal % frequency == phase


def due_rows(
    steps: Sequence[int], ordinals: Sequence[int], start: int, frequency: int, stagger: bool
) -> list[int]:
    """The rows of a bank refreshed this step, given each row's step and factor ordinal."""
    return [
        row
        for row, (step, ordinal) in enumerate(zip(steps, ordinals))
        if refresh_due(step, start, frequency, ordinal if stagger else None)
    ]


#: A refreshed root with an entry above ``ROOT_BOUND_SLACK · root_eps^(-1/p)`` counts as a failure.
ROOT_BOUND_SLACK = 100.0


def accept_roots(
    new: torch.Tensor,
    old: torch.Tensor,
    mean_eigenvalue: torch.Tensor,
    added: float | torch.Tensor,
    p: int,
    psd: bool = False,
) -> torch.Tensor:
    """Write into ``old`` each refreshed root unless it is not finite, has an entry no exact root
    can have, or its factor is all zero; ``mean_eigenvalue`` (K,) is each factor's ``tr/n`` and
    ``added`` its ridge ``r`` (:func:`~dash_shampoo.linalg.roots.ridge`: a float, or one per factor).

    Exact roots obey ``|X_ij| <= ||X||_2 <= r^(-1/p)``: every eigenvalue of the ridged factor is at
    least the ridge ``r = eps + relative_eps · tr/n``; a
    diverged iteration can be finite and 1e16 times beyond that. The slack :data:`ROOT_BOUND_SLACK`
    allows for fp32 iterations on singular factors, which overshoot by a few times (2.1x measured
    on the first refresh of the tiny trainer model). A factor with zero trace is the zero matrix (it
    is PSD): it carries no curvature, and without a ridge it has no root at all, so its old root is
    kept (this is not a failure).

    ``psd``: the new roots are PSD by construction (only their diagonals are read).

    Returns:
        The (K,) mask of refused roots of non-zero factors (the failures).
    """
    zero = mean_eigenvalue == 0
    # A PSD root (eigh's Q diag(w) Qᵀ, w >= 0) has its largest entry on its diagonal, which is
    # not negative for any Q; a NaN in Q reaches the diagonal too. Other roots are read whole.
    peak = new.diagonal(dim1=-2, dim2=-1).amax(dim=-1) if psd else peak_abs(new, dims=(1, 2))
    if isinstance(added, torch.Tensor):  # per factor; a zero factor's inf bound is never used
        fine = peak <= added.pow(-1.0 / p).mul_(ROOT_BOUND_SLACK)  # NaN compares false
    else:
        fine = peak <= ROOT_BOUND_SLACK * added ** (-1.0 / p) if added > 0 else torch.isfinite(peak)
    torch.where((fine & ~zero)[:, None, None], new, old, out=old)
    return ~(fine | zero)


def peak_abs(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """``max|x|`` (over ``dims``, default all), NaN and inf propagating: on an accelerator the
    infinity norm (one reduction), on the CPU ``max(max x, −min x)`` (two vectorised reductions; the
    CPU's infinity norm is not vectorised)."""
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, math.inf, dim=dims)
    if dims is None:
        return torch.maximum(x.amax(), -x.amin())
    return torch.maximum(x.amax(dim=dims), -x.amin(dim=dims))


def may_overflow(peak: Any, block: tuple[int, int]) -> Any:
    """Whether a block with entries up to ``peak`` may overflow fp32 in ``g gᵀ``, ``gᵀ g`` or ``g²``:
    their entries are at most ``max(m, n) · peak²`` (against a quarter of the fp32 maximum, for the
    exponential averages that add to them). ``peak``: a float or a float64 tensor."""
    return peak * peak * max(block) > torch.finfo(torch.float32).max / 4


def update_statistics(stacks: Sequence[Any], groups: Sequence[dict[str, Any]]) -> None:
    """One step's statistics of a layout's stacks (:class:`~dash_shampoo.stacks.Stack`), in place:
    the factors stack by stack (:func:`accumulate_factor`); the second moments and gradient EMAs
    of a group's stacks one ``_foreach`` op each (:func:`accumulate_second_moment`)."""
    by_group: dict[int, list[Any]] = {}
    for stack in stacks:
        by_group.setdefault(stack.group_index, []).append(stack)
    for index, members in by_group.items():
        group = groups[index]
        for stack in members:
            for side in ("left", "right"):
                if (factors := stack.factors(side)) is not None:
                    accumulate_factor(factors, stack.grad, side, group["factor_beta"])
        graded = [stack for stack in members if "moment" in stack.tensors]
        if graded:
            moments, grads = [s.tensors["moment"] for s in graded], [s.grad for s in graded]
            accumulate_second_moment(moments, grads, group["grafting"], group["betas"][1])
        if group["betas"][0] > 0:
            emas, grads = [s.tensors["grad_ema"] for s in members], [s.grad for s in members]
            torch._foreach_lerp_(emas, grads, 1 - group["betas"][0])


def stack_update(
    stack: Any, group: dict[str, Any], steps: Sequence[int], chunk_elements: int
) -> tuple[torch.Tensor, Scalar | None]:
    """The step's update blocks ``lr · P`` of one stack as ``(direction, scale)``
    (:func:`update_direction`), its runs' parameters at ``steps``.

    On the CPU a large stack is computed in chunks of rows of at most ``chunk_elements`` per torch
    thread (:func:`~dash_shampoo.linalg.roots.matrices_per_chunk`), so the ten or so elementwise
    passes over each chunk run in cache; the result is the same, with one factor per block.
    """
    beta1, beta2 = group["betas"]
    correct, start = group["bias_correction"], group["start_preconditioning_step"]
    counts, device = [run.count for run in stack.runs], stack.grad.device
    per_row = {
        "bias1": row_values(steps, counts, lambda t: 1 - beta1**t, device) if correct and beta1 > 0 else 1.0,
        "bias2": row_values(steps, counts, lambda t: 1 - beta2**t, device) if correct else 1.0,
        "started": row_values(steps, counts, lambda t: t >= start, device),
    }
    first_moment = stack.tensors["grad_ema"] if beta1 > 0 else stack.grad
    left, right = stack.roots("left"), stack.roots("right")
    moment, buffer = stack.tensors.get("moment"), stack.tensors.get("momentum")

    def rows_update(
        rows: slice, values: dict[str, Any], out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Scalar | None]:
        return update_direction(
            first_moment[rows],
            None if moment is None else moment[rows],
            None if left is None else left[rows],
            None if right is None else right[rows],
            None if buffer is None else buffer[rows],
            grafting=group["grafting"],
            eps=group["eps"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            lr=group["lr"],
            out=out,
            **values,
        )

    size = matrices_per_chunk(stack.grad, chunk_elements)
    if size >= stack.rows:
        return rows_update(slice(None), per_row)
    out = torch.empty_like(stack.grad)
    scales = torch.ones(stack.rows, 1, 1, dtype=out.dtype)
    for first in range(0, stack.rows, size):
        rows = slice(first, first + size)
        values = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in per_row.items()}
        direction, scale = rows_update(rows, values, out[rows])
        if direction.data_ptr() != out[rows].data_ptr():  # not written in place: a scaled copy
            torch.mul(direction, 1.0 if scale is None else scale, out=out[rows])
        elif scale is not None:
            scales[rows] = scale
    return out, scales
