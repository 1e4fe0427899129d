"""``testbed replay``: re-issue a run's forwarded calls against a delegate (docs/whatif.md)."""

from __future__ import annotations

import argparse
import sys

from testbed.cli.options import (
    Subparsers,
    add_delegate_client,
    add_quiet,
    connect_endpoint,
    positive_int,
    timeout_seconds,
)


def cmd_replay(args: argparse.Namespace) -> int:
    from testbed.jobs import replay  # lazy: numpy and zmq, only when this verb runs

    r = replay.replay(
        args.rundir,
        args.delegate,
        output=args.output,
        elide_compute=args.elide_compute,
        curve_keys=args.curve_keys,
        timeout_s=args.timeout,
        connect_timeout_s=args.connect_timeout,
        progress=None if args.quiet else replay.print_progress,
        async_writes=args.async_writes,
        batch=args.batch,
    )
    if not args.quiet:
        for line in replay.summary_lines(r):
            print(line, file=sys.stderr)
    return 0


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "replay",
        help="re-issue a recorded run's forwarded calls against another delegate: "
        "what would this program's wall time be there?",
        description="Replay the forwarded-call stream of a cost-mode run directory against "
        "the delegate at ENDPOINT (any transport: tcp://, ipc://, shm://, CURVE), with the "
        "recorded threads, call numbers and payload sizes (payload bytes synthesised), and "
        "write a run directory (mode replay) whose wall_s is the predicted wall time of the "
        "program there. The program's computation between calls is reproduced by spinning "
        "through the recorded gaps, or elided (--elide-compute) and added back. Start the "
        "delegate with --delay-us to ask what a slower link would cost (docs/whatif.md).",
    )
    p.add_argument("rundir", metavar="RUNDIR", help="run directory of a cost-mode run")
    p.add_argument(
        "--delegate",
        type=connect_endpoint,
        required=True,
        metavar="ENDPOINT",
        help="delegate to replay against, e.g. tcp://10.0.0.2:5555 or shm:///tmp/d.sock",
    )
    p.add_argument(
        "--elide-compute",
        action="store_true",
        help="issue the calls back to back instead of spinning through the computation "
        "between them, and compose the wall time from the measured round trips: much "
        "faster for compute-bound programs; calls of different threads do not overlap",
    )
    p.add_argument(
        "--async-writes",
        type=positive_int,
        default=0,
        metavar="W",
        help="what if writes were forwarded asynchronously: answer each write (write, "
        "pwrite64, writev, pwritev, pwritev2) at once, at most W unanswered per thread; "
        "fsync, fdatasync, close and the thread's exit wait for them (with --elide-compute)",
    )
    p.add_argument(
        "--batch",
        type=positive_int,
        default=0,
        metavar="K",
        help="what if a thread's consecutive writes went K to a message: only each "
        "message's last write waits for the reply, the message carrying all their bytes "
        "(with --elide-compute; not with --async-writes)",
    )
    p.add_argument("-o", "--output", metavar="RUNDIR", help="run directory to write "
                   "(default runs/replay-<timestamp>)")  # fmt: skip
    p.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=2.0,
        metavar="SECONDS",
        help="per-call timeout; a call without a reply by then counts as a fault (default 2)",
    )
    add_delegate_client(p)
    add_quiet(p, "no progress and no summary")
    p.set_defaults(func=cmd_replay)
