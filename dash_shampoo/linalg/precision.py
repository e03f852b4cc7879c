"""Batched matmul at a chosen precision, with fp32 accumulation, on any device.

``"fp32"``: IEEE float32 products (TF32 switched off on CUDA).
``"tf32"``: inputs rounded to TF32 (10-bit mantissa), fp32 accumulation: tensor cores on CUDA,
emulated on the CPU by rounding the inputs and multiplying in fp32.
``"bf16"`` / ``"fp16"``: inputs rounded to 16 bits, products accumulated and returned in fp32:
``torch.bmm(..., out_dtype=float32)`` on CUDA where available, otherwise emulated by rounding the
inputs and multiplying in fp32 (exact products of 16-bit numbers summed in fp32, which is what the
tensor cores compute).

On CUDA, fp32 and TF32 products differ only by the process-wide flag
``torch.backends.cuda.matmul.allow_tf32``. :func:`matmul_precision` sets it once for a whole
computation (a solver call) and puts it back after; :func:`matmul` inside it changes no flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

Precision = Literal["fp32", "tf32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round float32 ``x`` to the nearest TF32 value (1 sign, 8 exponent, 10 mantissa bits)."""
    bits = x.contiguous().view(torch.int32)
    # Round half away from zero on the 13 dropped mantissa bits, then clear them.
    rounded = (bits + 0x1000) & ~0x1FFF
    out = rounded.view(torch.float32)
    return torch.where(torch.isfinite(x), out, x)


def round_to(x: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Return ``x`` rounded to the input precision of ``precision``, kept in ``x``'s dtype."""
    if precision == "fp32":
        return x
    if precision == "tf32":
        return round_tf32(x.to(torch.float32)).to(x.dtype)
    return x.to(_HALF[precision]).to(x.dtype)


@contextlib.contextmanager
def matmul_precision(precision: Precision, device: torch.device) -> Iterator[None]:
    """Within the block, fp32 products on a CUDA ``device`` are TF32 exactly when ``precision`` is
    ``"tf32"`` (the flag is set once on entry and restored on exit; other devices: no effect)."""
    if device.type != "cuda":
        yield
        return
    flag = torch.backends.cuda.matmul
    previous = flag.allow_tf32
    flag.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        flag.allow_tf32 = previous


def matmul(
    a: torch.Tensor, b: torch.Tensor, precision: Precision = "fp32", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Batched ``a @ b`` at ``precision`` inside :func:`matmul_precision` (no flag is changed here),
    written into ``out`` when given.

    fp64 stacks with ``"fp32"`` are multiplied in fp64 (the float64 reference path).
    """
    if a.device.type == "cuda" and a.dtype == torch.float32:
        if precision in ("fp32", "tf32"):
            return torch.bmm(a, b, out=out)
        half = _HALF[precision]
        try:
            product = torch.bmm(a.to(half), b.to(half), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # older torch without the fp32-output kernel
            product = torch.bmm(a.to(half), b.to(half)).to(torch.float32)
        return product if out is None else out.copy_(product)
    if precision == "fp32":
        return torch.bmm(a, b, out=out)
    return torch.bmm(round_to(a, precision), round_to(b, precision), out=out)


def bmm(a: torch.Tensor, b: torch.Tensor, precision: Precision = "fp32") -> torch.Tensor:
    """Batched ``a @ b`` with inputs rounded to ``precision``, accumulated and returned in ``a.dtype``
    (one :func:`matmul` inside its own :func:`matmul_precision`)."""
    with matmul_precision(precision, a.device):
        return matmul(a, b, precision)


def baddbmm(
    c: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    beta: float,
    alpha: float,
    precision: Precision = "fp32",
) -> torch.Tensor:
    """``beta·c + alpha·(a @ b)`` with the product's inputs at ``precision`` (one fused kernel at fp32
    and tf32; inside :func:`matmul_precision`, like :func:`matmul`)."""
    cuda = a.device.type == "cuda"
    if precision == "fp32" or (precision == "tf32" and cuda and a.dtype == torch.float32):
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)
    if cuda:
        return torch.add(c * beta, matmul(a, b, precision), alpha=alpha)
    return torch.baddbmm(c, round_to(a, precision), round_to(b, precision), beta=beta, alpha=alpha)
