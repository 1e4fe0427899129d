"""``testbed bench``: native / trap-only / raw ZeroMQ / forwarded, side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from testbed.cli.options import Subparsers, connect_endpoint, positive_int


def cmd_bench(args: argparse.Namespace) -> int:
    from testbed.jobs.bench import bench, format_report  # lazy: only when this verb runs

    results = bench(
        args.delegate, args.calls, args.size, args.breakdown, args.rounds, args.transports
    )
    if args.breakdown:
        from testbed.jobs.breakdown import format_breakdown  # lazy: only when this verb runs

        print(format_breakdown(results, results["host"]))
    elif args.transports:
        from testbed.jobs.transports import format_transports  # lazy: only when this verb runs

        print(format_transports(results, results["host"]))
    else:
        print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "bench",
        help="side-by-side overhead benchmark (native, trap, ZeroMQ, forwarded)",
        description="Measure in one run, on the same endpoint: native syscall cost, trap-only "
        "cost, raw ZeroMQ round trip with the same message size, and the full forwarded "
        "round trip; print p50/p99 and their ratios.",
    )
    p.add_argument(
        "--delegate",
        type=connect_endpoint,
        metavar="ENDPOINT",
        help="delegate to use (default: start one on loopback)",
    )
    p.add_argument(
        "--calls",
        type=positive_int,
        default=20000,
        metavar="N",
        help="calls per measurement (default 20000)",
    )
    p.add_argument(
        "--size", type=int, default=64, metavar="BYTES", help="bytes per write (default 64)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="per-stage medians of a forwarded call, relay and delegate CPU per call, and the "
        "targets against C references (trap-only, raw TCP) in interleaved rounds",
    )
    p.add_argument(
        "--transports",
        action="store_true",
        help="the forwarded round trip over every transport here (ipc:// and tcp:// raw ZMTP, "
        "libzmq tcp, shm:// rings), each next to its C reference (Unix socket, TCP, a futex "
        "ping-pong for shm), with relay and delegate CPU per call, in interleaved rounds",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        metavar="R",
        help="interleaved rounds for --breakdown or --transports (default 5; --calls is split "
        "among them)",
    )
    p.set_defaults(func=cmd_bench)
