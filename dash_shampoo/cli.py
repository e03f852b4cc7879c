"""The ``dash-shampoo`` command: ``train`` and ``bench roots|step|dist`` (solver study, step timings)."""

from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command -> (module with add_arguments(parser) and run(args), help). Imported lazily so that
# one command's optional dependencies never slow down or break another.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dash_shampoo.train.trainer", "train a Llama-style language model with DASH or AdamW"),
    "bench": ("dash_shampoo.bench.cli", "benchmarks: `bench roots` (solvers), `bench step`, `bench dist`"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="dash-shampoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text)
        if name == chosen:
            modules[name] = importlib.import_module(module_name)
            modules[name].add_arguments(sub)
    args = parser.parse_args(argv)
    args.command_line = ["dash-shampoo", *argv]  # recorded in result files
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
