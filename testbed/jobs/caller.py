"""One caller of the contention load generator (run as a script, stdlib only).

    python3 -S -I caller.py GO THINK_US sleep|spin exp|fixed SEED OUT

Creates ``OUT.ready``, waits for the file GO to hold ``START_NS END_NS``
(written by ``testbed contention`` once every caller is ready), sleeps until
START_NS (CLOCK_MONOTONIC), then until END_NS alternates a think
phase (mean THINK_US: ``sleep``, or ``spin`` computing; ``exp`` exponential
or ``fixed``) with one ``getppid`` system call, the call ``testbed
contention`` forwards.  Writes OUT: one ``<q t0, <q t1, <q z`` triple per
call (ns before and after the call, and the think time drawn before it).  Exits 3 if it reached START_NS late (the machine
could not start all callers in time), 2 on bad arguments.

Kept tiny on purpose: no imports beyond the standard library, nothing that
makes ``getppid`` calls of its own, constant work per cycle.
"""

import os
import random
import sys
import time
from array import array

#: How late (ns) a caller may reach the common start before it gives up.
LATE_NS = 50_000_000
#: How long (s) a caller waits for the go file.
GO_WAIT_S = 600


def _wait_go(path: str) -> tuple[int, int] | None:
    deadline = time.monotonic() + GO_WAIT_S
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                a, b = f.read().split()
            return int(a), int(b)
        except (OSError, ValueError):
            time.sleep(0.01)
    return None


def main(argv: list[str]) -> int:
    try:
        go, think_us = argv[0], float(argv[1])
        how, dist, seed, out = argv[2], argv[3], int(argv[4]), argv[5]
        if how not in ("sleep", "spin") or dist not in ("exp", "fixed") or think_us < 0:
            raise ValueError
    except (ValueError, IndexError):
        print(
            "usage: caller.py GO THINK_US sleep|spin exp|fixed SEED OUT",
            file=sys.stderr,
        )
        return 2
    mono = time.monotonic_ns
    rng = random.Random(seed)
    mean_s = think_us / 1e6
    call = os.getppid
    stamps = array("q")
    with open(out + ".ready", "w"):
        pass
    window = _wait_go(go)
    if window is None:
        print(f"caller: no start signal in {go} within {GO_WAIT_S} s", file=sys.stderr)
        return 3
    start, end = window
    now = mono()
    if now > start + LATE_NS:
        print(
            f"caller: started {(now - start) / 1e6:.0f} ms after the common start", file=sys.stderr
        )
        return 3
    if start > now:
        time.sleep((start - now) / 1e9)
    while mono() < end:
        z = (rng.expovariate(1.0 / mean_s) if dist == "exp" else mean_s) if mean_s else 0.0
        if how == "sleep":
            if z:
                time.sleep(z)
        else:
            stop = mono() + int(z * 1e9)
            while mono() < stop:
                pass
        t0 = mono()
        call()
        t1 = mono()
        stamps.append(t0)
        stamps.append(t1)
        stamps.append(int(z * 1e9))
    with open(out, "wb") as f:
        stamps.tofile(f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
