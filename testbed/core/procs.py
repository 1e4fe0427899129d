"""Small process helpers shared by the runtime and the drivers.

One home for: the program argv after ``--``, a free loopback port, the environment that makes a
``python -m testbed`` child import this checkout, CPU pinning of a child and
``wait4`` with a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from testbed.core.errors import TestbedError

PROJECT_DIR = Path(__file__).resolve().parents[2]


def program_argv(argv: Sequence[str] | None, example: str = "-- gzip -k FILE") -> list[str]:
    """The program to run: ``argv`` without a leading ``--``; an error when it is empty."""
    prog = list(argv or [])
    if prog and prog[0] == "--":
        prog = prog[1:]
    if not prog:
        raise TestbedError(f"no program given (put it after --, e.g. {example})")
    return prog


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the kernel picked it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def testbed_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for ``python -m testbed`` children run in another cwd: this checkout."""
    env = dict(os.environ if base is None else base)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(PROJECT_DIR) + (os.pathsep + old if old else "")
    return env


def pinner(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the new process (all its future threads) to ``cpus``."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def wait4(pid: int, timeout_s: float) -> tuple[int, int, Any]:
    """``os.wait4`` (status and rusage of the child), killing it after ``timeout_s``.

    Raises ``subprocess.TimeoutExpired`` when the deadline fired.
    """
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        result = os.wait4(pid, 0)
    finally:
        timer.cancel()
    if fired.is_set():
        raise subprocess.TimeoutExpired(str(pid), timeout_s)
    return result
