"""The per-stack maths of one DASH step: pure functions on ``(S, m, n)`` block stacks.

For a block ``g`` (m×n) with gradient EMA ``G~``, factors ``L`` (m×m) and ``R`` (n×n):

    L ← β_f L + (1 − β_f) g gᵀ,   R ← β_f R + (1 − β_f) gᵀ g          (sums when β_f = 1)
    U = L^(-1/p) · Ĝ · R^(-1/p),  Ĝ = G~ / (1 − β₁^t)
    P = U · ||D||_F / (||U||_F + 1e-16)                              (per-block grafting)

where ``D`` is the grafting method's own direction for the block (Adam: ``Ĝ / (sqrt(v̂) + ε)``).
"""

from __future__ import annotations

from typing import Literal

import torch

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


def accumulate_second_moment(moment: torch.Tensor, g: torch.Tensor, grafting: str, beta2: float) -> None:
    """The grafting method's elementwise second moment: EMA (Adam, RMSprop) or sum (AdaGrad)."""
    if grafting in ("adam", "rmsprop"):
        moment.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    elif grafting == "adagrad":
        moment.addcmul_(g, g)


def grafting_direction(
    g_hat: torch.Tensor, moment: torch.Tensor | None, grafting: str, eps: float, bias2: Scalar
) -> torch.Tensor:
    """The grafting method's own update direction for the (bias-corrected) first moment ``g_hat``.

    Adam: ``ĝ / (sqrt(v / (1 − β₂^t)) + ε)``; RMSprop and AdaGrad: ``ĝ / (sqrt(v) + ε)``; SGD and
    none: ``ĝ``.
    """
    if grafting == "adam":
        return g_hat / (moment / bias2).sqrt_().add_(eps)
    if grafting in ("rmsprop", "adagrad"):
        return g_hat / moment.sqrt().add_(eps)
    return g_hat


def precondition(
    g_hat: torch.Tensor, left_root: torch.Tensor | None, right_root: torch.Tensor | None
) -> torch.Tensor:
    """``U = L^(-1/p) Ĝ R^(-1/p)`` per block (a missing side is the identity)."""
    U = g_hat
    if left_root is not None:
        U = torch.bmm(left_root, U)
    if right_root is not None:
        U = torch.bmm(U, right_root)
    return U


def block_norms(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each block, shape (S, 1, 1)."""
    return torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)


def graft(U: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``U`` rescaled per block to the Frobenius norm of ``direction`` (zero blocks stay zero)."""
    return U * (block_norms(direction) / block_norms(U).add_(1e-16))


def refresh_due(step: int, start: int, frequency: int) -> bool:
    """Whether the roots are refreshed at ``step`` (without staggering): at the start step, then at
    every multiple of ``frequency`` after it."""
    return step == start or (step > start and step % frequency == 0)
