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
"""

from __future__ import annotations

import hashlib
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from testbed import wire
from testbed.errors import TestbedError
from testbed.hostinfo import host_metadata
from testbed.localdelegate import LocalDelegate
from testbed.relay import connect

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


def _pcts(ns: np.ndarray) -> dict[str, float]:
    us = np.asarray(ns, dtype=np.float64) / 1e3
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "n": int(us.size),
    }


def _read_lat(path: Path, n: int) -> np.ndarray:
    lat = np.fromfile(path, dtype="<u4")
    if lat.size != n:
        raise TestbedError(f"bench program wrote {lat.size} latencies, expected {n}")
    return lat


def measure_native(exe: Path, n: int, size: int, tmp: Path) -> dict:
    out = tmp / "native.bin"
    subprocess.run([str(exe), str(n), str(size), str(out)], check=True)
    return _pcts(_read_lat(out, n))


def measure_trap_only(exe: Path, n: int, size: int, tmp: Path) -> dict:
    """Trap-only through the loop ``testbed run`` would use here (C path or Python)."""
    from testbed import fastpath

    c_path = not fastpath.disabled_by_env() and not isinstance(fastpath.load(), str)
    lat, sync = trap_only_lat(exe, n, size, tmp, c_path=c_path)
    return {**_pcts(lat), "sync_wakeup": sync, "c_path": c_path}


def trap_only_lat(
    exe: Path, n: int, size: int, tmp: Path, c_path: bool = False
) -> tuple[np.ndarray, bool]:
    """Trap every write and continue it at once: the relay's idle path, no network.

    Like the relay with no call in flight, the loop waits inside NOTIF_RECV
    (where SYNC_WAKE_UP applies); SIGCHLD and the watchdog timer end the wait.
    ``c_path``: the loop of the relay's C path (:mod:`testbed.fastpath`) serves.
    """
    from testbed.interpose.seccomp import SeccompBackend

    out = tmp / "trap.bin"
    backend = SeccompBackend(frozenset({NR_WRITE}))
    child = backend.launch([str(exe), str(n), str(size), str(out)])
    blocking = backend.begin_serving()
    deadline = time.monotonic() + 120
    try:
        if c_path:
            from testbed.fastpath import trap_only

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
    return _read_lat(out, n), backend.sync_wakeup


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


def measure_raw_zmq(endpoint: str, n: int, size: int, busy_poll: bool = False) -> dict:
    lat, frame_bytes = raw_zmq_lat(endpoint, n, size, busy_poll)
    return {**_pcts(lat), "frame_bytes": frame_bytes}


def raw_zmq_lat(
    endpoint: str, n: int, size: int, busy_poll: bool = False, c_client: bool = False
) -> tuple[np.ndarray, int]:
    """DEALER round trips to the delegate with a CALL frame of the same size.

    ``busy_poll`` spins on ``poll(0)`` for the reply, like ``testbed run --busy-poll``.
    ``c_client``: the loop runs in C (:func:`testbed.fastpath.zmq_rtt`), same socket.
    """
    ctx, sock, _ = connect(endpoint, transport="libzmq")  # the row measures libzmq
    try:
        frame = wire.encode_call(
            wire.Call(1, os.getpid(), NR_WRITE, (3, 0, size, 0, 0, 0), ((1, bytes(size)),), "cost")
        )
        if c_client:
            from testbed.fastpath import zmq_rtt

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
    from testbed import zmtp
    from testbed.fastpath import zmtp_rtt

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


def measure_forwarded(
    exe: Path, n: int, size: int, endpoint: str, tmp: Path, busy_poll: bool = False
) -> dict:
    """The full path, timed by the program; the relay runs in this process.

    Sound in process: the delegate is another process (or host) and this one
    does nothing else while the relay serves (:mod:`testbed.run`).
    """
    from testbed import rundir
    from testbed.run import run

    out = tmp / "fwd.bin"
    run_dir = tmp / ("fwd-run-busy" if busy_poll else "fwd-run")
    try:
        res = run([str(exe), str(n), str(size), str(out)], delegate=endpoint,
                  forward=[NR_WRITE], output=run_dir, busy_poll=busy_poll)  # fmt: skip
    except TestbedError as exc:
        raise TestbedError(f"forwarded run failed: {exc}") from None
    if res.exit_status != 0:
        raise TestbedError(f"forwarded run failed: the bench program exited {res.exit_status}")
    calls = rundir.load(run_dir).calls()[:n]
    d = rundir.derived(calls)
    lat = _pcts(_read_lat(out, n))
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
) -> dict:
    """``testbed bench``: the side-by-side measurements (or ``breakdown``), as a dict.

    ``endpoint`` None starts a delegate on loopback.  Format the result with
    :func:`format_report` (or :func:`testbed.breakdown.format_breakdown`).
    """
    if size < 0 or size > (1 << 20):
        raise TestbedError("--size must be between 0 and 1048576 bytes")
    if rounds is not None and not breakdown:
        raise TestbedError("--rounds is only used with --breakdown")
    if breakdown:
        from testbed.breakdown import run_breakdown

        results = run_breakdown(endpoint, calls, size, rounds or 5)
        results["host"] = host_metadata()
        return results
    return run_bench(endpoint, calls, size)
