"""I/O offload: the delegate executes a program's file I/O beneath a root.

Delegate side: :mod:`~testbed.offload.sandbox` (confined path resolution),
:mod:`~testbed.offload.fdtable` (per-client remote fds and limits),
:mod:`~testbed.offload.execute` (one executor per system call).  Relay side:
:mod:`~testbed.offload.client` (path matching, placeholder fds, marshalling
and write-back).  :mod:`~testbed.offload.calls` is the table both share.
Documented in ``docs/offload.md``.
"""

from __future__ import annotations

import os
from typing import Any

from testbed.errors import TestbedError
from testbed.keys import is_loopback
from testbed.offload.execute import Executor


def make_executor(root: str, **limits: Any) -> Executor:
    """The delegate's executor for ``--offload-root DIR``."""
    if not os.path.isdir(root):
        raise TestbedError(f"offload root {root!r} is not a directory")
    return Executor(root, **limits)


def check_delegate_args(args: Any) -> None:
    """``testbed delegate --offload-root``: refuse an unauthenticated network listener."""
    if not getattr(args, "offload_root", None):
        for opt in ("offload_max_fds", "offload_idle_timeout", "insecure"):
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
    if getattr(args, "offload_idle_timeout", None):
        limits["idle_s"] = args.offload_idle_timeout
    return make_executor(args.offload_root, **limits)


__all__ = ["Executor", "make_executor", "executor_from_args"]
