"""``testbed provision -i INVENTORY [PLAYBOOK]``: Ansible via ansible-runner (docs/provisioning.md)."""

from __future__ import annotations

import argparse

from testbed.cli.options import Subparsers


def cmd_provision(args: argparse.Namespace) -> int:
    from testbed.cluster.provision import main_provision  # lazy: only when this verb runs

    return main_provision(
        args.inventory,
        args.playbook,
        extra_vars=args.extra_vars,
        limit=args.limit,
        verbose=args.verbose,
        keep_artifacts=args.keep_artifacts,
        json_path=args.json,
    )


def add_parser(sub: Subparsers) -> None:
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
