"""``testbed gainbench``: the gain benchmark sweep and its report (paper Figs. 12-13).

``testbed gamma`` (the verb's old name) still runs it: :data:`HIDDEN_ALIASES`,
resolved by :func:`testbed.cli.main`, not listed in ``--help``.
"""

from __future__ import annotations

import argparse

from testbed.cli.options import Subparsers, positive_int

#: Old verb names still accepted, not in ``--help``: old name -> verb.
HIDDEN_ALIASES = {"gamma": "gainbench"}


def cmd_gainbench(args: argparse.Namespace) -> int:
    from testbed.jobs.gainbench import parse_gammas  # lazy: the jobs, once the verb runs
    from testbed.jobs.gainbench_sweep import main_gainbench  # lazy: the jobs, once the verb runs

    return main_gainbench(
        parse_gammas(args.gammas),
        repetitions=args.repetitions,
        phases=args.phases,
        samples=args.samples,
        forward=args.forward,
        backend=args.backend,
        pin=args.pin,
        delegates=args.delegate,
        output=args.output,
        report=args.report,
        host_label=args.host_label,
        check=args.check,
    )


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "gainbench",
        help="the gain benchmark sweep (paper Figs. 12-13)",
        description="Run the gain benchmark (gainbench) natively and forwarded at each gain γ, "
        "interleaved, and write the report with Figs. 12-13 and the model accuracy table "
        "(docs/analysis.md). `testbed gamma` is the same command under its old name.",
    )
    p.add_argument("--gammas", default="1,2,4,8,16", metavar="LIST",
                   help="gains γ, integers (default 1,2,4,8,16)")  # fmt: skip
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
    p.set_defaults(func=cmd_gainbench)
