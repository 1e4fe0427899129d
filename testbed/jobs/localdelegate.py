"""A delegate subprocess on this node (loopback TCP, a Unix socket or shared memory), and
the HELLO probe that finds it ready.

Used wherever the testbed needs a delegate of its own for a while: ``testbed
demo``, ``bench``, ``breakdown``, ``experiment`` (a plan's ``local``
delegate), benchmarks and tests.  The delegate is always stopped on leaving
the ``with`` block, also when it never became ready.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.compute.relay import connect
from testbed.core.errors import TestbedError
from testbed.core.procs import free_port, pinner, testbed_env

#: How long a new delegate may take to answer (Python under QEMU TCG starts slowly).
READY_TIMEOUT_S = 120.0


def ping(endpoint: str, timeout_s: float = 5.0, curve_keys: str | None = None) -> dict[str, Any]:
    """HELLO -> WELCOME with the delegate at ``endpoint``; its WELCOME map or a TestbedError."""

    ctx, sock, welcome = connect(
        endpoint, timeout_s=timeout_s, info={"role": "experiment"}, curve_keys=curve_keys
    )
    sock.close(0)
    return welcome


def wait_ready(
    proc: subprocess.Popen,
    endpoint: str,
    timeout_s: float = READY_TIMEOUT_S,
    curve_keys: str | None = None,
) -> None:
    """Wait until the delegate ``proc`` answers at ``endpoint``; a TestbedError if it
    exits or stays silent for ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise TestbedError(f"delegate at {endpoint} exited with status {proc.returncode}")
        try:
            ping(endpoint, timeout_s=0.5, curve_keys=curve_keys)
            return
        except TestbedError:
            if time.monotonic() > deadline:
                raise TestbedError(f"delegate at {endpoint} did not answer") from None


class LocalDelegate:
    """``testbed delegate`` on this node for the duration of a ``with`` block.

    ``scheme`` is its transport: ``tcp`` (a free loopback port, the default),
    ``ipc`` (a Unix socket) or ``shm`` (shared-memory rings, rendezvous on a
    Unix socket), the socket in a private folder removed on exit.  ``extra``
    adds delegate options; ``curve_keys`` is the key folder the readiness
    probe uses (when ``extra`` turns CURVE on); ``offload_root`` serves
    offload mode beneath that folder (created); ``cpus`` pins it.
    """

    SCHEMES = ("tcp", "ipc", "shm")

    def __init__(
        self,
        extra: list[str] | None = None,
        curve_keys: str | None = None,
        *,
        offload_root: Path | None = None,
        cpus: frozenset[int] | None = None,
        scheme: str = "tcp",
    ) -> None:
        if scheme not in self.SCHEMES:
            raise TestbedError(f"a local delegate's transport is tcp, ipc or shm, not {scheme!r}")
        self.sockdir = None if scheme == "tcp" else tempfile.mkdtemp(prefix="testbed-delegate-")
        self.endpoint = (
            f"tcp://127.0.0.1:{free_port()}" if scheme == "tcp"
            else f"{scheme}://{self.sockdir}/delegate.sock"
        )  # fmt: skip
        self.extra = list(extra or [])
        self.curve_keys = curve_keys
        self.offload_root = offload_root
        self.cpus = cpus
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalDelegate:
        cmd = [sys.executable, "-m", "testbed", "delegate", "--quiet", "--listen", self.endpoint]
        if self.offload_root is not None:
            self.offload_root.mkdir(parents=True, exist_ok=True)
            cmd += ["--offload-root", str(self.offload_root)]
        self.proc = subprocess.Popen([*cmd, *self.extra], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, preexec_fn=pinner(self.cpus),
                                     env=testbed_env())  # fmt: skip
        try:
            wait_ready(self.proc, self.endpoint, curve_keys=self.curve_keys)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.sockdir is not None:
            shutil.rmtree(self.sockdir, ignore_errors=True)
