"""Offloaded read/write against local I/O and raw ZeroMQ, side by side in one run.

    python3 benchmarks/offload_io.py [--rounds R] [--json OUT]

For 4 KiB and 1 MiB calls, in interleaved rounds (local, offloaded, raw
ZeroMQ, local, ...), it measures:

  local      write(2)/read(2) of a file in a local directory (no interposition)
  offloaded  the same program under ``testbed run --mode offload``: the file
             lives beneath the delegate's --offload-root (delegate on loopback)
  raw ZeroMQ a DEALER/ROUTER round trip moving the same bytes: SIZE bytes out
             and a 1-byte ack (write), or 1 byte out and SIZE bytes back (read)

Per-call times are taken by the calling program around each call (a small C
program, so no interpreter time is included).  Printed per size and direction:
median per-call time, throughput (SIZE / mean call time), the ratios
offloaded/local and offloaded/raw ZeroMQ, and from the offloaded run's records
the delegate's execution time and f_c = (overhead - exec)/2 (medians).
Every number is host-stamped (testbed.hostinfo).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

# this checkout's testbed, here and in the testbed processes started below
TOP = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, TOP)
os.environ["PYTHONPATH"] = TOP + (
    os.pathsep + os.environ["PYTHONPATH"] if "PYTHONPATH" in os.environ else ""
)

from testbed import rundir  # noqa: E402
from testbed.hostinfo import host_metadata  # noqa: E402
from testbed.localdelegate import LocalDelegate  # noqa: E402

IOLOOP_C = r"""
/* ioloop w|r N SIZE PATH OUT: N timed write(2)/read(2) of SIZE bytes on PATH; ns (u64) to OUT */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 6)
		return 2;
	int w = argv[1][0] == 'w';
	long n = atol(argv[2]);
	size_t size = (size_t)atol(argv[3]);
	int fd = w ? open(argv[4], O_WRONLY | O_CREAT | O_TRUNC, 0644) : open(argv[4], O_RDONLY);
	char *buf = malloc(size);
	uint64_t *lat = malloc((size_t)n * sizeof(*lat));

	if (fd < 0 || !buf || !lat)
		return 3;
	for (size_t i = 0; i < size; i++)
		buf[i] = (char)i;
	for (long i = 0; i < n; i++) {
		uint64_t t0 = now_ns();
		ssize_t got = w ? write(fd, buf, size) : read(fd, buf, size);

		lat[i] = now_ns() - t0;
		if (got != (ssize_t)size)
			return 4;
	}
	close(fd);
	FILE *f = fopen(argv[5], "wb");

	if (!f || fwrite(lat, sizeof(*lat), (size_t)n, f) != (size_t)n || fclose(f))
		return 5;
	return 0;
}
"""

RAW_SERVER = r"""
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
port = s.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
blobs = {}
while True:
    ident, msg = s.recv_multipart(copy=False)
    b = msg.bytes
    if b[:1] == b"q":
        break
    if b[:1] == b"r":
        n = int(b[1:])
        s.send_multipart([ident, blobs.setdefault(n, bytes(n))])
    else:
        s.send_multipart([ident, b"k"])
