"""One caller of the contention load generator (run as a script, stdlib only).

    python3 -S -I caller.py START_NS END_NS THINK_US sleep|spin exp|fixed SEED OUT

Waits until START_NS (CLOCK_MONOTONIC), then until END_NS alternates a think
phase (mean THINK_US: ``sleep``, or ``spin`` computing; ``exp`` exponential
or ``fixed``) with one ``getppid`` system call, the call ``testbed
contention`` forwards.  Writes OUT: one ``<q t0, <q t1`` pair (ns before and
after the call) per call.  Exits 3 if it reached START_NS late (the machine
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


def main(argv: list[str]) -> int:
    try:
        start, end, think_us = int(argv[0]), int(argv[1]), float(argv[2])
        how, dist, seed, out = argv[3], argv[4], int(argv[5]), argv[6]
        if how not in ("sleep", "spin") or dist not in ("exp", "fixed") or think_us < 0:
            raise ValueError
    except (ValueError, IndexError):
        print(
            "usage: caller.py START_NS END_NS THINK_US sleep|spin exp|fixed SEED OUT",
            file=sys.stderr,
        )
        return 2
    mono = time.monotonic_ns
    rng = random.Random(seed)
    mean_s = think_us / 1e6
    call = os.getppid
    stamps = array("q")
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
    with open(out, "wb") as f:
        stamps.tofile(f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
