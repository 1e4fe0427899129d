"""Forwarded round trip over shm:// vs ipc:// vs tcp:// loopback, side by side in one run.

Starts one delegate per transport (``testbed delegate --listen ...``) on this
node and measures, for each:

* ``client``: the relay's own connection (``testbed.compute.relay.connect``:
  ``shmring.Dealer`` / ``zmtp.Dealer``) sending a fixed-width CALL of
  ``getppid`` and waiting for its RESULT, N times (Python on both sides, no
  trap: the transport and the delegate's loop only);
* ``run``: ``testbed run --forward getppid`` of a program making N
  ``getppid`` calls; the per-call ``rtt = t_reply - t_send`` from calls.bin
  (the relay's C path serves all three unless ``TESTBED_FASTPATH=0``:
  ``--python``), and the relay's plus the delegate's CPU per call
  (``run.json`` ``cpu``: the relay's rusage, the delegate's ``stats``
  difference, its spinning included);
* ``futex`` / ``futex-spin``: the C reference of the same run
  (``testbed/jobs/cref/futexrtt.c``: two threads on two CPUs handing a
  CALL-sized and a RESULT-sized buffer over a futex word, sleeping in
  FUTEX_WAIT, or the client spinning), the floor under any shared-memory
  hand-over.

Prints p50/p99 (µs) per transport and row, then the ratios issue 23 names:
shm's forwarded p50 over the futex reference (sleeping; spinning with
``--busy-poll``) and over tcp's, and shm's CPU per call over tcp's.  Usage::

    python3 benchmarks/shm_rtt.py [--calls 20000] [--python] [--busy-poll]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from testbed.compute.relay import connect
from testbed.core import rundir, syscalls, wire
from testbed.core.procs import free_port
from testbed.jobs.breakdown import cref_binary
from testbed.jobs.latency import read_latencies
from testbed.jobs.localdelegate import wait_ready

GETPPID = syscalls.NR_BY_NAME["getppid"]


def _client_rtts(endpoint: str, n: int, busy: bool) -> np.ndarray:
    _ctx, sock, _welcome = connect(endpoint, timeout_s=10)
    out = np.empty(n, dtype=np.int64)
    try:
        for i in range(n + 200):
            frame = wire.encode_call_fields(i + 1, os.getpid(), GETPPID, (0,) * 6, (), "cost")
            t0 = time.monotonic_ns()
            sock.send(frame)
            if busy:
                while not sock.poll(0):
                    pass
            else:
                sock.poll(5000)
            kind, res = wire.decode(sock.recv())
            t1 = time.monotonic_ns()
            if kind != wire.RESULT or res.call_id != i + 1:
                raise RuntimeError(f"unexpected reply {kind}")
            if i >= 200:  # (warm-up)
                out[i - 200] = t1 - t0
    finally:
        sock.close()
    return out


def _futex_rtts(n: int, busy: bool, tmp: Path) -> tuple[np.ndarray, str]:
    """The C reference: n round trips of a getppid CALL's and RESULT's bytes."""
    req = len(wire.encode_call_fields(1, os.getpid(), GETPPID, (0,) * 6, (), "cost"))
    out = tmp / f"futex-{int(busy)}.bin"
    res = subprocess.run([str(cref_binary("futexrtt")), str(n), str(req), "68", str(out),
                          *(["busy"] if busy else [])],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    return read_latencies(out, n).astype(np.int64), res.stdout.strip()


def _cpu_per_call_us(meta: dict, calls: int) -> float:
    """The relay's and the delegate's CPU (run.json ``cpu``) per forwarded call, µs."""
    cpu = meta.get("cpu", {})
    total = cpu.get("relay_user_s", 0) + cpu.get("relay_sys_s", 0) + cpu.get("delegate_cpu_s", 0)
    return total / max(1, calls) * 1e6


def _run_rtts(endpoint: str, n: int, out: Path, busy: bool,
              python: bool) -> tuple[np.ndarray, str, float]:  # fmt: skip
    prog = f"import os\nfor _ in range({n}):\n    os.getppid()\n"
    env = dict(os.environ)
    if python:
        env["TESTBED_FASTPATH"] = "0"
    cmd = [sys.executable, "-m", "testbed", "run", "--delegate", endpoint, "--forward", "getppid",
           "--quiet", "-o", str(out), *(["--busy-poll"] if busy else []), "--",
           sys.executable, "-c", prog]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, timeout=600)
    run = rundir.load(out)
    calls = run.calls()
    rtt = (calls["t_reply"] - calls["t_send"]).astype(np.int64)
    hot = run.meta.get("hot_path", {})
    path = "C" if hot.get("c_calls", 0) > len(calls) // 2 else "Python"
    return rtt[rtt > 0], path, _cpu_per_call_us(run.meta, len(calls))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--python", action="store_true", help="TESTBED_FASTPATH=0 for the run rows")
    ap.add_argument("--busy-poll", action="store_true", help="the relay spins for replies")
    ap.add_argument(
        "--spin-us",
        type=float,
        default=None,
        help="TESTBED_SHM_SPIN_US for both ends (the spin before sleeping)",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shmrtt", dir="/tmp"))
    endpoints = {
        "shm": f"shm://{tmp}/d.sock",
        "ipc": f"ipc://{tmp}/i.sock",
        "tcp": f"tcp://127.0.0.1:{free_port()}",
    }
    if args.spin_us is not None:
        os.environ["TESTBED_SHM_SPIN_US"] = str(args.spin_us)
    procs = []
    try:
        for ep in endpoints.values():
            p = subprocess.Popen([sys.executable, "-m", "testbed", "delegate", "--quiet",
                                  "--listen", ep], stdin=subprocess.DEVNULL)  # fmt: skip
            procs.append(p)
            wait_ready(p, ep, timeout_s=60)
        print(f"{'transport':10} {'row':7} {'path':6} {'p50 µs':>8} {'p99 µs':>8} {'calls':>7} "
              f"{'CPU µs/call':>11}")  # fmt: skip
        for name, ep in endpoints.items():
            lat = _client_rtts(ep, args.calls, args.busy_poll)
            p50, p99 = np.percentile(lat, [50, 99]) / 1000
            print(f"{name:10} {'client':7} {'Python':6} {p50:8.1f} {p99:8.1f} {lat.size:7}")
        run_p50, cpu = {}, {}
        for name, ep in endpoints.items():
            lat, path, cpu[name] = _run_rtts(ep, args.calls, tmp / f"run-{name}", args.busy_poll,
                                             args.python)  # fmt: skip
            p50, p99 = np.percentile(lat, [50, 99]) / 1000
            run_p50[name] = p50
            print(f"{name:10} {'run':7} {path:6} {p50:8.1f} {p99:8.1f} {lat.size:7} "
                  f"{cpu[name]:11.1f}")  # fmt: skip
        ref = {}
        for busy in (False, True):
            lat, cpus = _futex_rtts(args.calls, busy, tmp)
            p50, p99 = np.percentile(lat, [50, 99]) / 1000
            name = "futex-spin" if busy else "futex"
            ref[name] = p50
            print(f"{name:10} {'C ref':7} {'C':6} {p50:8.3f} {p99:8.3f} {lat.size:7} ({cpus})")
        want = "futex-spin" if args.busy_poll else "futex"
        print(f"shm run p50 / {want} p50: {run_p50['shm'] / ref[want]:.2f} (target <= 2)")
        print(f"shm run p50 / futex-spin p50: {run_p50['shm'] / ref['futex-spin']:.1f}")
        print(f"shm run p50 / tcp run p50: {run_p50['shm'] / run_p50['tcp']:.2f} (target <= 0.25)")
        print(f"shm CPU per call / tcp's: {cpu['shm'] / cpu['tcp']:.2f} (target <= 0.5)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