"""

PREFIX = "/tb-bench-offload"


def build(tmp: Path) -> Path:
    src, exe = tmp / "ioloop.c", tmp / "ioloop"
    src.write_text(IOLOOP_C)
    subprocess.run(["cc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def local(exe: Path, mode: str, n: int, size: int, work: Path) -> np.ndarray:
    out = work / "lat.bin"
    subprocess.run([str(exe), mode, str(n), str(size), str(work / "file"), str(out)], check=True)
    return np.fromfile(out, dtype=np.uint64).astype(np.float64)


def offloaded(exe: Path, mode: str, n: int, size: int, endpoint: str, work: Path, tag: str):
    out, run = work / "lat-off.bin", work / f"run-{tag}"
    cmd = [sys.executable, "-m", "testbed", "run", "--quiet", "--delegate", endpoint,
           "--mode", "offload", "--offload-path", PREFIX, "-o", str(run), "--",
           str(exe), mode, str(n), str(size), f"{PREFIX}/file", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"offloaded run failed: {res.stderr.strip()}")
    calls = rundir.load(run).calls()
    sel = calls[calls["nr"] == (1 if mode == "w" else 0)]
    d = rundir.derived(sel)
    fc = (d["overhead"] - d["exec"]) / 2
    return np.fromfile(out, dtype=np.uint64).astype(np.float64), d["exec"], fc


def raw_zmq(mode: str, n: int, size: int, port: int) -> np.ndarray:
    import time

    import zmq

    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{port}")
    msg = b"w" + bytes(size) if mode == "w" else b"r%d" % size
    lat = np.empty(n)
    for i in range(n):
        t0 = time.monotonic_ns()
        s.send(msg)
        s.recv(copy=False)
        lat[i] = time.monotonic_ns() - t0
    s.close()
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    plan = [(4096, 2000), (1 << 20, 64)]
    results: dict[str, dict[str, list]] = {}
    with tempfile.TemporaryDirectory(prefix="offload-bench-") as t:
        tmp = Path(t)
        exe = build(tmp)
        root = tmp / "root"
        root.mkdir()
        server = subprocess.Popen(
            [sys.executable, "-c", RAW_SERVER], stdout=subprocess.PIPE, text=True
        )
        port = int(server.stdout.readline())
        try:
            with LocalDelegate(extra=["--offload-root", str(root)]) as d:
                for r in range(args.rounds):
                    for size, n in plan:
                        for mode in ("w", "r"):  # read after write: the file exists
                            key = f"{'write' if mode == 'w' else 'read'} {size}"
                            acc = results.setdefault(
                                key, {k: [] for k in ("local", "offloaded", "raw", "exec", "fc")}
                            )
                            acc["local"].append(local(exe, mode, n, size, tmp))
                            lat, ex, fc = offloaded(
                                exe, mode, n, size, d.endpoint, tmp, f"{r}{mode}{size}"
                            )
                            acc["offloaded"].append(lat)
                            acc["exec"].append(ex)
                            acc["fc"].append(fc)
                            acc["raw"].append(raw_zmq(mode, n, size, port))
        finally:
            server.stdin = None
            import zmq

            q = zmq.Context.instance().socket(zmq.DEALER)
            q.connect(f"tcp://127.0.0.1:{port}")
            q.send(b"q")
            q.close(100)
            server.wait(5)
    report = {"host": host_metadata(), "rounds": args.rounds, "rows": []}
    print(
        f"offloaded read/write vs local I/O vs raw ZeroMQ (loopback), {args.rounds} interleaved rounds"
    )
    print(f"{'call':<14}{'local µs':>10}{'offl µs':>10}{'raw µs':>10}{'offl/local':>11}"
          f"{'offl/raw':>9}{'local MB/s':>11}{'offl MB/s':>10}{'raw MB/s':>9}{'exec µs':>9}{'f_c µs':>8}")  # fmt: skip
    for key, acc in results.items():
        size = int(key.split()[1])
        row = {"call": key}
        for k in ("local", "offloaded", "raw", "exec", "fc"):
            v = np.concatenate(acc[k])
            row[f"{k}_p50_us"] = float(np.median(v) / 1e3)
            if k in ("local", "offloaded", "raw"):
                row[f"{k}_MBps"] = float(size / np.mean(v) * 1e3)
        row["offloaded_over_local"] = row["offloaded_p50_us"] / row["local_p50_us"]
        row["offloaded_over_raw"] = row["offloaded_p50_us"] / row["raw_p50_us"]
        report["rows"].append(row)
        print(f"{key:<14}{row['local_p50_us']:>10.1f}{row['offloaded_p50_us']:>10.1f}{row['raw_p50_us']:>10.1f}"
              f"{row['offloaded_over_local']:>11.1f}{row['offloaded_over_raw']:>9.2f}{row['local_MBps']:>11.0f}"
              f"{row['offloaded_MBps']:>10.0f}{row['raw_MBps']:>9.0f}{row['exec_p50_us']:>9.1f}"
              f"{row['fc_p50_us']:>8.1f}")  # fmt: skip
    h = report["host"]
    print(
        f"host {h.get('hostname')} kernel {h.get('kernel')} cpu {h.get('cpu_model')} x{h.get('cores')}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
