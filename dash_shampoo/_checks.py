"""Argument checks shared by the package: each error names the argument, its value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def check_choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise ``ValueError`` naming all three."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Any:
    """Return ``value`` if it is a real number (an int when ``integer``) inside the given bounds.

    Raises:
        TypeError: the value is not a number (bools are not numbers here).
        ValueError: the value is outside ``[low, high]`` (bounds open where asked), or not finite.
    """
    kind = "an integer" if integer else "a real number"
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not integer:
        number = float(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float) if not integer else int):
        raise TypeError(f"{name} must be {kind}; got {value!r} of type {type(value).__name__}")
    else:
        number = value
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite; got {value!r}")
    lo_bad = low is not None and (number <= low if low_open else number < low)
    hi_bad = high is not None and (number >= high if high_open else number > high)
    if lo_bad or hi_bad:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else repr(low)
        hi = "inf" if high is None else repr(high)
        raise ValueError(f"{name} must be in {left}{lo}, {hi}{right}; got {value!r}")
    return value


def check_stack(name: str, value: Any) -> torch.Tensor:
    """Return ``value`` if it is a floating-point tensor of shape (N, n, n), else raise ``TypeError``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, n, n); got {type(value).__name__}")
    if value.ndim != 3 or value.shape[1] != value.shape[2]:
        raise TypeError(f"{name} must have shape (N, n, n); got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {value.dtype}")
    if value.shape[1] == 0:
        raise TypeError(f"{name} must have n >= 1; got shape {tuple(value.shape)}")
    return value
