"""Formatting shared by the benchmark reports: the command line, milliseconds, medians with spread."""

from __future__ import annotations

import argparse
import shlex
from typing import Any


def command_text(args: argparse.Namespace, default: str) -> str:
    """The command as typed (recorded by the ``dash-shampoo`` entry point), else ``default``."""
    words = getattr(args, "command_line", None)
    return shlex.join(words) if words else default


def ms(seconds: float | None) -> str:
    """Seconds as milliseconds with three significant digits (whole numbers from 100 ms), "–" if None."""
    if seconds is None:
        return "–"
    value = seconds * 1e3
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def spread(stats: dict[str, Any] | None) -> str:
    """``median [min–max] n=N`` in milliseconds of a ``{median, min, max, n}`` summary."""
    if not stats:
        return "–"
    if stats["n"] == 1:
        return f"{ms(stats['median'])} (n=1)"
    return f"{ms(stats['median'])} [{ms(stats['min'])}–{ms(stats['max'])}] n={stats['n']}"
