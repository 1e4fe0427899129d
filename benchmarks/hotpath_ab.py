#!/usr/bin/env python3
"""A/B of the relay + delegate hot path: this tree against another source tree.

    python3 benchmarks/hotpath_ab.py --base /tmp/base-tree [--calls 4000] [--rounds 6]

Each side runs its own delegate (``python3 -m testbed delegate`` from its tree)
and its own relay (``testbed run --forward write`` of the timed write loop), in
interleaved rounds A B A B ..., sleeping and ``--busy-poll``.  Per round: the
program-measured p50, the relay's CPU per call
(``run.json`` ``cpu``) and the delegate's (``/proc/PID/task/*/schedstat``).  Prints B/A ratios per
round as median [min .. max].  Make the base tree with e.g.
``mkdir /tmp/base && git archive COMMIT | tar -x -C /tmp/base``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from testbed.compute.fastpath import thread_cpu_ns  # noqa: E402
from testbed.jobs.latency import writeloop_binary  # noqa: E402


def task_cpu_ns(pid: int) -> int:
    return sum(thread_cpu_ns(pid).values())


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start_delegate(tree: Path) -> tuple[subprocess.Popen, str]:
    ep = free_endpoint()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "testbed", "delegate", "--quiet", "--listen", ep],
                            cwd=tree, env=env)  # fmt: skip
    time.sleep(1.0)
    return proc, ep


def one_run(tree: Path, ep: str, dpid: int, exe: Path, n: int, busy: bool, tmp: Path) -> dict:
    out = tmp / "lat.bin"
    run_dir = tmp / f"run-{os.urandom(4).hex()}"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "testbed", "run", "--quiet", "--delegate", ep, "--forward", "write",
           "-o", str(run_dir), *(["--busy-poll"] if busy else []), "--", str(exe), str(n), "64", str(out)]  # fmt: skip
    d0 = task_cpu_ns(dpid)
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    d1 = task_cpu_ns(dpid)
    if res.returncode != 0:
        raise SystemExit(f"run failed in {tree}: {res.stderr.strip()[-300:]}")
    meta = json.loads((run_dir / "run.json").read_text())
    count = meta["calls"]["count"]
    lat = np.fromfile(out, dtype="<u4") / 1e3
    return {
        "p50": float(np.median(lat)),
        "relay_cpu": (meta["cpu"]["relay_user_s"] + meta["cpu"]["relay_sys_s"]) * 1e6 / count,
        "delegate_cpu": (d1 - d0) / 1e3 / count,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="source tree B (the baseline)")
    ap.add_argument("--calls", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=6)
    a = ap.parse_args()
    exe = writeloop_binary()
    trees = {"A": HERE, "B": a.base.resolve()}
    dels = {k: start_delegate(t) for k, t in trees.items()}
    res: dict = {(k, b): [] for k in trees for b in (False, True)}
    try:
        with tempfile.TemporaryDirectory() as t:
            for r in range(a.rounds):
                for busy in (False, True):
                    for k in "AB" if r % 2 == 0 else "BA":
                        proc, ep = dels[k]
                        res[(k, busy)].append(
                            one_run(trees[k], ep, proc.pid, exe, a.calls, busy, Path(t))
                        )
    finally:
        for proc, _ in dels.values():
            proc.terminate()
            proc.wait(5)
    print(f"hotpath A/B: A = {trees['A']}, B = {trees['B']}; {a.rounds} rounds x {a.calls} "
          "x write(64 B), interleaved; median [min .. max] over rounds")  # fmt: skip
    for busy in (False, True):
        mode = "--busy-poll" if busy else "sleeping"
        for key, label in (("p50", "p50 µs"), ("relay_cpu", "relay CPU µs/call"),
                           ("delegate_cpu", "delegate CPU µs/call")):  # fmt: skip
            A = np.array([x[key] for x in res[("A", busy)]])
            B = np.array([x[key] for x in res[("B", busy)]])
            ratio = A / B
            print(
                f"  {mode:12s} {label:22s} A {np.median(A):8.2f}  B {np.median(B):8.2f}  "
                f"A/B {np.median(ratio):.2f} [{ratio.min():.2f} .. {ratio.max():.2f}]"
            )


if __name__ == "__main__":
    main()
