"""I/O offload: the delegate executes a program's file I/O beneath a root.

Delegate side: :mod:`~testbed.offload.sandbox` (confined path resolution),
:mod:`~testbed.offload.fdtable` (per-client remote fds and limits),
:mod:`~testbed.offload.execute` (one executor per system call).  Relay side:
:mod:`~testbed.offload.client` (path matching, placeholder fds, marshalling
and write-back).  :mod:`~testbed.offload.calls` is the table both share.
Documented in ``docs/offload.md``.
"""

from __future__ import annotations

from testbed.offload.execute import Executor


def make_executor(root: str, **limits: float) -> Executor:
    """The delegate's executor for ``--offload-root DIR``."""
    return Executor(root, **limits)  # type: ignore[arg-type]


__all__ = ["Executor", "make_executor"]
