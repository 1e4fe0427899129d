"""``testbed demo``: the main job on one machine (local delegate, real workload)."""

from __future__ import annotations

import argparse
import sys

from testbed.cli.options import Subparsers, new_dir, positive_int


def cmd_demo(args: argparse.Namespace) -> int:
    from testbed.jobs.demo import demo, report_lines  # lazy: only when this verb runs

    result = demo(args.output, args.size_mb, say=lambda text: print(text, file=sys.stderr))
    for line in report_lines(result):
        print(line)
    return 0


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on one machine (local delegate, real workload)",
        description="Start a local delegate, compress a generated file natively and with "
        "read,write forwarded, and print the measured f_c and slowdown.",
    )
    p.add_argument(
        "-o", "--output", type=new_dir, metavar="DIR", help="where the run directories go"
    )
    p.add_argument(
        "--size-mb",
        type=positive_int,
        default=4,
        metavar="MB",
        help="size of the generated input (default 4)",
    )
    p.set_defaults(func=cmd_demo)
