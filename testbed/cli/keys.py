"""``testbed keys new DIR [--relay NAME]...``: CURVE keys for a delegate and its relays."""

from __future__ import annotations

import argparse

from testbed.cli.options import Subparsers, add_actions


def cmd_keys(args: argparse.Namespace) -> int:
    from testbed.core.keys import generate  # lazy: pyzmq (13 ms), this verb only

    relays = [n for item in (args.relay or []) for n in item.split(",") if n]
    lines = generate(args.directory, relays)
    for line in lines:
        print(line)
    if not lines:
        print(f"{args.directory}: every key exists, nothing to do")
    return 0


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "keys",
        help="make ZeroMQ CURVE keys for delegates and relays",
        description="Make the CURVE key pairs of a delegate and its relays (docs/security.md).",
    )
    keys_sub = add_actions(p, "keys_action")
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
