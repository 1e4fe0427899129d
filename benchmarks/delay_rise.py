"""Calibration of the delegate's injected delay across two network namespaces.

    python3 benchmarks/delay_rise.py [--delay-us 200] [--reps 3] [--calls 1000]

Needs root.  Starts two delegates in a ``delegate`` namespace (``--delay-us
0`` and ``--delay-us D``) and runs ``dd bs=1`` with ``write`` forwarded from a
``compute`` namespace, alternating the two delegates ``--reps`` times, with a
busy-polling and with a sleeping relay.  Prints the median rtt of each run
and the rise (median of the paired differences of median rtt) beside D: with
``--busy-poll`` the rise is D plus a few µs; a sleeping relay also pays the
wake-up of an idle vCPU on every delayed reply (tens of µs on this VM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from testbed.cluster import netns  # noqa: E402
from testbed.core import rundir  # noqa: E402
from testbed.core.hostinfo import host_metadata  # noqa: E402


def tb(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbed", *args]


def start_delegate(topo: netns.Topology, port: int, delay: int) -> tuple[str, subprocess.Popen]:
    endpoint = f"tcp://{topo.addr('delegate')}:{port}"
    proc = topo.popen(
        "delegate", tb("delegate", "--listen", endpoint, "--quiet", "--delay-us", str(delay))
    )
    probe = f"from testbed.compute.relay import connect; connect({endpoint!r}, timeout_s=1.0)[1].close()"
    for _ in range(40):
        if topo.run("compute", [sys.executable, "-c", probe], capture_output=True).returncode == 0:
            return endpoint, proc
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit(f"delay_rise: the delegate on {endpoint} never answered")


def median_rtt_us(
    topo: netns.Topology, endpoint: str, out: Path, calls: int, extra: list[str]
) -> float:
    argv = tb("run", "--delegate", endpoint, "--forward", "write", "-o", str(out), *extra, "--",
              "dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={calls}", "status=none")  # fmt: skip
    res = topo.run("compute", argv, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"delay_rise: testbed run failed: {res.stderr.strip()[-300:]}")
    return float(np.median(rundir.derived(rundir.load(out).calls())["rtt"])) / 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-us", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calls", type=int, default=1000)
    a = ap.parse_args()
    ok, why = netns.available()
    if not ok:
        raise SystemExit(f"delay_rise: {why}")
    with netns.Topology(["compute", "delegate"]) as topo, tempfile.TemporaryDirectory() as tmp:
        delegates = {
            0: start_delegate(topo, 5556, 0),
            a.delay_us: start_delegate(topo, 5557, a.delay_us),
        }
        try:
            for label, extra in (("busy-poll", ["--busy-poll"]), ("sleeping", [])):
                rises = []
                for rep in range(a.reps):
                    med = {d: median_rtt_us(topo, ep, Path(tmp) / f"{label}-{d}-{rep}", a.calls, extra)
                           for d, (ep, _p) in delegates.items()}  # fmt: skip
                    rises.append(med[a.delay_us] - med[0])
                    print(
                        f"{label:9s} rep {rep}: rtt p50 {med[0]:7.1f} -> {med[a.delay_us]:7.1f} µs"
                    )
                rise = float(np.median(rises))
                print(f"{label:9s} rise {rise:.1f} µs for --delay-us {a.delay_us} "
                      f"(ratio {rise / a.delay_us:.3f}, paired rises {min(rises):.1f}-{max(rises):.1f})")  # fmt: skip
        finally:
            for _ep, proc in delegates.values():
                proc.terminate()
                proc.wait(10)
    h = host_metadata()
    print(
        json.dumps(
            {k: h.get(k) for k in ("hostname", "kernel", "cpu_model", "cores", "clocksource")}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
