"""``testbed delegate``: serve forwarded system calls (docs/wire.md, docs/offload.md)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from testbed.cli.options import (
    Subparsers,
    add_quiet,
    delay_us,
    endpoint,
    positive_int,
    timeout_seconds,
)
from testbed.core import limits

if TYPE_CHECKING:
    from testbed.delegate.daemon import Delegate


def delegate_from_args(args: argparse.Namespace) -> Delegate:
    """The delegate the options describe: the one place mapping them to the daemon's API."""
    from testbed.delegate.daemon import make_delegate  # lazy: only when this verb runs

    return make_delegate(
        args.listen,
        workers=args.workers,
        delay_us=args.delay_us,
        service_us=args.service_us,
        service=args.service,
        service_dist=args.service_dist,
        seed=args.seed,
        record=bool(args.record),
        offload_root=args.offload_root,
        offload_max_fds=args.offload_max_fds,
        offload_idle_timeout=args.offload_idle_timeout,
        insecure=args.insecure,
        max_calls=args.max_calls,
        curve_keys=args.curve_keys,
        transport=args.transport,
    )


def cmd_delegate(args: argparse.Namespace) -> int:
    from testbed.core.keys import exposure_warning  # lazy: pyzmq (13 ms), this verb only
    from testbed.delegate.daemon import serve_until_stopped  # lazy: only when this verb runs

    limits.raise_fd_limit()  # first: the executor's and the connections' fd caps derive from it
    delegate = delegate_from_args(args)

    def ready(d) -> None:
        if not args.quiet:
            print(d.status_line(), file=sys.stderr, flush=True)
            warning = exposure_warning(d.bound_endpoint, d.curve_keys)
            if warning:
                print(warning, file=sys.stderr, flush=True)

    try:
        serve_until_stopped(delegate, user=args.user, on_ready=ready)
    finally:
        if delegate.service is not None and args.record:
            delegate.service.write(args.record, delegate.welcome_info())
    if not args.quiet:
        for line in delegate.accounting_lines():
            print(line, file=sys.stderr)
        print(f"testbed delegate: stopped after {delegate.answered} calls from "
              f"{len(delegate.stats())} clients", file=sys.stderr, flush=True)  # fmt: skip
    return 0


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "delegate",
        help="serve forwarded system calls (ZeroMQ ROUTER)",
        description="Run the delegate daemon: answer forwarded calls from relays. "
        "Stops cleanly on SIGINT/SIGTERM.",
    )
    p.add_argument(
        "--listen",
        type=endpoint,
        required=True,
        metavar="ENDPOINT",
        help="endpoint to bind, e.g. tcp://0.0.0.0:5555, tcp://10.0.0.2:5555, ipc:///tmp/d.sock "
        "or shm:///tmp/d.sock (same node: shared-memory rings, docs/wire.md)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="worker threads answering calls (default 1)",
    )
    p.add_argument(
        "--delay-us",
        type=delay_us,
        default=0.0,
        metavar="D",
        help="spin D microseconds per call to emulate a slower link (default 0)",
    )
    p.add_argument(
        "--service-us",
        type=delay_us,
        metavar="S",
        help="serve calls through one FIFO queue shared by the workers, each call taking "
        "S microseconds of service (mean; see --service-dist); see docs/contention.md",
    )
    p.add_argument(
        "--service",
        choices=("sleep", "spin"),
        default="sleep",
        help="how a worker spends the service time: sleep (leaves the CPUs free, default) or spin",
    )
    p.add_argument(
        "--service-dist",
        choices=("exp", "fixed"),
        default="exp",
        help="service time per call: exponential with mean S (default) or exactly S",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the service-time draws (default 0)")
    p.add_argument(
        "--record",
        metavar="DIR",
        help="on exit write the delegate's own record of its queue (per call: receipt, "
        "start and end of service) to DIR/delegate.json and DIR/queue.bin",
    )
    p.add_argument(
        "--offload-root",
        metavar="DIR",
        help="enable offload mode: execute relays' file I/O beneath DIR (docs/offload.md)",
    )
    p.add_argument(
        "--offload-max-fds",
        type=positive_int,
        metavar="N",
        help="offload mode: open remote fds allowed per client (default 1024)",
    )
    p.add_argument(
        "--offload-idle-timeout",
        type=timeout_seconds,
        metavar="S",
        help="offload mode: close the remote fds of a client not heard from for S seconds "
        "(a relay killed without BYE; default 3600; docs/offload.md)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow offload mode on a non-loopback endpoint without --curve-keys",
    )
    p.add_argument(
        "--max-calls",
        type=positive_int,
        metavar="N",
        help="exit after answering N calls (for scripted experiments)",
    )
    p.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="require ZeroMQ CURVE: DIR/server.key_secret (mode 0600) and the allowed "
        "relays' public keys in DIR/authorized/*.key (make them with: testbed keys new DIR)",
    )
    p.add_argument(
        "--transport",
        choices=("auto", "zmtp", "libzmq"),
        default="auto",
        help="zmtp: speak ZMTP on plain sockets in the serving thread (no libzmq, about "
        "half the CPU per call); libzmq: a ZeroMQ ROUTER. auto (default): zmtp for "
        "tcp://ADDR:PORT (IPv4 or *) and ipc://PATH with one worker, no CURVE and no "
        "--service-us, unless TESTBED_ZMTP=0; libzmq otherwise; shm://PATH (a same-node "
        "delegate: rings in shared memory, the Unix socket PATH to meet) is always served "
        "by the raw router, never by libzmq (docs/wire.md)",
    )
    p.add_argument(
        "--user",
        "--offload-user",
        dest="user",
        metavar="NAME",
        help="started as root: bind and read the keys, then serve as this unprivileged "
        "user (no supplementary groups, no capabilities, no_new_privs); in offload mode "
        "files are created as NAME",
    )
    add_quiet(p, "no status line on start and no per-client accounting on exit")
    p.set_defaults(func=cmd_delegate)
