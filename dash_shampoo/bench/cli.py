"""``dash-shampoo bench``: ``roots`` (the inverse-root solver study), ``step`` (one-process step timings
against AdamW and the peers), ``dist`` (multi-process step timings and bytes exchanged) and ``gpu``
(all of a lent GPU's checks in one command)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "roots": ("dash_shampoo.bench.roots", "inverse-root solver study: error and time per method"),
    "step": ("dash_shampoo.bench.step", "optimizer step time: AdamW, DASH modes and solvers, peers"),
    "dist": ("dash_shampoo.bench.dist", "step time per rank and bytes per step at 1, 2, 3 processes"),
    "gpu": ("dash_shampoo.bench.gpu", "the lent GPU's whole check in a few minutes (--dry-run on a CPU)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one sub-parser per benchmark; each module adds its own options."""
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    for name, (module_name, help_text) in BENCHMARKS.items():
        importlib.import_module(module_name).add_arguments(benchmarks.add_parser(name, help=help_text))


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark."""
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args)
