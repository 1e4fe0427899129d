"""``testbed`` command line: one ``cmd_<verb>`` per subcommand.

The CLI is a thin layer: each ``cmd_<verb>`` turns its parsed arguments into
a call of the module that does the job (``testbed.run.run``,
``testbed.profile.profile``, ``testbed.bench.bench``, ``testbed.demo.demo``,
... imported lazily so ``--help`` is fast and ``testbed`` never imports
``analysis`` unless asked to) and prints what it returns.  User errors
(:class:`testbed.errors.TestbedError`) are printed as one line
``testbed: error: ...`` with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

from testbed.errors import TestbedError
from testbed.procs import program_argv

# ---------------------------------------------------------------- validators


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def non_negative_float(text: str) -> float:
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def cpu_list(text: str) -> frozenset[int]:
    """A CPU list such as 0,2-3 of CPUs this machine has."""
    from testbed.cpus import parse_cpus

    try:
        cpus = parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if max(cpus) >= (os.cpu_count() or 1):
        raise argparse.ArgumentTypeError(f"CPUs {text!r}: this machine has {os.cpu_count()}")
    return cpus


#: Longest timeout (s) and injected delay (us) the options accept.
MAX_SECONDS = 24 * 3600.0
MAX_DELAY_US = 10e6


def timeout_seconds(text: str) -> float:
    """A finite timeout > 0 s (0 would make every forwarded call a fault)."""
    value = _finite(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 and <= {MAX_SECONDS:g} seconds")
    return value


def delay_us(text: str) -> float:
    value = non_negative_float(text)
    if value > MAX_DELAY_US:
        raise argparse.ArgumentTypeError(f"{text!r} must be <= {MAX_DELAY_US:g} us")
    return value


def new_dir(text: str) -> str:
    """An output directory: must not be an existing non-directory."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    return text


def endpoint(text: str) -> str:
    """A ZeroMQ endpoint: tcp://HOST:PORT or ipc://PATH (HOST:PORT gets tcp://)."""
    from testbed.keys import EndpointError, parse_endpoint

    try:
        return parse_endpoint(text)
    except EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def connect_endpoint(text: str) -> str:
    """An endpoint to connect to: as :func:`endpoint`, and a TCP port is 1-65535."""
    from testbed.keys import EndpointError, parse_endpoint

    try:
        return parse_endpoint(text, connect=True)
    except EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def syscall_set(text: str) -> frozenset[int]:
    from testbed.syscalls import parse_set

    try:
        return parse_set(text)
    except TestbedError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------- commands


def cmd_delegate(args: argparse.Namespace) -> int:
    from testbed import limits
    from testbed.delegate import delegate_from_args, serve_until_stopped
    from testbed.keys import exposure_warning

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


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.relay import STAGE_TRACE_ENV
    from testbed.run import run, summary_lines

    result = run(
        program_argv(args.program),
        delegate=args.delegate,
        forward=args.forward,
        policy=args.policy,
        profile=args.profile,
        mode=args.mode,
        backend=args.backend,
        output=args.output,
        timeout_s=args.timeout,
        connect_timeout_s=args.connect_timeout,
        busy_poll=args.busy_poll,
        curve_keys=args.curve_keys,
        offload_paths=args.offload_path,
        pin_program=args.pin_program,
        delay_us=args.delay_us,
        faithful=args.faithful,
        flush_caller_tlb=args.flush_caller_tlb,
        stage_trace=os.environ.get(STAGE_TRACE_ENV) or None,
    )
    if not args.quiet:
        for line in summary_lines(result):
            print(line, file=sys.stderr)
    return result.exit_status


def cmd_profile(args: argparse.Namespace) -> int:
    from testbed.profile import profile

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


