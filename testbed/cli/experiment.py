"""``testbed experiment PLAN``: an experiment matrix, resumable, with progress."""

from __future__ import annotations

import argparse

from testbed.cli.options import Subparsers, new_dir


def cmd_experiment(args: argparse.Namespace) -> int:
    from testbed.jobs.experiment import main_experiment  # lazy: only when this verb runs

    return main_experiment(
        args.plan,
        output=args.output,
        host_label=args.host_label,
        delegates=args.delegate,
        curve_keys=args.curve_keys,
        check=args.check,
        as_json=args.json,
        policies=args.policies,
        resolve_policies_only=args.resolve_policies,
    )


def add_parser(sub: Subparsers) -> None:
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
    p.add_argument(
        "--resolve-policies",
        action="store_true",
        help="only profile the workloads here and resolve the plan's policies once, into "
        "RESULTS/policies.json (Ansible runs this on the controller), then exit",
    )
    p.add_argument(
        "--policies",
        metavar="FILE",
        help="forward the syscall sets of this policies.json (from --resolve-policies) "
        "instead of resolving the plan's policies on this machine",
    )
    p.add_argument("--check", action="store_true", help="validate the plan and exit")
    p.add_argument("--json", action="store_true",
                   help="with --check: print the validated plan as JSON (versioned, host-stamped)")  # fmt: skip
    p.set_defaults(func=cmd_experiment)
