"""Timed loops shared by ``testbed bench`` (:mod:`testbed.jobs.bench`) and its
``--breakdown`` (:mod:`testbed.jobs.breakdown`).

The C write loop (compiled on first use, cached by source hash) and the file
of per-call latencies it writes; the trap-only loop (seccomp traps each write,
the relay continues it at once); raw ZeroMQ and raw ZMTP round trips to the
delegate with a CALL frame of the same size.  Each returns latencies in ns.
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from testbed.compute.fastpath import trap_only, zmq_rtt, zmtp_rtt
from testbed.compute.interpose.seccomp import SeccompBackend
from testbed.compute.relay import connect
from testbed.core import wire, zmtp
from testbed.core.errors import TestbedError

WRITELOOP_C = r"""
/* writeloop N SIZE OUT [STAMPS]: N timed write(2)s of SIZE bytes to /dev/null; latencies
 * (ns, u32) to OUT and, if given, each call's CLOCK_MONOTONIC start (ns, u64) to STAMPS */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 4 && argc != 5)
		return 2;
	long n = atol(argv[1]);
	size_t size = (size_t)atol(argv[2]);
	int fd = open("/dev/null", O_WRONLY);
	char *buf = calloc(1, size ? size : 1);
	uint32_t *lat = malloc((size_t)n * sizeof(*lat));
	uint64_t *start = malloc((size_t)n * sizeof(*start));

	if (fd < 0 || !buf || !lat || !start)
		return 3;
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();

		if (write(fd, buf, size) < 0)
			return 4;
		lat[i] = (uint32_t)(now_ns() - t0);
		start[i] = t0;
	}
	FILE *f = fopen(argv[3], "wb");

	if (!f || fwrite(lat, sizeof(*lat), (size_t)n, f) != (size_t)n || fclose(f))
		return 5;
	if (argc == 5) {
		f = fopen(argv[4], "wb");
		if (!f || fwrite(start, sizeof(*start), (size_t)n, f) != (size_t)n || fclose(f))
			return 5;
	}
	return 0;
}
"""

NR_WRITE = 1


def writeloop_binary() -> Path:
    """Compile (once, cached by source hash) the timed write loop."""
    return compile_c("writeloop", WRITELOOP_C)


def compile_c(name: str, source: str) -> Path:
    """Compile ``source`` with cc (once, cached by source hash); one clear error without cc."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise TestbedError("testbed bench needs a C compiler (apt-get install build-essential)")
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "testbed"
    exe = cache / f"{name}-{digest}"
    if not exe.exists():
        cache.mkdir(parents=True, exist_ok=True)
        src = cache / f"{name}-{digest}.c"
        src.write_text(source)
        tmp = exe.with_suffix(f".tmp{os.getpid()}")
        res = subprocess.run([cc, "-O2", "-o", str(tmp), str(src)], capture_output=True, text=True)
        if res.returncode != 0:
            raise TestbedError(f"cannot compile {name}.c: {res.stderr.strip()[:300]}")
        os.replace(tmp, exe)
    return exe


def read_latencies(path: Path, n: int) -> np.ndarray:
    """The u32 ns latencies a C loop wrote to ``path``; exactly ``n`` of them."""
    lat = np.fromfile(path, dtype="<u4")
    if lat.size != n:
        raise TestbedError(f"bench program wrote {lat.size} latencies, expected {n}")
    return lat


def trap_only_lat(
    exe: Path, n: int, size: int, tmp: Path, c_path: bool = False
) -> tuple[np.ndarray, bool]:
    """Trap every write and continue it at once: the relay's idle path, no network.

    Like the relay with no call in flight, the loop waits inside NOTIF_RECV
    (where SYNC_WAKE_UP applies); SIGCHLD and the watchdog timer end the wait.
    ``c_path``: the loop of the relay's C path (:mod:`testbed.compute.fastpath`) serves.
    """
    out = tmp / "trap.bin"
    backend = SeccompBackend(frozenset({NR_WRITE}))
    child = backend.launch([str(exe), str(n), str(size), str(out)])
    blocking = backend.begin_serving()
    deadline = time.monotonic() + 120
    try:
        if c_path:
            done = blocking and trap_only(backend, child, deadline)
        else:
            done = _trap_only_python(backend, child, blocking, deadline)
        if not done:
            child.kill()
            raise TestbedError("trap-only measurement did not finish within 120 s")
    finally:
        backend.end_serving()
        child.wait()
        backend.close()
    if child.returncode != 0:
        raise TestbedError(f"bench program failed under seccomp (status {child.returncode})")
    return read_latencies(out, n), backend.sync_wakeup


