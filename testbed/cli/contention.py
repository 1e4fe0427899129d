"""``testbed contention``: N callers against one delegate of W workers (docs/contention.md)."""

from __future__ import annotations

import argparse

from testbed.cli.options import Subparsers, finite_float
from testbed.core.errors import TestbedError
from testbed.core.policy import parse_policy


def int_list(text: str) -> tuple[int, ...]:
    """``1,2,4`` -> ``(1, 2, 4)`` (``--callers``, ``--workers``)."""
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise TestbedError(f"{text!r} is not a comma-separated list of integers") from None
    if not vals:
        raise TestbedError(f"{text!r} is an empty list")
    return vals


def cmd_contention(args: argparse.Namespace) -> int:
    if args.size is not None:  # sizing from the model: no sweep is run
        return main_contention_size(args)
    if args.service_us is None or args.think_us is None or not args.output:
        raise TestbedError("a sweep needs --service-us S, --think-us Z and -o DIR "
                           "(or --size N to size a delegate from the model)")  # fmt: skip
    from testbed.jobs.contention import Sweep, main_contention  # lazy: only when this verb runs

    sweep = Sweep(
        callers=int_list(args.callers),
        workers=int_list(args.workers),
        service_us=args.service_us,
        think_us=args.think_us,
        service=args.service,
        service_dist=args.service_dist,
        think=args.think,
        think_dist=args.think_dist,
        duration_s=args.duration,
        warmup_s=args.warmup,
        seed=args.seed,
        nodes=args.nodes,
        references=not args.no_references,
    )
    return main_contention(sweep, args.output)


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "contention",
        help="N callers against one delegate of W workers: X(N), R(N), queueing",
        description="For each W and N: a delegate with W workers and a per-call service "
        "time, N traced callers (testbed run + a think/call loop) started together; "
        "writes a cell per (W, N) with a run directory per caller and the delegate's "
        "record of its queue.  Analyse with testbed analyze DIR (docs/contention.md).",
    )
    p.add_argument("--callers", default="1,2,4,8", metavar="N,N,...", help="caller counts")
    p.add_argument("--workers", default="1", metavar="W,W,...", help="delegate worker counts")
    p.add_argument("--service-us", type=finite_float, metavar="S",
                   help="mean service time per call at the delegate (µs)")  # fmt: skip
    p.add_argument("--think-us", type=finite_float, metavar="Z",
                   help="mean think time between a caller's calls (µs)")  # fmt: skip
    p.add_argument("--service", choices=("sleep", "spin"), default="sleep",
                   help="delegate service: sleep (default, leaves the CPUs free) or spin")  # fmt: skip
    p.add_argument("--service-dist", choices=("exp", "fixed"), default="exp",
                   help="service time distribution (default exp: the model is exact)")  # fmt: skip
    p.add_argument("--think", choices=("sleep", "spin"), default="sleep",
                   help="think phase: sleep (default) or spin (compute)")  # fmt: skip
    p.add_argument("--think-dist", choices=("exp", "fixed"), default="exp",
                   help="think time distribution (default exp)")  # fmt: skip
    p.add_argument("--duration", type=finite_float, default=10.0, metavar="SECONDS",
                   help="how long all callers run together per cell (default 10)")  # fmt: skip
    p.add_argument("--warmup", type=finite_float, default=1.0, metavar="SECONDS",
                   help="start of each cell left out of the measurement (default 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1, help="seed of think and service draws")
    p.add_argument("--nodes", type=int, default=0, metavar="K",
                   help="spread the callers over K network-namespace nodes, the delegate in "
                   "its own node (real TCP over veth; needs root); default 0: processes "
                   "on this machine over loopback")  # fmt: skip
    p.add_argument("--no-references", action="store_true",
                   help="no single-caller reference cell before each N > 1 cell (faster; "
                   "predictions then all use the first N = 1 cell)")  # fmt: skip
    p.add_argument("-o", "--output", metavar="DIR", help="results directory (a sweep)")
    add_size_arguments(p)
    p.set_defaults(func=cmd_contention)


# ---------------------------------------------------------------- --size: no sweep, the model


def parse_fraction(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1 (a target slowdown)."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise TestbedError(f"{text!r} is not a slowdown (e.g. 10% or 0.1)") from None
    if not v >= 0:
        raise TestbedError(f"the slowdown must be >= 0, not {text!r}")
    return v


def add_size_arguments(p: argparse.ArgumentParser) -> None:
    """``testbed contention --size N --slowdown X% --profile RUNDIR`` and where D and S
    come from (``--fc-from RUNDIR...``, ``--sweep DIR``, or ``--d-us`` with ``--service-us``)."""
    p.add_argument("--size", type=int, metavar="N",
                   help="size a delegate for N compute nodes (no sweep is run)")  # fmt: skip
    p.add_argument("--slowdown", default="10%", metavar="X%",
                   help="target slowdown per node for --size (default 10%%)")  # fmt: skip
    p.add_argument("--profile", metavar="RUNDIR", help="--size: the nodes' workload profile")
    p.add_argument("--fc-from", nargs="+", metavar="RUNDIR",
                   help="--size: D and S from these delegated runs (S = the delegate's "
                   "residence per call, D = overhead - S)")  # fmt: skip
    p.add_argument("--sweep", metavar="DIR", help="--size: D and S from a contention sweep")
    p.add_argument("--d-us", type=float, metavar="D", help="--size: D in µs (with --service-us)")
    p.add_argument("--size-policy", metavar="POLICY",
                   help="--size: forwarded set (default: every call)")  # fmt: skip
    p.add_argument("--size-gamma", type=float, default=1.0, metavar="G",
                   help="--size: gain of the compute nodes (default 1)")  # fmt: skip


def main_contention_size(args: argparse.Namespace) -> int:
    """Print the smallest W (and N* per W) the model predicts for ``args.size`` nodes."""
    target = parse_fraction(args.slowdown)
    if not args.profile:
        raise TestbedError("--size needs --profile RUNDIR (testbed profile -o RUNDIR -- PROGRAM)")
    if args.size_policy:
        parse_policy(args.size_policy)
    from analysis import contention  # lazy: analysis stack
    from analysis.compare import load_runs  # lazy: analysis stack
    from analysis.profiles import load_profile  # lazy: analysis stack

    prof = load_profile(args.profile)
    if args.fc_from:
        D, S, src = contention.station_from_runs(load_runs(args.fc_from)[1])
    elif args.sweep:
        D, S, src = contention.station_from_sweep(args.sweep)
    elif args.d_us is not None and getattr(args, "service_us", None) is not None:
        D, S, src = args.d_us * 1e-6, args.service_us * 1e-6, "--d-us and --service-us"
    else:
        raise TestbedError("--size needs D and S: --fc-from RUNDIR..., --sweep DIR, or "
                           "--d-us D --service-us S")  # fmt: skip
    b = prof.b(args.size_policy) if args.size_policy else None
    sz = contention.size_delegate(prof, D, S, args.size, target, b, args.size_gamma)
    print(f"D and S from {src}")
    for line in contention.sizing_lines(sz):
        print(line)
    t = sz.table.assign(f_c_us=sz.table["f_c_s"] * 1e6).drop(columns=["f_c_s"])
    print(t.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
