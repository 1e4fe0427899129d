"""``testbed`` command line: one module per verb group, the only place that sees argparse.

Each verb module (``testbed.cli.delegate``, ``testbed.cli.run``, ...) has
``add_parser(sub)``, which adds its verb (and subverbs) to the parser, and a
``cmd_<verb>`` that turns the parsed arguments into a call of the module that
does the job (``testbed.compute.run.run``, ``testbed.jobs.profile.profile``,
``testbed.jobs.bench.bench``, ``testbed.jobs.demo.demo``, ... imported lazily
so ``--help`` is fast and ``testbed`` never imports ``analysis`` unless asked
to) and prints what it returns.  Shared option types and option builders are
in :mod:`testbed.cli.options`.  User errors (:class:`testbed.core.errors.TestbedError`)
are printed as one line ``testbed: error: ...`` with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from testbed.cli import gainbench
from testbed.core.errors import TestbedError

#: Verb -> its module under ``testbed.cli``, in the order of ``testbed --help``.
VERBS = {
    "delegate": "delegate",
    "run": "run",
    "profile": "profile",
    "catalogue": "catalogue",
    "bench": "bench",
    "replay": "replay",
    "model": "analyze",
    "analyze": "analyze",
    "demo": "demo",
    "keys": "keys",
    "lab": "lab",
    "provision": "provision",
    "contention": "contention",
    "experiment": "experiment",
    "gainbench": "gainbench",
    "vm": "vm",
    "kmod": "kmod",
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser of every verb, or of ``verb`` alone (what ``main`` parses a verb with:
    its module is the only one imported, which keeps ``testbed run`` starting fast)."""
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
    names = dict.fromkeys(VERBS.values()) if verb not in VERBS else (VERBS[verb],)
    for name in names:
        importlib.import_module(f"testbed.cli.{name}").add_parser(sub)
    return parser


#: Old verb names still accepted (not in ``--help``): old name -> verb.
HIDDEN_ALIASES = {**gainbench.HIDDEN_ALIASES}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in HIDDEN_ALIASES:
        argv[0] = HIDDEN_ALIASES[argv[0]]
    args = build_parser(argv[0] if argv else None).parse_args(argv)
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