def _trap_only_python(backend, child, blocking: bool, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if not blocking and not select.select([backend.fileno()], [], [], 0.05)[0]:
            trap = None
        else:
            trap = backend.receive()
        if trap is not None:
            backend.resume_continue(trap)
        elif child.poll() is not None and backend.finished():
            return True
    return False


def raw_zmq_lat(
    endpoint: str, n: int, size: int, busy_poll: bool = False, c_client: bool = False
) -> tuple[np.ndarray, int]:
    """DEALER round trips to the delegate with a CALL frame of the same size.

    ``busy_poll`` spins on ``poll(0)`` for the reply, like ``testbed run --busy-poll``.
    ``c_client``: the loop runs in C (:func:`testbed.compute.fastpath.zmq_rtt`), same socket.
    """
    ctx, sock, _ = connect(endpoint, transport="libzmq")  # the row measures libzmq
    try:
        frame = wire.encode_call(
            wire.Call(1, os.getpid(), NR_WRITE, (3, 0, size, 0, 0, 0), ((1, bytes(size)),), "cost")
        )
        if c_client:
            got = zmq_rtt(sock, frame, n, busy_poll)
            if got is None:
                raise TestbedError(f"raw ZeroMQ from C failed (delegate at {endpoint})")
            return np.asarray(got, dtype=np.int64), len(frame)
        lat = np.empty(n, dtype=np.int64)
        mono = time.monotonic_ns
        for i in range(n):
            t0 = mono()
            sock.send(frame)
            if busy_poll:
                spin_until = t0 + 5_000_000_000
                while not sock.poll(0):
                    if mono() > spin_until:
                        raise TestbedError(f"delegate at {endpoint} stopped answering")
            elif not sock.poll(5000):
                raise TestbedError(f"delegate at {endpoint} stopped answering")
            sock.recv()
            lat[i] = mono() - t0
        return lat, len(frame)
    finally:
        sock.close()


def raw_zmtp_lat(endpoint: str, n: int, size: int, busy_poll: bool = False) -> np.ndarray:
    """As :func:`raw_zmq_lat` from C, but speaking ZMTP on a plain TCP socket: no
    libzmq, so no I/O thread, on the client's side (the delegate is unchanged).

    What a relay that spoke ZMTP itself would see (docs/design-notes.md, issue 14).
    """
    sock = zmtp.connect(endpoint)
    try:
        sock.settimeout(5.0)
        sock.sendall(
            zmtp.frame(wire.encode_hello({"host": os.uname().nodename, "pid": os.getpid()}))
        )
        kind, _payload = wire.decode(zmtp.read_message(sock)[-1])
        if kind != wire.WELCOME:
            raise TestbedError(f"delegate at {endpoint} refused the raw ZMTP client ({kind})")
        sock.settimeout(None)
        call = wire.encode_call(
            wire.Call(1, os.getpid(), NR_WRITE, (3, 0, size, 0, 0, 0), ((1, bytes(size)),), "cost")
        )
        got = zmtp_rtt(sock.fileno(), zmtp.frame(call), n, busy_poll)
        if got is None:
            raise TestbedError(f"raw ZMTP from C failed (delegate at {endpoint})")
        return np.asarray(got, dtype=np.int64)
    except (OSError, wire.WireError) as exc:
        raise TestbedError(f"raw ZMTP client to {endpoint}: {exc}") from None
    finally:
        sock.close()
