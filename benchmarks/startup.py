"""How long ``testbed run`` takes before the program starts, against ``python3 -c pass``.

    python3 benchmarks/startup.py [--rounds R] [--json OUT]

In interleaved rounds (every kind once per round, in the same order), with a
delegate on loopback started once beforehand:

  pass      ``python3 -c pass``: an interpreter's start and exit (the reference)
  imports   ``python3 -c "import <the modules testbed run imports>"``: the
            interpreter plus the relay side's imports (CLI, run, relay, zmq)
  launcher  ``python3 -I -S -c pass``: the interpreter the seccomp launcher
            runs as (a plain stdlib file; it adds the filter and one execve)
  run       ``testbed run --forward getppid -- date +%s%N``: start-up is the
            program's own clock reading minus the time the command was started
            (``date`` execs in about a millisecond), total is to the exit

The interpreter is ``sys.executable`` everywhere (not a shell shim such as
pyenv's, which adds its own start-up to every kind alike).  Printed: median
and min-max over rounds of each kind, the start-up of ``testbed run`` as a
ratio to ``pass``, and what is left after imports and the launcher's
interpreter (connect, run directory, filter, hand-off).  Every number is
host-stamped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed.core.hostinfo import host_metadata
from testbed.jobs.localdelegate import LocalDelegate

PY = sys.executable
RUN_IMPORTS = "import testbed.cli, testbed.compute.run, testbed.compute.relay, zmq"


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _run(endpoint: str, out: Path) -> tuple[float, float]:
    """(start-up, total) seconds of one ``testbed run``."""
    argv = [PY, "-m", "testbed", "run", "--delegate", endpoint, "--forward", "getppid",
            "--quiet", "-o", str(out), "--", "date", "+%s%N"]  # fmt: skip
    t0_ns = time.time_ns()
    t0 = time.perf_counter()
    res = subprocess.run(argv, check=True, capture_output=True, text=True)
    total = time.perf_counter() - t0
    return (int(res.stdout.strip()) - t0_ns) / 1e9, total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    ap.add_argument("--json", type=Path, help="also write the raw times here")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    times: dict[str, list[float]] = {k: [] for k in ("pass", "imports", "launcher", "run", "total")}
    with LocalDelegate() as d, tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            times["pass"].append(_wall([PY, "-c", "pass"]))
            times["imports"].append(_wall([PY, "-c", RUN_IMPORTS]))
            times["launcher"].append(_wall([PY, "-I", "-S", "-c", "pass"]))
            start, total = _run(d.endpoint, Path(tmp) / f"r{i}")
            times["run"].append(start)
            times["total"].append(total)
            print(f"\rround {i + 1}/{args.rounds}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    host = host_metadata()
    print(f"host {host.get('hostname')} ({host.get('cpu_model', '?')}), {args.rounds} rounds, "
          f"loadavg {host.get('loadavg_1m', '?')}")  # fmt: skip
    labels = {"pass": "python3 -c pass", "imports": "  + testbed run's imports",
              "launcher": "python3 -I -S -c pass (launcher)",
              "run": "testbed run: program start - command start",
              "total": "testbed run: whole command (date as the program)"}  # fmt: skip
    for k, label in labels.items():
        v = times[k]
        print(f"{label:48s} {med[k] * 1e3:7.1f} ms  ({min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})")
    rest = med["run"] - med["imports"] - med["launcher"]
    print(f"{'start-up / python3 -c pass':48s} {med['run'] / med['pass']:7.2f}x")
    print(f"{'start-up - imports - launcher (setup, hand-off)':48s} {rest * 1e3:7.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"host": host, "times_s": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
