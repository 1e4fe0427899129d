"""``testbed profile``: run a program natively and record n(s), g(s), C and p."""

from __future__ import annotations

import argparse
import sys

from testbed.cli.options import Subparsers, add_program, add_quiet, new_dir, non_negative_int
from testbed.core.procs import program_argv


def cmd_profile(args: argparse.Namespace) -> int:
    from testbed.jobs.profile import profile  # lazy: only when this verb runs

    out, meta = profile(
        program_argv(args.program), args.output, args.method, native=args.native_runs
    )
    if not args.quiet:
        print(
            f"testbed profile: {meta['n_total']} calls of {meta['syscall_types']} types, "
            f"wall {meta['wall_s']:.3f} s, user {meta['user_s']:.3f} s, sys {meta['sys_s']:.3f} s, "
            f"p_sys {meta['p_sys']:.2%}, p_g {meta['p_g']:.2%} ({meta['method']}) -> {out}",
            file=sys.stderr,
        )
        if meta["lost_events"]:
            print(
                f"testbed profile: warning: tracer lost {meta['lost_events']} events",
                file=sys.stderr,
            )
    return meta["exit_status"]


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "profile",
        help="run a program natively and record n(s), g(s), C and p",
        description="Profile PROGRAM natively: per-syscall counts n(s) and times g(s), "
        "wall/user/sys time, C and p.",
    )
    p.add_argument(
        "-o",
        "--output",
        type=new_dir,
        metavar="RUNDIR",
        help="run directory (default runs/profile-TIME)",
    )
    p.add_argument(
        "--method",
        choices=("auto", "perf", "strace"),
        default="auto",
        help="tracer: perf trace -s, strace -f -T, or auto (strace if installed, else perf)",
    )
    p.add_argument(
        "--native-runs",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="also time N untraced runs (native t_nd for testbed analyze; only for "
        "commands that can be repeated, default 0)",
    )
    add_quiet(p, "no summary on stderr")
    add_program(p, "the program to profile natively, after --")
    p.set_defaults(func=cmd_profile)
