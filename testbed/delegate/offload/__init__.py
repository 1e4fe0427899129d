"""I/O offload: the delegate executes a program's file I/O beneath a root.

Delegate side: :mod:`~testbed.delegate.offload.sandbox` (confined path resolution),
:mod:`~testbed.delegate.offload.fdtable` (per-client remote fds and limits),
:mod:`~testbed.delegate.offload.execute` (one executor per system call).  Relay side:
:mod:`~testbed.compute.offload` (path matching, placeholder fds, marshalling
and write-back).  :mod:`~testbed.core.offload_calls` is the table both share.
Documented in ``docs/offload.md``.
"""

from __future__ import annotations

import os
from typing import Any

from testbed.core.errors import TestbedError
from testbed.core.keys import is_loopback
from testbed.delegate.offload.execute import Executor


def make_executor(root: str, **limits: Any) -> Executor:
    """The delegate's executor for ``--offload-root DIR``."""
    if not os.path.isdir(root):
        raise TestbedError(f"offload root {root!r} is not a directory")
    return Executor(root, **limits)


def check_offload_options(
    listen: str,
    *,
    root: str | None = None,
    max_fds: int | None = None,
    idle_timeout_s: float | None = None,
    insecure: bool = False,
    curve_keys: str | None = None,
) -> None:
    """``testbed delegate --offload-root``: refuse an unauthenticated network listener.

    The limits and ``insecure`` are only for offload mode (a ``root``).
    """
    if not root:
        for flag, value in (
            ("--offload-max-fds", max_fds),
            ("--offload-idle-timeout", idle_timeout_s),
            ("--insecure", insecure),
        ):
            if value:
                raise TestbedError(f"{flag} is only used with --offload-root")
        return
    if not is_loopback(listen) and not curve_keys and not insecure:
        raise TestbedError(
            f"offload mode listening on {listen} (beyond loopback) executes file I/O for "
            "whoever connects: give --curve-keys DIR, or --insecure to accept that"
        )


def offload_executor(
    listen: str,
    *,
    root: str | None = None,
    max_fds: int | None = None,
    idle_timeout_s: float | None = None,
    insecure: bool = False,
    curve_keys: str | None = None,
) -> Executor | None:
    """The executor of a delegate on ``listen`` with offload ``root`` (None without one)."""
    check_offload_options(
        listen,
        root=root,
        max_fds=max_fds,
        idle_timeout_s=idle_timeout_s,
        insecure=insecure,
        curve_keys=curve_keys,
    )
    if not root:
        return None
    limits: dict[str, Any] = {}
    if max_fds:
        limits["max_fds"] = max_fds
    if idle_timeout_s:
        limits["idle_s"] = idle_timeout_s
    return make_executor(root, **limits)


__all__ = ["Executor", "check_offload_options", "make_executor", "offload_executor"]
