"""``testbed bench``: forwarding overhead measured side by side in one run.

Four measurements of the same ``write(fd, buf, SIZE)`` call, in one run, on
the same machine and the same delegate endpoint:

  native       the call with no interposition
  trap-only    seccomp traps the call and the relay continues it at once (no network)
  raw ZeroMQ   a DEALER round trip to the delegate with a frame of the same size
  forwarded    the full path: trap -> relay -> msgpack/ZeroMQ -> delegate -> resume

The call costs (native, trap-only, forwarded) are timed by the calling program
itself around each ``write`` (a small C program compiled on first use), so they
are what the application sees.  Ratios printed: forwarded / raw ZeroMQ and
trap-only / native.

``--breakdown`` (:mod:`testbed.jobs.breakdown`) splits a forwarded call into
stages; ``--transports`` (:mod:`testbed.jobs.transports`) measures it over each
transport next to its C reference.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from testbed.compute import fastpath
from testbed.compute.run import run
from testbed.compute.spec import RunSpec
from testbed.core import rundir
from testbed.core.errors import TestbedError
from testbed.core.hostinfo import host_metadata
from testbed.jobs.breakdown import run_breakdown
from testbed.jobs.latency import (
    NR_WRITE,
    raw_zmq_lat,
    read_latencies,
    trap_only_lat,
    writeloop_binary,
)
from testbed.jobs.localdelegate import LocalDelegate
from testbed.jobs.transports import run_transports


def _pcts(ns: np.ndarray) -> dict[str, float]:
    us = np.asarray(ns, dtype=np.float64) / 1e3
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "n": int(us.size),
    }


def measure_native(exe: Path, n: int, size: int, tmp: Path) -> dict:
    out = tmp / "native.bin"
    subprocess.run([str(exe), str(n), str(size), str(out)], check=True)
    return _pcts(read_latencies(out, n))


def measure_trap_only(exe: Path, n: int, size: int, tmp: Path) -> dict:
    """Trap-only through the loop ``testbed run`` would use here (C path or Python)."""
    c_path = not fastpath.disabled_by_env() and not isinstance(fastpath.load(), str)
    lat, sync = trap_only_lat(exe, n, size, tmp, c_path=c_path)
    return {**_pcts(lat), "sync_wakeup": sync, "c_path": c_path}


def measure_raw_zmq(endpoint: str, n: int, size: int, busy_poll: bool = False) -> dict:
    lat, frame_bytes = raw_zmq_lat(endpoint, n, size, busy_poll)
    return {**_pcts(lat), "frame_bytes": frame_bytes}


def measure_forwarded(
    exe: Path, n: int, size: int, endpoint: str, tmp: Path, busy_poll: bool = False
) -> dict:
    """The full path, timed by the program; the relay runs in this process.

    Sound in process: the delegate is another process (or host) and this one
    does nothing else while the relay serves (:mod:`testbed.compute.run`).
    """
    out = tmp / "fwd.bin"
    run_dir = tmp / ("fwd-run-busy" if busy_poll else "fwd-run")
    try:
        spec = RunSpec((str(exe), str(n), str(size), str(out)), delegate=endpoint,
                       forward=[NR_WRITE], output=run_dir, busy_poll=busy_poll)  # fmt: skip
        res = run(spec)
    except TestbedError as exc:
        raise TestbedError(f"forwarded run failed: {exc}") from None
    if res.exit_status != 0:
        raise TestbedError(f"forwarded run failed: the bench program exited {res.exit_status}")
    calls = rundir.load(run_dir).calls()[:n]
    d = rundir.derived(calls)
    lat = _pcts(read_latencies(out, n))
    lat["relay_rtt_p50_us"] = float(np.nanpercentile(d["rtt"], 50) / 1e3)
    lat["relay_overhead_p50_us"] = float(np.percentile(d["overhead"], 50) / 1e3)
    lat["relay_f_c_p50_us"] = rundir.fc_estimates(calls)["median"]
    lat["faults"] = res.calls["faults"]
    return lat


def run_bench(endpoint: str | None, n: int, size: int) -> dict:
    exe = writeloop_binary()
    with tempfile.TemporaryDirectory(prefix="testbed-bench-") as t:
        tmp = Path(t)
        if endpoint is None:
            with LocalDelegate() as d:
                return _all(exe, n, size, d.endpoint, tmp)
        return _all(exe, n, size, endpoint, tmp)


def _all(exe: Path, n: int, size: int, endpoint: str, tmp: Path) -> dict:
    steps = [
        ("native", lambda: measure_native(exe, n, size, tmp)),
        ("trap_only", lambda: measure_trap_only(exe, n, size, tmp)),
        ("raw_zmq", lambda: measure_raw_zmq(endpoint, n, size)),
        ("forwarded", lambda: measure_forwarded(exe, n, size, endpoint, tmp)),
        ("raw_zmq_busy", lambda: measure_raw_zmq(endpoint, n, size, True)),
        ("forwarded_busy", lambda: measure_forwarded(exe, n, size, endpoint, tmp, True)),
    ]
    results: dict = {"endpoint": endpoint, "calls": n, "size": size, "host": host_metadata()}
    for i, (name, fn) in enumerate(steps, 1):
        print(f"bench: [{i}/{len(steps)}] {name} ...", file=sys.stderr, flush=True)
        results[name] = fn()
    return results


def format_report(r: dict) -> str:
    rows = [
        ("native write", r["native"]),
        (
            "trap-only (seccomp, " + ("C path)" if r["trap_only"].get("c_path") else "Python)"),
            r["trap_only"],
        ),
        ("raw ZeroMQ round trip", r["raw_zmq"]),
        ("full forwarded", r["forwarded"]),
        ("raw ZeroMQ, busy-polled", r["raw_zmq_busy"]),
        ("full forwarded, --busy-poll", r["forwarded_busy"]),
    ]
    h = r["host"]
    sync = "yes" if r["trap_only"].get("sync_wakeup") else "no"
    lines = [
        f"testbed bench: {r['calls']} x write({r['size']} B) on {r['endpoint']}",
        f"  kernel {h['kernel']}, {h['cores']} cores, {h['cpu_model']}, SYNC_WAKE_UP {sync}",
        f"  {'':30s}{'p50':>10s}{'p99':>10s}",
    ]
    for label, m in rows:
        lines.append(f"  {label:30s}{m['p50_us']:>8.2f}µs{m['p99_us']:>8.2f}µs")
    fw, raw, trap, nat = r["forwarded"], r["raw_zmq"], r["trap_only"], r["native"]
    lines += [
        f"  raw ZeroMQ frame: {raw['frame_bytes']} B; relay-measured rtt p50 "
        f"{fw['relay_rtt_p50_us']:.2f} µs, overhead p50 {fw['relay_overhead_p50_us']:.2f} µs",
        f"  ratio full/raw-ZeroMQ  {fw['p50_us'] / raw['p50_us']:6.2f}  "
        f"(relay adds {fw['p50_us'] - raw['p50_us']:.2f} µs p50)",
        f"  ratio trap-only/native {trap['p50_us'] / nat['p50_us']:6.2f}  "
        f"(trap adds {trap['p50_us'] - nat['p50_us']:.2f} µs p50)",
        f"  ratio full/raw-ZeroMQ, both busy-polled "
        f"{r['forwarded_busy']['p50_us'] / r['raw_zmq_busy']['p50_us']:6.2f}  (relay adds "
        f"{r['forwarded_busy']['p50_us'] - r['raw_zmq_busy']['p50_us']:.2f} µs p50)",
        f"  f_c (relay records, median overhead / 2) {fw['relay_f_c_p50_us']:.2f} µs",
    ]
    if fw.get("faults"):
        lines.append(f"  WARNING: {fw['faults']} forwarded calls faulted")
    return "\n".join(lines)


def bench(
    endpoint: str | None,
    calls: int,
    size: int,
    breakdown: bool = False,
    rounds: int | None = None,
    transports: bool = False,
) -> dict:
    """``testbed bench``: the side-by-side measurements (or ``breakdown``, or
    ``transports``), as a dict.

    ``endpoint`` None starts a delegate on loopback.  Format the result with
    :func:`format_report` (or :func:`testbed.jobs.breakdown.format_breakdown`,
    :func:`testbed.jobs.transports.format_transports`).
    """
    if size < 0 or size > (1 << 20):
        raise TestbedError("--size must be between 0 and 1048576 bytes")
    if breakdown and transports:
        raise TestbedError("--breakdown and --transports are two benchmarks: choose one")
    if rounds is not None and not (breakdown or transports):
        raise TestbedError("--rounds is only used with --breakdown or --transports")
    if transports:
        if endpoint is not None:
            raise TestbedError("--transports starts its own delegates (one per transport): "
                               "drop --delegate")  # fmt: skip
        results = run_transports(calls, size, rounds or 5)
        results["host"] = host_metadata()
        return results
    if breakdown:
        results = run_breakdown(endpoint, calls, size, rounds or 5)
        results["host"] = host_metadata()
        return results
    return run_bench(endpoint, calls, size)
