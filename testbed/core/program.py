"""The program under test, seen from the process that started it.

Its exit status as ``testbed run`` and ``testbed profile`` report it, and the
signals passed on to it while it runs.  No I/O beyond the process itself.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable


def exit_status(wait_status: int | None) -> int:
    """A wait status as a shell reports it: the exit code, 128 + N if killed by signal N.

    ``None`` (the program was never waited for: the run failed) is 1.
    """
    if wait_status is None:
        return 1
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def forward_signals(pid: int) -> Callable[[], None]:
    """Pass SIGINT/SIGTERM on to ``pid`` while it runs; return the function that undoes it.

    Main thread only (``signal.signal``).
    """
    old = {}

    def handler(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    return restore
