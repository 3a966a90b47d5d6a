"""``offramp bench``: speed measured side by side in one run, printed as ratios.

Machines here are noisy, so every contender runs in the same process, interleaved over
repeats, and the targets are ratios between them rather than absolute times.

One module per bench (``core``, ``serve``, ``placement``, ``precision``, ``faults``, ``soak``), each with its
``register(bsub)``; what they share is in ``common``. Nothing outside this package imports
it except the command line (``offramp.cli``), so benches may use any part of Offramp.
"""
from __future__ import annotations


def register(sub) -> None:
    from offramp.bench import core, faults, placement, precision, serve, soak

    p = sub.add_parser("bench", help="benchmarks (ratios measured side by side)",
                       description="Benchmarks that print ratios measured side by side in one run.")
    bsub = p.add_subparsers(dest="bench", metavar="WHICH", required=True)
    for bench in (core, serve, placement, precision, faults, soak):
        bench.register(bsub)
