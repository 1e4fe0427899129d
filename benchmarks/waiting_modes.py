#!/usr/bin/env python3
"""Sleeping vs ``--busy-poll`` when the program has other threads that compute.

    python3 benchmarks/waiting_modes.py [--rounds 5] [--calls 4000] [--work-ms 400]

``testbed bench --breakdown`` measures the waiting modes with a program that
only makes calls, so a spinning relay takes nothing from it.  Here the
program (C, compiled on the fly) has ``--threads`` compute threads, each doing
a fixed amount of arithmetic, and one thread that makes ``--calls`` write(64 B)
calls to /dev/null, forwarded to a loopback delegate.  In interleaved rounds
(native, sleeping, busy-poll, order rotated) it prints, per mode, the compute
threads' wall time (median over rounds; what the forwarding takes from the
program's computation), the writer thread's time per call, and the relay's
CPU per call (``run.json`` ``hot_path``), with the per-round ratios
busy / sleeping.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from testbed.jobs.localdelegate import LocalDelegate  # noqa: E402

PROGRAM = r"""
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

static long iters, calls;
static volatile uint64_t sink;

static int64_t now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}
static void *compute(void *arg) {
    int64_t *out = arg, t0 = now();
    uint64_t x = 88172645463325252ull;
    for (long i = 0; i < iters; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; }
    sink = x;
    *out = now() - t0;
    return NULL;
}
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    iters = atol(argv[2]); calls = atol(argv[3]);
    pthread_t th[16]; int64_t took[16];
    int fd = open("/dev/null", O_WRONLY);
    char buf[64] = {0};
    int64_t t0 = now();
    for (int i = 0; i < n; i++) pthread_create(&th[i], NULL, compute, &took[i]);
    for (long i = 0; i < calls; i++) write(fd, buf, sizeof buf);
    int64_t tw = now() - t0;
    int64_t worst = 0;
    for (int i = 0; i < n; i++) { pthread_join(th[i], NULL); if (took[i] > worst) worst = took[i]; }
    printf("%lld %lld\n", (long long)worst, (long long)tw);
    return 0;
}
"""


def build(tmp: Path) -> Path:
    src, exe = tmp / "mixed.c", tmp / "mixed"
    src.write_text(PROGRAM)
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, "-O2", "-pthread", "-o", str(exe), str(src)], check=True)
    return exe


def calibrate(exe: Path, work_ms: float) -> int:
    """Iterations that take ``work_ms`` per compute thread, natively and alone."""
    probe = 20_000_000
    out = subprocess.run([str(exe), "1", str(probe), "0"], capture_output=True, text=True)
    ns = int(out.stdout.split()[0])
    return int(probe * work_ms * 1e6 / ns)


def one(exe: Path, mode: str, endpoint: str, threads: int, iters: int, calls: int,
        tmp: Path) -> dict:  # fmt: skip
    argv = [str(exe), str(threads), str(iters), str(calls)]
    if mode == "native":
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        compute_ns, writer_ns = map(int, out.stdout.split())
        return {"compute_ms": compute_ns / 1e6, "per_call_us": writer_ns / calls / 1e3}
    run_dir = tmp / f"run-{mode}-{os.urandom(3).hex()}"
    cmd = [sys.executable, "-m", "testbed", "run", "--quiet", "--delegate", endpoint,
           "--forward", "write", "-o", str(run_dir), *(["--busy-poll"] if mode == "busy" else []),
           "--", *argv]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    compute_ns, writer_ns = map(int, out.stdout.split())
    meta = json.loads((run_dir / "run.json").read_text())
    relay_s = sum(meta["hot_path"]["thread_cpu_s"].values())
    shutil.rmtree(run_dir)
    return {"compute_ms": compute_ns / 1e6, "per_call_us": writer_ns / calls / 1e3,
            "relay_cpu_us": relay_s / calls * 1e6}  # fmt: skip


def spread(v: list[float]) -> str:
    a = np.asarray(v)
    return f"{np.median(a):8.2f} [{a.min():.2f} .. {a.max():.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                    help="compute threads (default: one per CPU)")  # fmt: skip
    ap.add_argument("--work-ms", type=float, default=400.0, help="work per compute thread")
    args = ap.parse_args()
    modes = ("native", "sleep", "busy")
    res: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as t, LocalDelegate() as d:
        tmp = Path(t)
        exe = build(tmp)
        iters = calibrate(exe, args.work_ms)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            order = modes[r % 3 :] + modes[: r % 3]
            for m in order:
                res[m].append(one(exe, m, d.endpoint, args.threads, iters, args.calls, tmp))
    print(f"{args.threads} compute threads x {args.work_ms:g} ms of work, one writer thread "
          f"x {args.calls} forwarded write(64 B); {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; median [min .. max] over {args.rounds} rounds")  # fmt: skip
    for m in modes:
        line = (f"  {m:7s} compute {spread([x['compute_ms'] for x in res[m]])} ms, "
                f"per call {spread([x['per_call_us'] for x in res[m]])} µs")  # fmt: skip
        if m != "native":
            line += f", relay CPU/call {spread([x['relay_cpu_us'] for x in res[m]])} µs"
        print(line)
    for key, what in (("compute_ms", "compute time"), ("per_call_us", "time per call")):
        ratio = [b[key] / s[key] for b, s in zip(res["busy"], res["sleep"], strict=True)]
        print(f"  busy / sleeping, {what:13s} {spread(ratio)} x")
        for m in ("sleep", "busy"):
            ratio = [x[key] / n[key] for x, n in zip(res[m], res["native"], strict=True)]
            print(f"  {m:5s} / native,   {what:13s} {spread(ratio)} x")


if __name__ == "__main__":
    main()
