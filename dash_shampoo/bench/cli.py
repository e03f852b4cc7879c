"""``dash-shampoo bench``: ``step`` (one-process step timings against AdamW and the peers) and
``dist`` (multi-process step timings and bytes exchanged)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "step": ("dash_shampoo.bench.step", "optimizer step time: AdamW, DASH modes and solvers, peers"),
    "dist": ("dash_shampoo.bench.dist", "step time per rank and bytes per step at 1, 2, 3 processes"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one sub-parser per benchmark; each module adds its own options."""
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        sub = benchmarks.add_parser(name, help=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    return args._bench_run(args)