def cmd_bench(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from testbed.bench import bench, format_report

    results = bench(args.delegate, args.calls, args.size, args.breakdown, args.rounds)
    if args.breakdown:
        from testbed.breakdown import format_breakdown

        print(format_breakdown(results, results["host"]))
    else:
        print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from analysis.cli import main_model

    return main_model(args)


def cmd_analyze(args: argparse.Namespace) -> int:
    from analysis.cli import main_analyze

    return main_analyze(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from testbed.demo import demo, report_lines

    result = demo(args.output, args.size_mb, say=lambda text: print(text, file=sys.stderr))
    for line in report_lines(result):
        print(line)
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from testbed.lab import main_lab

    return main_lab(args)


def cmd_provision(args: argparse.Namespace) -> int:
    from testbed.provision import main_provision

    return main_provision(args)


def cmd_experiment(args: argparse.Namespace) -> int:
    from testbed.experiment import main_experiment

    return main_experiment(args)


def cmd_contention(args: argparse.Namespace) -> int:
    from testbed.contention import main_contention

    return main_contention(args)


def cmd_gamma(args: argparse.Namespace) -> int:
    from testbed.gain import main_gamma

    return main_gamma(args)


def cmd_keys(args: argparse.Namespace) -> int:
    from testbed.keys import main_keys

    return main_keys(args)


def cmd_vm(args: argparse.Namespace) -> int:
    from testbed.vm import main_vm

    return main_vm(args)


# ---------------------------------------------------------------- parser


def _add_contention(sub) -> None:
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
    p.add_argument("--service-us", type=_finite, required=True, metavar="S",
                   help="mean service time per call at the delegate (µs)")  # fmt: skip
    p.add_argument("--think-us", type=_finite, required=True, metavar="Z",
                   help="mean think time between a caller's calls (µs)")  # fmt: skip
    p.add_argument("--service", choices=("sleep", "spin"), default="sleep",
                   help="delegate service: sleep (default, leaves the CPUs free) or spin")  # fmt: skip
    p.add_argument("--service-dist", choices=("exp", "fixed"), default="exp",
                   help="service time distribution (default exp: the model is exact)")  # fmt: skip
    p.add_argument("--think", choices=("sleep", "spin"), default="sleep",
                   help="think phase: sleep (default) or spin (compute)")  # fmt: skip
    p.add_argument("--think-dist", choices=("exp", "fixed"), default="exp",
                   help="think time distribution (default exp)")  # fmt: skip
    p.add_argument("--duration", type=_finite, default=10.0, metavar="SECONDS",
                   help="how long all callers run together per cell (default 10)")  # fmt: skip
    p.add_argument("--warmup", type=_finite, default=1.0, metavar="SECONDS",
                   help="start of each cell left out of the measurement (default 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=1, help="seed of think and service draws")
    p.add_argument("--nodes", type=int, default=0, metavar="K",
                   help="spread the callers over K network-namespace nodes, the delegate in "
                   "its own node (real TCP over veth; needs root); default 0: processes "
                   "on this machine over loopback")  # fmt: skip
    p.add_argument("--no-references", action="store_true",
                   help="no single-caller reference cell before each N > 1 cell (faster; "
                   "predictions then all use the first N = 1 cell)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="results directory")
    p.set_defaults(func=cmd_contention)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed",
        description=(
            "Multi-node system-call delegation testbed: intercept chosen system calls of a "
            "program, forward them over ZeroMQ to a delegate on another node, measure the "
            "forwarding cost f_c call by call, and fit it into the paper's speedup model."
        ),
    )
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    sub.required = True

    # --- delegate -------------------------------------------------------
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
        help="ZeroMQ endpoint to bind, e.g. tcp://0.0.0.0:5555 or tcp://10.0.0.2:5555",
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
        "--service-us, unless TESTBED_ZMTP=0; libzmq otherwise (docs/wire.md)",
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
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no status line on start and no per-client accounting on exit",
    )
    p.set_defaults(func=cmd_delegate)

    # --- run ------------------------------------------------------------
    p = sub.add_parser(
        "run",
        help="run a program with chosen system calls forwarded to a delegate",
        description="Run PROGRAM with the chosen system calls intercepted and forwarded to the "
        "delegate; write a run directory and exit with the program's exit status.",
        epilog="examples:\n"
        "  testbed run --delegate tcp://10.0.0.2:5555 --forward read,write -- gzip -c big.tar\n"
        "  testbed run --delegate tcp://127.0.0.1:5555 --policy min-freq:20% "
        "--profile runs/profile-gzip -- gzip -c big.tar\n"
        "  testbed run --backend kmod --mode kthread --delay-us 20 --forward write "
        "-- dd if=in of=out\n"
        "The summary on stderr gives forwarded calls, p50/p99 of rtt and overhead, and\n"
        "f_c = overhead/2; per-call records are in RUNDIR/calls.bin (docs/rundir.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--delegate",
        type=connect_endpoint,
        metavar="ENDPOINT",
        help="delegate endpoint, e.g. tcp://10.0.0.2:5555 (required except with --mode kthread)",
    )
    sel = p.add_mutually_exclusive_group()
    sel.add_argument(
        "--forward",
        type=syscall_set,
        metavar="SYSCALLS",
        help="comma-separated names or numbers, e.g. read,write",
    )
    sel.add_argument(
        "--policy",
        metavar="POLICY",
        help="min-freq:K%%, max-freq:K%%, random:K%%[:SEED] or a list (needs --profile)",
    )
    p.add_argument("--profile", metavar="RUNDIR", help="native profile the policy chooses from")
    p.add_argument(
        "--mode",
        choices=("cost", "offload", "kthread"),
        default="cost",
        help="cost: acknowledge then run locally (default); offload: file I/O under "
        "--offload-path executes at the delegate (docs/offload.md); kthread: hand each call "
        "to the mktrace module's kernel thread on this node (--backend kmod, no --delegate; "
        "the paper's same-node baseline)",
    )
    p.add_argument(
        "--delay-us",
        type=non_negative_float,
        default=0.0,
        metavar="D",
        help="--mode kthread: the kernel thread spins D µs each way (default 0)",
    )
    p.add_argument(
        "--faithful",
        action="store_true",
        help="--mode kthread: as the original mktrace, the kernel thread borrows the "
        "caller's mm and flushes its CPU's TLB on both legs (default: the module's "
        "kthread_faithful parameter, off)",
    )
    p.add_argument(
        "--flush-caller-tlb",
        action="store_true",
        help="with --faithful: the caller also flushes its own CPU's TLB on both legs",
    )
    p.add_argument(
        "--offload-path",
        action="append",
        metavar="PREFIX",
        help="offload mode: paths at or under PREFIX (and fds opened from them) are executed "
        "beneath the delegate's --offload-root; repeatable",
    )
    p.add_argument(
        "--backend",
        choices=("seccomp", "kmod"),
        default="seccomp",
        help="interposition backend (default seccomp)",
    )
    p.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=2.0,
        metavar="SECONDS",
        help="per-call timeout before a call is released locally (default 2)",
    )
    p.add_argument(
        "--busy-poll",
        action="store_true",
        help="spin while a reply is due instead of sleeping: lower, steadier rtt "
        "(no idle wake-up of the CPU), at the cost of one busy core on this node",
    )
    p.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="CURVE-authenticate to a delegate started with --curve-keys "
        "(DIR holds server.key and client.key_secret, mode 0600: testbed keys new)",
    )
    p.add_argument(
        "--connect-timeout",
        type=timeout_seconds,
        default=3.0,
        metavar="SECONDS",
        help="give up if the delegate does not answer the handshake (default 3)",
    )
    p.add_argument(
        "--pin-program",
        type=cpu_list,
        metavar="CPUS",
        help="run the program on these CPUs (e.g. 0 or 0,2-3); pin the relay with taskset",
    )
    p.add_argument(
        "-o",
        "--output",
        type=new_dir,
        metavar="RUNDIR",
        help="run directory (default runs/run-TIME)",
    )
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    p.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="-- PROGRAM [ARGS...]",
        help="the program to run, unmodified, after --",
    )
    p.set_defaults(func=cmd_run)

    # --- profile --------------------------------------------------------
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
    p.add_argument("--quiet", action="store_true", help="no summary on stderr")
    p.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="-- PROGRAM [ARGS...]",
        help="the program to profile natively, after --",
    )
    p.set_defaults(func=cmd_profile)

    # --- bench ----------------------------------------------------------
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
        "--rounds",
        type=positive_int,
        metavar="R",
        help="interleaved rounds for --breakdown (default 5; --calls is split among them)",
    )
    p.set_defaults(func=cmd_bench)

    # --- model / analyze -----------------------------------------------
    p = sub.add_parser(
        "model",
        help="speedup projections from the naive and extended models",
        description="Project S_n / S_r from profiles (testbed profile -o RUNDIR; default: the "
        "profiles shipped in analysis/data/profiles) or the paper's Table I; print a table "
        "and optionally draw the paper's figures 2-9.",
    )
    p.add_argument(
        "--profile",
        action="append",
        metavar="RUNDIR",
        help="profile run directory (repeatable; default: the shipped profiles)",
    )
    p.add_argument(
        "--table1", action="store_true", help="also print the naive model for the paper's Table I"
    )
    p.add_argument(
        "--gamma",
        default="1,2,5,10,100",
        metavar="LIST",
        help="gains γ to tabulate (default 1,2,5,10,100)",
    )
    p.add_argument(
        "--fc",
        default="10us",
        metavar="TIME",
        help="forwarding cost f_c, e.g. 10us, 1.5ms, 40us (default 10us)",
    )
    p.add_argument(
        "--policy",
        default="min-freq:20%",
        metavar="POLICY",
        help="forwarded set: min-freq:K%%, max-freq:K%%, random:K%%[:SEED] or a list "
        "(default min-freq:20%%)",
    )
    p.add_argument("--plot", metavar="DIR", help="also write figures 2-9 (PNG+SVG) into DIR")
    p.set_defaults(func=cmd_model)
    p = sub.add_parser(
        "analyze",
        help="fit f_c, predicted vs measured, figures, one report",
        description="Analyse run directories: fit f_c, compare predicted and measured t_d, "
        "draw the figures and write one report.",
    )
    p.add_argument(
        "rundirs",
        nargs="+",
        metavar="RUNDIR",
        help="profile and delegated run directories, or directories holding them",
    )
    p.add_argument(
        "-o",
        "--output",
        type=new_dir,
        metavar="REPORTDIR",
        default="report",
        help="report directory (default ./report)",
    )
    p.add_argument(
        "--policy",
        default="min-freq:20%",
        metavar="POLICY",
        help="policy for the same-node vs remote S_r table (default min-freq:20%%)",
    )
    p.set_defaults(func=cmd_analyze)

    # --- demo -----------------------------------------------------------
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

    # --- keys -----------------------------------------------------------
    p = sub.add_parser(
        "keys",
        help="make ZeroMQ CURVE keys for delegates and relays",
        description="Make the CURVE key pairs of a delegate and its relays (docs/security.md).",
    )
    keys_sub = p.add_subparsers(dest="keys_action", metavar="ACTION")
    keys_sub.required = True
    q = keys_sub.add_parser(
        "new",
        help="create the missing keys in DIR (never overwrites one)",
        description="Create DIR (0700) with the delegate's key pair (server.key, "
        "server.key_secret) and relay key pairs whose public keys are authorized in "
        "DIR/authorized/. Secret files are 0600. Existing keys are kept, so it is safe to "
        "rerun with more relays.",
        epilog="examples:\n"
        "  testbed keys new keys    # one relay pair in keys/ itself: both sides on one machine\n"
        "  testbed keys new keys --relay node1 --relay node2   # keys/relays/node1/ ... per node\n"
        "then: testbed delegate --listen tcp://10.0.0.2:5555 --curve-keys keys\n"
        "      testbed run --delegate tcp://10.0.0.2:5555 --curve-keys keys/relays/node1 ...",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("directory", metavar="DIR", help="keys directory (created 0700)")
    q.add_argument(
        "--relay",
        action="append",
        metavar="NAME",
        help="a relay key pair in DIR/relays/NAME/ (repeatable, or comma-separated)",
    )
    p.set_defaults(func=cmd_keys)

    # --- lab / provision / experiment / vm ------------------------------
    p = sub.add_parser(
        "lab",
        help="local multi-node lab of network namespaces",
        description="Create, inspect or remove a lab of network-namespace nodes "
        "reachable over SSH (needs root).",
    )
    lab = p.add_subparsers(dest="lab_action", metavar="ACTION")
    lab.required = True
    lp = lab.add_parser("up", help="create N nodes, an sshd in each, and an inventory")
    lp.add_argument(
        "--nodes", type=positive_int, default=3, metavar="N", help="number of nodes (default 3)"
    )
    lp.add_argument(
        "--delegates",
        type=positive_int,
        default=1,
        metavar="K",
        help="the last K nodes form delegate_nodes (default 1)",
    )
    lp.add_argument(
        "--subnet",
        default="10.213.47.0/24",
        metavar="CIDR",
        help="private IPv4 network of the lab (default 10.213.47.0/24)",
    )
    for action, text in (
        ("status", "show the lab's nodes and their state"),
        ("down", "remove every namespace, process, bridge and file of the lab"),
    ):
        lab.add_parser(action, help=text)
    for lp in lab.choices.values():
        lp.add_argument(
            "--dir",
            metavar="DIR",
            help="lab directory (default $TESTBED_LAB_DIR or /run/testbed-lab)",
        )
    lab.choices["status"].add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_lab)
    p = sub.add_parser(
        "provision",
        help="provision nodes with Ansible",
        description="Run an Ansible playbook (default site.yml) via ansible-runner; "
        "stream progress and summarise per host.",
    )
    p.add_argument(
        "-i",
        "--inventory",
        required=True,
        metavar="INVENTORY",
        help="inventory file or directory (e.g. inventory/example or a lab's)",
    )
    p.add_argument(
        "playbook",
        nargs="?",
        default="site.yml",
        metavar="PLAYBOOK",
        help="site.yml (default), experiment.yml, teardown.yml or a path",
    )
    p.add_argument(
        "-e",
        "--extra-vars",
        action="append",
        metavar="VARS",
        help="KEY=VALUE, a JSON/YAML map or @FILE (repeatable)",
    )
    p.add_argument("-l", "--limit", metavar="PATTERN", help="only these hosts/groups")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more Ansible output")
    p.add_argument(
        "--keep-artifacts", action="store_true", help="keep ansible-runner's private data directory"
    )
    p.add_argument("--json", metavar="FILE", help="also write the per-host summary as JSON")
    p.set_defaults(func=cmd_provision)
    _add_contention(sub)
    p = sub.add_parser(
        "experiment",
        help="run an experiment matrix (resumable)",
        description="Run a plan of workloads x forwarded sets x delegates x "
        "repetitions on this machine, with progress; skips finished runs.",
    )
    p.add_argument("plan", metavar="PLAN", help="plan file (YAML or JSON)")
    p.add_argument(
        "-o",
        "--output",
        type=new_dir,
        metavar="RESULTS",
        help="results directory (default results/<plan name>)",
    )
    p.add_argument(
        "--host-label",
        metavar="NAME",
        help="subdirectory for this host's runs (default: the host name)",
    )
    p.add_argument(
        "--delegate",
        action="append",
        metavar="NAME=ENDPOINT",
        help="use these delegates instead of the plan's (repeatable)",
    )
    p.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="CURVE keys of this relay (server.key, client.key_secret) for every delegate "
        "that is not 'local'",
    )
    p.add_argument("--check", action="store_true", help="validate the plan and exit")
    p.add_argument("--json", action="store_true",
                   help="with --check: print the validated plan as JSON (versioned, host-stamped)")  # fmt: skip
    p.set_defaults(func=cmd_experiment)
    p = sub.add_parser(
        "gamma",
        help="the gain benchmark sweep (paper Figs. 12-13)",
        description="Run the gain benchmark natively and forwarded at each gain, interleaved, "
        "and write the report with Figs. 12-13 and the model accuracy table (docs/analysis.md).",
    )
    p.add_argument("--gammas", default="1,2,4,8,16", metavar="LIST",
                   help="gains, integers (default 1,2,4,8,16)")  # fmt: skip
    p.add_argument("--repetitions", type=positive_int, default=3, metavar="N",
                   help="repetitions of every cell (default 3)")  # fmt: skip
    p.add_argument("--phases", type=positive_int, default=10, metavar="P",
                   help="computation + syscall phases per run (default 10)")  # fmt: skip
    p.add_argument("--samples", type=positive_int, default=100_000_000, metavar="N",
                   help="Monte Carlo points per phase at γ = 1 (default 1e8, ~2.5 s in all)")  # fmt: skip
    p.add_argument("--forward", action="append", metavar="SET",
                   help="forwarded set or policy (repeatable; default min-freq:20%%, "
                   "max-freq:20%%, read,write)")  # fmt: skip
    p.add_argument("--backend", choices=("seccomp", "kmod"), default="seccomp",
                   help="interposition backend (default seccomp)")  # fmt: skip
    p.add_argument("--pin", action="store_true",
                   help="program, relay and delegate on separate CPUs (needs >= 2)")  # fmt: skip
    p.add_argument("--delegate", action="append", metavar="NAME=ENDPOINT",
                   help="forward to this delegate instead of a local one (repeatable)")  # fmt: skip
    p.add_argument("-o", "--output", default="results/gamma", metavar="RESULTS",
                   help="results directory (default results/gamma; resumable)")  # fmt: skip
    p.add_argument("--report", default="report-gamma", metavar="REPORTDIR",
                   help="report directory (default report-gamma; '' for none)")  # fmt: skip
    p.add_argument("--host-label", metavar="NAME", help="subdirectory for this host's runs")
    p.add_argument("--check", action="store_true", help="print the plan and exit")
    p.set_defaults(func=cmd_gamma)
    p = sub.add_parser(
        "vm",
        help="run a command in a QEMU guest with Debian's kernel",
        description="Boot Debian's kernel under QEMU (TCG) with the host root "
        "shared read-only and run a command in the guest (docs/vm.md).",
    )
    vm_sub = p.add_subparsers(dest="vm_action", metavar="ACTION")
    vm_sub.required = True
    q = vm_sub.add_parser(
        "run",
        help="boot, run COMMAND as root in the guest, power off",
        description="Boot a guest, run COMMAND (argv, or one quoted shell "
        "snippet), print its output and exit with its status (124 on timeout).",
    )
    q.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=600.0,
        metavar="S",
        help="kill the guest after S seconds (default 600)",
    )
    q.add_argument(
        "--share",
        metavar="DIR",
        help="host directory mounted read-write at /mnt/results in the guest",
    )
    q.add_argument(
        "--net", action="store_true", help="give the guest a NIC (QEMU user networking, restricted)"
    )
    q.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print boot-to-command and total time on stderr",
    )
    q.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    q2 = vm_sub.add_parser(
        "up",
        help="boot a guest with sshd and wait (Ctrl-C powers it off)",
        description="Boot a long-lived guest reachable over SSH on a "
        "loopback port and print the ssh command line.",
    )
    q2.add_argument(
        "--authorized-key",
        metavar="FILE",
        help="public key allowed to log in as root (default: a generated key pair)",
    )
    q2.add_argument(
        "--share",
        metavar="DIR",
        help="host directory mounted read-write at /mnt/results in the guest",
    )
    q3 = vm_sub.add_parser(
        "check",
        help="find (or --install) QEMU, kernel, headers, busybox",
        description="Show the kernel, QEMU and busybox the harness uses and build the initramfs.",
    )
    q3.add_argument(
        "--install", action="store_true", help="apt-get install missing packages (root)"
    )
    q4 = vm_sub.add_parser(
        "experiment",
        help="run experiment plans in the guest with the mktrace module loaded",
        description="Boot a guest, load the mktrace module and run each PLAN with "
        "testbed experiment; results come back as run directories in DIR/<plan>/. "
        "Delegates: kthread, local (the guest's loopback) and tcp://10.0.2.100:PORT, "
        "a delegate started on this host's 127.0.0.1 (docs/vm.md).",
    )
    q4.add_argument("plans", nargs="+", metavar="PLAN", help="experiment plan (YAML or JSON)")
    q4.add_argument(
        "-o", "--output", default="results/vm", metavar="DIR",
        help="results folder on the host (default results/vm)",
    )  # fmt: skip
    q4.add_argument(
        "--module", metavar="KO",
        help="mktrace.ko built for the guest kernel (default: build kmod/ now)",
    )  # fmt: skip
    q4.add_argument(
        "--timeout", type=timeout_seconds, default=3600.0, metavar="S",
        help="kill the guest after S seconds (default 3600)",
    )  # fmt: skip
    for q in (vm_sub.choices["run"], q2, q4):
        q.add_argument("--memory", default="2G", metavar="M", help="guest memory (default 2G)")
        q.add_argument(
            "--cpus", type=positive_int, default=2, metavar="N", help="guest CPUs (default 2)"
        )
    p.set_defaults(func=cmd_vm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TestbedError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
