"""Orphan guard: kill a seccomp run's descendants when its relay dies.

The launcher's parent-death signal kills the program with its relay, but
``fork`` does not inherit it.  Each run therefore gets its own cgroup v2
directory (a child ``testbed-run-<relaypid>-<n>`` of the relay's cgroup); the
launcher joins it before installing the filter, so every descendant is in it.

A sentinel process, started fresh (``python3 -I -S -c``, no fork of the relay,
which runs ZeroMQ threads) in its own session, holds the read end of a pipe
whose write end only the relay holds (close-on-exec, never passed on).  On
end-of-file it writes ``1`` to ``cgroup.kill`` unless the relay first sent the
one-byte "clean" message; then it waits until the cgroup is empty and removes
it.  After a clean exit descendants that outlive the program are left alone
(as before, their forwarded calls fail with ENOSYS); the sentinel waits for them
(at most ``CLEAN_WAIT_S``) before removing the directory.

Where cgroup v2 is not writable (not root, no cgroup2 mount, kernel < 5.14
without ``cgroup.kill``) the guard reports ``pdeathsig-only``.
"""

from __future__ import annotations

import itertools
import os
import select
import subprocess
import sys

CLEAN = b"c"
KILL_WAIT_S = 10.0
CLEAN_WAIT_S = 86400.0
READY_S = 10.0
_counter = itertools.count()
_sentinels: list[subprocess.Popen] = []  # reaped when the next guard starts

SENTINEL = r"""
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
    signal.signal(s, signal.SIG_IGN)
cg, fd, kill_wait, clean_wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
os.write(1, b"r")  # ready: the relay starts the program only now (no start-up overlap)
os.close(1)
data = b""
while True:
    try:
        b = os.read(fd, 1)
    except InterruptedError:
        continue
    if not b:
        break
    data += b
clean = b"c" in data
if not clean:
    try:
        with open(cg + "/cgroup.kill", "w") as f:
            f.write("1")
    except OSError:
        pass
deadline = time.monotonic() + (clean_wait if clean else kill_wait)
while time.monotonic() < deadline:
    try:
        with open(cg + "/cgroup.procs") as f:
            if not f.read().strip():
                break
    except OSError:
        break
    time.sleep(0.02 if not clean else 0.2)
try:
    os.rmdir(cg)
except OSError:
    pass
"""


def _cgroup2_mount() -> str | None:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    return parts[1]
    except OSError:
        pass
    return None


def cgroup_of(pid: int | str) -> str | None:
    """The cgroup v2 path of ``pid`` or ``"self"`` (relative to the mount), None if unknown."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


class OrphanGuard:
    """One run's cgroup and its sentinel (see module docstring)."""

    def __init__(self) -> None:
        self.mode = "pdeathsig-only"
        self.path: str | None = None  # absolute directory of the run's cgroup
        self.rel: str | None = None  # the same, relative to the cgroup2 mount
        self.reason = ""
        self._w = -1
        self._sentinel: subprocess.Popen | None = None
        self._setup()

    def _setup(self) -> None:
        _sentinels[:] = [p for p in _sentinels if p.poll() is None]
        mount, own = _cgroup2_mount(), cgroup_of("self")
        if mount is None or own is None:
            self.reason = "no cgroup v2 mount"
            return
        rel = f"{own.rstrip('/')}/testbed-run-{os.getpid()}-{next(_counter)}"
        path = mount.rstrip("/") + rel
        try:
            os.mkdir(path, 0o755)
        except OSError as exc:
            self.reason = f"cannot create a cgroup under {os.path.dirname(path)}: {exc.strerror}"
            return
        if not os.path.exists(f"{path}/cgroup.kill"):
            os.rmdir(path)
            self.reason = "no cgroup.kill (Linux < 5.14)"
            return
        r, w = os.pipe()  # both close-on-exec: only the sentinel gets r, by pass_fds
        try:
            self._sentinel = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", SENTINEL, path, str(r), str(KILL_WAIT_S),
                 str(CLEAN_WAIT_S)],
                pass_fds=(r,), start_new_session=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            ready = select.select([self._sentinel.stdout], [], [], READY_S)[0]
            ok = bool(ready) and os.read(self._sentinel.stdout.fileno(), 1) == b"r"
            self._sentinel.stdout.close()
            if not ok:
                raise OSError(0, f"not ready within {READY_S} s")
        except OSError as exc:
            os.close(w)  # a started sentinel reads EOF, kills nothing and removes the cgroup
            if self._sentinel is None:
                os.rmdir(path)
            else:
                _sentinels.append(self._sentinel)
                self._sentinel = None
            self.reason = f"cannot start the sentinel: {exc.strerror}"
            return
        finally:
            os.close(r)
        self._w = w
        self.path, self.rel, self.mode = path, rel, "cgroup"

    def demote(self, reason: str) -> None:
        """The launcher did not join the cgroup: fall back to pdeathsig-only."""
        self.reason = reason
        self.mode = "pdeathsig-only"
        self.close(clean=True)

    def warning(self) -> str | None:
        if self.mode == "cgroup":
            return None
        return (f"testbed: warning: descendants of the program are not killed if the relay "
                f"dies ({self.reason}); orphan_guard: pdeathsig-only")  # fmt: skip

    def kill(self) -> None:
        """Kill every process in the run's cgroup now."""
        if self.mode == "cgroup" and self.path:
            try:
                with open(f"{self.path}/cgroup.kill", "w") as f:
                    f.write("1")
            except OSError:
                pass

    def close(self, clean: bool) -> None:
        """Hand the cgroup to the sentinel: kill what is left unless ``clean``."""
        if self._w >= 0:
            if clean:
                try:
                    os.write(self._w, CLEAN)
                except OSError:
                    pass
            os.close(self._w)
            self._w = -1
        if self._sentinel is not None:
            _sentinels.append(self._sentinel)  # not waited for: it may outlive the relay
            self._sentinel = None
