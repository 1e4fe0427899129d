"""Shared argparse helpers of the verb modules: option types and option builders.

An option type turns the text of one option into its value or raises
:class:`argparse.ArgumentTypeError`, so a bad value is reported by argparse
(usage line, ``testbed VERB: error: argument --OPT: ...``, exit status 2)
before any job starts.  The imports they need are made lazily so that
``testbed --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
import os

from testbed.core.cpus import parse_cpus
from testbed.core.errors import TestbedError
from testbed.core.syscalls import parse_set

#: What ``add_parser(sub)`` of a verb module receives: ``build_parser``'s subparsers.
Subparsers = argparse._SubParsersAction

#: Longest timeout (s) and injected delay (us) the options accept.
MAX_SECONDS = 24 * 3600.0
MAX_DELAY_US = 10e6

# ---------------------------------------------------------------- option types


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


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def byte_size(text: str) -> int:
    """A byte count >= 0: ``65536``, ``64K``, ``4M``, ``1G`` (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in "KMG" else ""
    try:
        value = int(t[: len(t) - len(unit)]) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte count (e.g. 65536, 64K, 4M)"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def cpu_list(text: str) -> frozenset[int]:
    """A CPU list such as 0,2-3 of CPUs this machine has."""

    try:
        cpus = parse_cpus(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if max(cpus) >= (os.cpu_count() or 1):
        raise argparse.ArgumentTypeError(f"CPUs {text!r}: this machine has {os.cpu_count()}")
    return cpus


def timeout_seconds(text: str) -> float:
    """A finite timeout > 0 s (0 would make every forwarded call a fault)."""
    value = finite_float(text)
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
    from testbed.core.keys import EndpointError, parse_endpoint  # lazy: pyzmq, endpoints only

    try:
        return parse_endpoint(text)
    except EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def connect_endpoint(text: str) -> str:
    """An endpoint to connect to: as :func:`endpoint`, and a TCP port is 1-65535."""
    from testbed.core.keys import EndpointError, parse_endpoint  # lazy: pyzmq, endpoints only

    try:
        return parse_endpoint(text, connect=True)
    except EndpointError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def syscall_set(text: str) -> frozenset[int]:
    try:
        return parse_set(text)
    except TestbedError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------- option builders


def add_program(parser: argparse.ArgumentParser, text: str) -> None:
    """The program to run, everything after ``--`` (``testbed run``, ``testbed profile``)."""
    parser.add_argument(
        "program",
        nargs=argparse.REMAINDER,
        metavar="-- PROGRAM [ARGS...]",
        help=text,
    )


def add_delegate_client(parser: argparse.ArgumentParser) -> None:
    """``--curve-keys`` and ``--connect-timeout``: how a client of a delegate (``testbed
    run``, ``testbed replay``) reaches it."""
    parser.add_argument(
        "--curve-keys",
        metavar="DIR",
        help="CURVE-authenticate to a delegate started with --curve-keys "
        "(DIR holds server.key and client.key_secret, mode 0600: testbed keys new)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=timeout_seconds,
        default=3.0,
        metavar="SECONDS",
        help="give up if the delegate does not answer the handshake (default 3)",
    )


def add_quiet(parser: argparse.ArgumentParser, text: str) -> None:
    """``--quiet``: no status or summary lines on stderr."""
    parser.add_argument("--quiet", action="store_true", help=text)


def add_actions(parser: argparse.ArgumentParser, dest: str) -> Subparsers:
    """The required ``ACTION`` subcommands of a verb (``testbed lab up``, ``testbed keys new``)."""
    actions = parser.add_subparsers(dest=dest, metavar="ACTION")
    actions.required = True
    return actions


def add_guest_size(parser: argparse.ArgumentParser) -> None:
    """``--memory`` and ``--cpus`` of a QEMU guest (``testbed vm run|up|experiment``)."""
    parser.add_argument("--memory", default="2G", metavar="M", help="guest memory (default 2G)")
    parser.add_argument(
        "--cpus", type=positive_int, default=2, metavar="N", help="guest CPUs (default 2)"
    )
