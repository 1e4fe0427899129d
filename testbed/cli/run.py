"""``testbed run``: run a program with chosen system calls forwarded to a delegate."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from testbed.cli.options import (
    Subparsers,
    add_delegate_client,
    add_program,
    add_quiet,
    byte_size,
    connect_endpoint,
    cpu_list,
    new_dir,
    non_negative_float,
    syscall_set,
    timeout_seconds,
)
from testbed.core.procs import program_argv

if TYPE_CHECKING:
    from testbed.compute.run import RunResult
    from testbed.compute.spec import RunSpec


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The run the options ask for: the one place mapping them to a :class:`RunSpec`."""
    from testbed.compute.spec import (  # lazy: only when this verb runs
        KthreadSpec,
        OffloadSpec,
        RunSpec,
    )

    return RunSpec(
        tuple(program_argv(args.program)),
        mode=args.mode,
        backend=args.backend,
        delegate=args.delegate,
        forward=args.forward,
        policy=args.policy,
        profile=args.profile,
        output=args.output,
        timeout_s=args.timeout,
        connect_timeout_s=args.connect_timeout,
        busy_poll=args.busy_poll,
        curve_keys=args.curve_keys,
        pin_program=args.pin_program,
        kthread=KthreadSpec(args.delay_us, args.faithful, args.flush_caller_tlb),
        offload=OffloadSpec(
            tuple(args.offload_path or ()), args.offload_write_behind, args.offload_read_ahead
        ),
        stage_trace=args.stage_trace,
    )


def run_from_args(args: argparse.Namespace) -> RunResult:
    """Run what the options ask for (:func:`testbed.compute.run.run`)."""
    from testbed.compute.run import run  # lazy: only when this verb runs

    return run(spec_from_args(args))


def cmd_run(args: argparse.Namespace) -> int:
    from testbed.compute.run import summary_lines  # lazy: only when this verb runs

    result = run_from_args(args)
    if not args.quiet:
        for line in summary_lines(result):
            print(line, file=sys.stderr)
    return result.exit_status


def add_parser(sub: Subparsers) -> None:
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
        "--offload-write-behind",
        type=byte_size,
        default=0,
        metavar="BYTES",
        help="offload mode: answer writes at once and send them behind, up to BYTES in flight "
        "(e.g. 4M; 0, the default: every write waits for the delegate); an error they meet is "
        "returned by the fd's next call, fsync or close (docs/offload.md)",
    )
    p.add_argument(
        "--offload-read-ahead",
        type=int,
        default=0,
        metavar="N",
        help="offload mode: once a program reads an offloaded file sequentially (two reads of "
        "one size in a row), keep up to N (1-8) further reads of that size in flight and answer "
        "its reads from them; any other call on the delegate first gives back what was not "
        "used (0, the default: every read waits for the delegate; docs/offload.md)",
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
    add_delegate_client(p)
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
    add_quiet(p, "no summary on stderr")
    p.add_argument(  # testbed bench --breakdown (RunSpec.stage_trace); not in --help
        "--stage-trace", metavar="FILE", help=argparse.SUPPRESS
    )
    add_program(p, "the program to run, unmodified, after --")
    p.set_defaults(func=cmd_run)
