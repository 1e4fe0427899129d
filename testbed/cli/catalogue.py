"""``testbed catalogue OUTDIR``: profile the catalogue's workloads (the shipped profiles)."""

from __future__ import annotations

import argparse
import sys

from testbed.cli.options import Subparsers
from testbed.core.errors import TestbedError
from testbed.jobs.catalogue import PROFILED, SHIPPED_SCALE


def cmd_catalogue(args: argparse.Namespace) -> int:
    from testbed.jobs.catalogue import profile_catalogue  # lazy: only when this verb runs

    try:
        paths = profile_catalogue(
            args.outdir, args.names, scale=args.scale, method=args.method, fifo=args.fifo
        )
    except TestbedError as exc:  # exit status 1, as python3 -m testbed.jobs.catalogue had
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "catalogue",
        help="profile the catalogue's workloads natively (the shipped profiles)",
        description="Profile the experiment's workloads (testbed/jobs/workloads.py) natively\n"
        "on generated inputs, each into OUTDIR/NAME (an earlier profile there is replaced),\n"
        "as the profiles shipped in analysis/data/profiles were made (docs/analysis.md).",
        epilog="re-take the shipped profiles (perf: g(s) closer to native than strace's;\n"
        "--fifo: other load on the machine does not end up in g(s)):\n"
        "  testbed catalogue analysis/data/profiles --method perf --fifo 50",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("outdir", metavar="OUTDIR", help="where the profile run directories go")
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"workloads to profile (default: {' '.join(PROFILED)})",
    )
    p.add_argument(
        "--method",
        default="perf",
        choices=("auto", "perf", "strace"),
        help="tracer: perf trace -s (default), strace -f -T, or auto (strace if installed)",
    )
    p.add_argument(
        "--scale",
        type=float,
        default=SHIPPED_SCALE,
        metavar="SCALE",
        help=f"multiply each workload's default input size (default {SHIPPED_SCALE:g})",
    )
    p.add_argument(
        "--fifo",
        type=int,
        metavar="PRIO",
        help="profile under SCHED_FIFO at this priority (root; 1-99)",
    )
    p.set_defaults(func=cmd_catalogue)
