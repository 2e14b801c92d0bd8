"""The ``threelc`` command line: one subcommand per module, imported only when used.

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``; this file
only dispatches, so ``threelc bench codec`` never imports torch and a new subcommand is one row
in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "COMMANDS"]

#: subcommand -> (module, one-line help)
COMMANDS = {
    "bench": ("threelc.launch.bench.codec", "benchmarks: `bench codec` (codec speed and ratio), `bench train` (emulated cluster)"),
    "demo": ("threelc.launch.demo", "train on digits with allreduce and 3LC under torchrun, print the savings"),
    "report": ("threelc.launch.runs.report", "compare run folders: table and plots"),
    "emulate": ("threelc.launch.cluster.emulate", "run a torchrun job on N emulated nodes with shaped links"),
}


def main(argv=None) -> int:
    """Entry point of the ``threelc`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="threelc", description="3LC gradient compression for PyTorch DDP")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            sub.set_defaults(run=module.run)  # a module may set a more specific run below
            module.add_arguments(sub)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
