"""Result files of the benchmarks and the trainer: the command line, milliseconds, medians with
spread, the device's name, writing the result files."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


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


def cpu_model() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform`` where there is none)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return model


def cpu_count() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with torch's thread count and the usable cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads, {cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name tag: ``cpu``, or the lower-case GPU name with dashes."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def write_report(
    stem: Path,
    report: dict[str, Any],
    text: str,
    plot: Callable[[dict[str, Any], Path], bool] | None = None,
    **json_options: Any,
) -> list[Path]:
    """Write ``stem.json`` (``report``, indented, with ``json_options``), ``stem.md`` (``text``) and,
    given ``plot``, ``stem.png``; returns the paths written (the PNG only if ``plot`` made it)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    written[0].write_text(json.dumps(report, indent=1, **json_options) + "\n")
    written[1].write_text(text)
    if plot is not None and plot(report, stem.with_suffix(".png")):
        written.append(stem.with_suffix(".png"))
    return written
