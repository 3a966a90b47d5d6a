"""``offramp`` command line. Each command group lives beside the code it drives and
registers itself here through a ``register(subparsers)`` function, so this file stays
a table of contents."""
from __future__ import annotations

import argparse
import importlib
import sys

from offramp.errors import OfframpError

# (module, what it adds) - imported lazily so `offramp --help` stays fast.
COMMAND_MODULES = [
    "offramp.ops.cli",  # generate
    "offramp.training.cli",  # prepare-data, train, train-gates, calibrate, eval
    "offramp.cluster.cli",  # cluster up|down|status
    "offramp.placement.cli",  # placement status|plan|apply|start|stop
    "offramp.bench",  # bench core|serve|placement|precision|faults|soak
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offramp",
        description="Serve decoder LMs split into pipeline stages with early exits.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (OfframpError, FileNotFoundError, ValueError) as e:
        # One line naming the problem and the fix; no traceback for user errors.
        print(f"offramp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
