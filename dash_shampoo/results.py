"""Result files of the benchmarks and the trainer: run metadata (command, device, versions, date),
number formats, markdown tables, plots (matplotlib optional) and writing the files."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__


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


def ratio(x: float | None) -> str:
    """``x`` as a factor with two decimals (``1.23×``), "–" if None."""
    return "–" if x is None else f"{x:.2f}×"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table of ``header`` and one line per row (a ``|`` inside a cell is written ``/``)."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "/") for cell in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)]) + "\n"


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


def device_name(device: torch.device, threads: bool = True) -> str:
    """The GPU's name, or the CPU model with the usable cores (and torch's thread count if ``threads``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if not threads:
        return f"{cpu_model()} ({cpu_count()} cores)"
    return f"{cpu_model()} ({torch.get_num_threads()} threads, {cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """File-name tag: ``cpu``, or the lower-case GPU name with dashes."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def load_average() -> float | None:
    """The machine's load average over the last minute (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


@dataclass
class RunRecord:
    """What a result file says about its run; created when the run begins.

    Attributes:
        command: the command as typed (:func:`command_text`).
        device: the device's name (:func:`device_name`).
        device_type: ``cpu`` or ``cuda``.
        slug: the device's file-name tag (:func:`device_slug`).
    """

    command: str
    device: str
    device_type: str
    slug: str = "cpu"
    began: float = field(default_factory=time.perf_counter)
    load_at_start: float | None = field(default_factory=load_average)
    date: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    )

    @classmethod
    def start(
        cls, args: argparse.Namespace, device: torch.device, default_command: str, threads: bool = True
    ) -> RunRecord:
        """A run on ``device`` beginning now: the command as typed (else ``default_command``) and the
        device's name (with torch's CPU threads if ``threads``)."""
        name = device_name(device, threads)
        return cls(command_text(args, default_command), name, device.type, device_slug(device))

    def stem(self, folder: Path, kind: str) -> Path:
        """``folder/<kind>-<device slug>``: the result files' path without the suffix."""
        return folder / f"{kind}-{self.slug}"

    def metadata(self) -> dict[str, Any]:
        """Command, device, versions, start date, wall time so far and the load at start and now."""
        load_now = load_average()
        loads = None if self.load_at_start is None or load_now is None else [self.load_at_start, load_now]
        return {
            "command": self.command,
            "device": self.device,
            "device_type": self.device_type,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "dash_shampoo": __version__,
            "date": self.date,
            "wall_seconds": time.perf_counter() - self.began,
            "load_average": loads,
        }


def metadata_lines(meta: dict[str, Any]) -> list[str]:
    """Markdown list items of a :meth:`RunRecord.metadata`: command, device and versions, date."""
    load = meta.get("load_average")
    load_text = f"; load average (1 min) at start/end {load[0]:.2f}/{load[1]:.2f}" if load else ""
    return [
        f"- command: `{meta['command']}`",
        f"- device: {meta['device']}; torch {meta['torch']}, Python {meta['python']}, "
        f"dash_shampoo {meta['dash_shampoo']}",
        f"- date: {meta['date']}; total run time {meta['wall_seconds']:.0f} s{load_text}",
    ]


def save_plot(path: Path, draw: Callable[[Any], Any], dpi: int = 110) -> bool:
    """Save the figure ``draw(pyplot)`` returns as ``path`` (matplotlib's Agg backend); False when
    ``draw`` returns None, or, after saying so on stderr, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path.name} (pip install matplotlib)", file=sys.stderr)
        return False
    figure = draw(plt)
    if figure is None:
        return False
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return True


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
    # Suffixes are appended, not substituted: a stem like "run.v2" keeps its dot.
    json_path, md_path, png_path = (stem.with_name(stem.name + suffix) for suffix in (".json", ".md", ".png"))
    json_path.write_text(json.dumps(report, indent=1, **json_options) + "\n")
    md_path.write_text(text)
    written = [json_path, md_path]
    if plot is not None and plot(report, png_path):
        written.append(png_path)
    return written
