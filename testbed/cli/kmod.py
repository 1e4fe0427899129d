"""``testbed kmod status``: check the mktrace kernel module (docs/kmod.md)."""

from __future__ import annotations

import argparse
import sys

from testbed.cli.options import Subparsers, add_actions
from testbed.core.errors import TestbedError


def cmd_kmod(args: argparse.Namespace) -> int:
    from testbed.compute.interpose.kmod import status_line  # lazy: only when this verb runs

    try:
        line = status_line(args.device) if args.device is not None else status_line()
    except TestbedError:
        raise  # one line and its exit status, from main
    except OSError as exc:
        print(f"testbed: error: mktrace: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(line)
    return 0


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "kmod",
        help="check the mktrace kernel module",
        description="Check the mktrace module (kthread runs: testbed run --backend kmod "
        "--mode kthread).",
    )
    actions = add_actions(p, "kmod_action")
    q = actions.add_parser(
        "status",
        help="check that the module is loaded; version and parameters",
        description="Print the loaded module's version, ABI, hookable syscall numbers, the "
        "delegate thread's CPU and the module parameters on one line (docs/kmod.md).",
    )
    q.add_argument(
        "--device",
        metavar="DEVICE",
        help="the module's character device (default /dev/mktrace)",
    )
    p.set_defaults(func=cmd_kmod)
