"""The ``dash-shampoo`` command: ``roots`` (solver study) and, as they land, ``train`` and ``bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="dash-shampoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from .bench import roots as roots_bench

    roots_bench.add_arguments(commands.add_parser("roots", help="inverse-root solver study"))
    args = parser.parse_args(argv)
    if args.command == "roots":
        return roots_bench.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
