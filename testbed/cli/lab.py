"""``testbed lab up|status|down``: a local lab of network-namespace nodes (docs/provisioning.md)."""

from __future__ import annotations

import argparse

from testbed.cli.options import Subparsers, add_actions, non_negative_int, positive_int


def cmd_lab(args: argparse.Namespace) -> int:
    from testbed.cluster.lab import main_lab  # lazy: only when this verb runs

    if args.lab_action == "up":
        return main_lab(
            "up",
            directory=args.dir,
            nodes=args.nodes,
            subnet=args.subnet,
            delegates=args.delegates,
            vm_nodes=args.vm_nodes,
            link_rate=args.link_rate,
        )
    return main_lab(
        args.lab_action, directory=args.dir, as_json=args.lab_action == "status" and args.json
    )


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "lab",
        help="local multi-node lab of network namespaces (and QEMU guests)",
        description="Create, inspect or remove a lab of network-namespace nodes "
        "(and, with --vm-nodes, QEMU guests) reachable over SSH (needs root).",
    )
    lab = add_actions(p, "lab_action")
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
        "--vm-nodes",
        type=non_negative_int,
        default=0,
        metavar="K",
        help="the first K nodes are QEMU guests (Debian kernel, systemd, sshd) on the "
        "lab's bridge instead of namespaces (default 0; docs/provisioning.md)",
    )
    lp.add_argument(
        "--link-rate",
        metavar="RATE",
        help="cap what every namespace node sends on its link at RATE with a token bucket "
        "(tc tbf), e.g. 100mbit or 1gbit: what if the network were this slow "
        "(docs/whatif.md; not with --vm-nodes)",
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
