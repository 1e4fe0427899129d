#!/usr/bin/env python3
"""The floor of a Python seccomp supervisor: trap+continue with nothing else.

    python3 benchmarks/trap_floor.py [--calls 20000] [--rounds 5]

Interleaved rounds of three trap-only measurements of the same timed
``write(2)`` loop: C (``testbed/jobs/cref/trapcont.c``), the relay's Python loop
(``testbed.jobs.latency.trap_only_lat``), and the least Python can do per call - two
``fcntl.ioctl`` calls (NOTIF_RECV, NOTIF_SEND CONTINUE) on preallocated
buffers, no objects built, no signals, no checks.  If even that floor is above
1.5x C, no pure-Python relay can meet the trap-only target.
"""

from __future__ import annotations

import argparse
import fcntl
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.compute.interpose import seccomp  # noqa: E402
from testbed.jobs import latency  # noqa: E402
from testbed.jobs.breakdown import cref_binary, trap_c  # noqa: E402


def floor_lat(exe: Path, n: int, tmp: Path) -> np.ndarray:
    out = tmp / "floor.bin"
    backend = seccomp.SeccompBackend(frozenset({1}))
    child = backend.launch([str(exe), str(n), "64", str(out)])
    # the program's own writes start after the launch; serve exactly n of them bare
    fd, recv_req, send_req = backend.fd, seccomp.IOCTL_NOTIF_RECV, seccomp.IOCTL_NOTIF_SEND
    buf, zero, resp = bytearray(seccomp.NOTIF_SIZE), bytes(seccomp.NOTIF_SIZE), bytearray(24)
    ioctl, pack_into, unpack_from = (
        fcntl.ioctl,
        struct.Struct("<QqiI").pack_into,
        struct.Struct("<Q").unpack_from,
    )
    while backend._launching:  # the launcher's execve (served by the backend itself)
        backend.receive()
    for _ in range(n):  # the filter traps only write and execve: these are the n writes
        buf[:] = zero
        ioctl(fd, recv_req, buf, True)
        pack_into(resp, 0, unpack_from(buf)[0], 0, 0, 1)
        ioctl(fd, send_req, resp)
    # the program's last writes (its output file) are served by the relay's normal loop
    while child.poll() is None:
        trap = backend.receive()
        if trap is not None:
            backend.resume_continue(trap)
    backend.close()
    return latency.read_latencies(out, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    exe, c_exe = latency.writeloop_binary(), cref_binary("trapcont")
    m = a.calls // a.rounds
    res: dict[str, list[float]] = {"c": [], "floor": [], "relay": []}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for _ in range(a.rounds):
            res["c"].append(float(np.median(trap_c(c_exe, m, 64, tmp)[0])) / 1e3)
            res["floor"].append(float(np.median(floor_lat(exe, m, tmp))) / 1e3)
            res["relay"].append(float(np.median(latency.trap_only_lat(exe, m, 64, tmp)[0])) / 1e3)
    c = np.array(res["c"])
    print(f"trap-only p50, {a.rounds} interleaved rounds x {m} x write(64 B); median [min .. max]")
    for k, label in (("c", "C (cref/trapcont.c)"), ("floor", "Python floor (2 ioctls)"),
                     ("relay", "Python relay loop")):  # fmt: skip
        v = np.array(res[k])
        r = v / c
        print(
            f"  {label:26s} {np.median(v):6.2f} µs [{v.min():.2f} .. {v.max():.2f}]   "
            f"/C {np.median(r):.2f} [{r.min():.2f} .. {r.max():.2f}]"
        )


if __name__ == "__main__":
    main()
