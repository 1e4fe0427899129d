"""I/O offload: the delegate executes a program's file I/O beneath a root.

Delegate side: :mod:`~testbed.offload.sandbox` (confined path resolution),
:mod:`~testbed.offload.fdtable` (per-client remote fds and limits),
:mod:`~testbed.offload.execute` (one executor per system call).  Relay side:
:mod:`~testbed.offload.client` (path matching, placeholder fds, marshalling
and write-back).  :mod:`~testbed.offload.calls` is the table both share.
Documented in ``docs/offload.md``.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from testbed.errors import TestbedError
from testbed.offload.execute import Executor


def make_executor(root: str, **limits: Any) -> Executor:
    """The delegate's executor for ``--offload-root DIR``."""
    if not os.path.isdir(root):
        raise TestbedError(f"offload root {root!r} is not a directory")
    return Executor(root, **limits)


def is_loopback(endpoint: str) -> bool:
    """True if a ZeroMQ endpoint is only reachable from this host."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: assume reachable


def check_delegate_args(args: Any) -> None:
    """``testbed delegate --offload-root``: refuse an unauthenticated network listener."""
    if not getattr(args, "offload_root", None):
        for opt in ("offload_user", "offload_max_fds"):
            if getattr(args, opt, None):
                flag = "--" + opt.replace("_", "-")
                raise TestbedError(f"{flag} is only used with --offload-root")
        return
    if not is_loopback(args.listen) and not args.curve_keys and not args.insecure:
        raise TestbedError(
            f"offload mode listening on {args.listen} (beyond loopback) executes file I/O for "
            "whoever connects: give --curve-keys DIR, or --insecure to accept that"
        )


def executor_from_args(args: Any) -> Executor | None:
    """The executor ``testbed delegate`` options ask for (None without --offload-root)."""
    check_delegate_args(args)
    if not getattr(args, "offload_root", None):
        return None
    limits = {}
    if getattr(args, "offload_max_fds", None):
        limits["max_fds"] = args.offload_max_fds
    return make_executor(args.offload_root, **limits)


def drop_privileges(user: str | None) -> None:
    """Become ``user`` (name or uid) for good: groups, gid, then uid."""
    if not user:
        return
    import pwd

    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, ValueError):
        raise TestbedError(f"--offload-user {user!r}: no such user") from None
    try:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except PermissionError:
        raise TestbedError(f"--offload-user {user!r}: cannot switch user (not root?)") from None


__all__ = ["Executor", "make_executor", "executor_from_args", "drop_privileges", "is_loopback"]
