"""Issue 12 item 6: our VM harness (``testbed.cluster.vm.run``) against virtme-ng, side by side.

    python3 -m venv /tmp/vng && /tmp/vng/bin/pip install virtme-ng
    PATH=$PATH:/tmp/vng/bin python3 benchmarks/vm_vs_vng.py [--rounds 3]

Boots Debian's kernel (``testbed.cluster.vm.find_kernel``) under TCG, alternating
``testbed.cluster.vm.run`` and ``vng --run IMAGE --disable-kvm --force-9p --cpus 2
--memory 2G --exec`` with the same command; no network in either guest.  The
command prints the guest's uptime when it starts and times
``python3 -c 'import numpy, testbed.core.rundir'`` (the start-up every
``testbed run`` in the in-guest payload pays).  Prints one host-stamped JSON
line per boot, then the median ratios vng / ours.  virtme-ng is not a
dependency of the testbed (docs/vm.md says why); install it only to re-measure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's packages

from testbed.cluster import vm  # noqa: E402
from testbed.core.errors import TestbedError  # noqa: E402
from testbed.core.hostinfo import host_metadata  # noqa: E402

FORMAT = 1  # output lines; 1 - first version
COMMAND = (
    "read up _ < /proc/uptime; echo GUEST_UPTIME $up; s=$(cut -d' ' -f1 /proc/uptime); "
    "{py} -c 'import numpy, testbed.core.rundir'; e=$(cut -d' ' -f1 /proc/uptime); echo PYIMPORT $s $e"
)


def _parse(output: str) -> tuple[float | None, float | None]:
    up = re.search(r"GUEST_UPTIME (\S+)", output)
    imp = re.search(r"PYIMPORT (\S+) (\S+)", output)
    return (
        float(up.group(1)) if up else None,
        float(imp.group(2)) - float(imp.group(1)) if imp else None,
    )


def boot(tool: str, kernel: vm.Kernel, vng: str, timeout: float) -> dict:
    command = COMMAND.format(py=sys.executable)
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    if tool == "ours":
        output = vm.run(command, timeout=timeout, cwd=str(REPO), kernel=kernel).output
    else:
        argv = [vng, "--run", str(kernel.image), "--disable-kvm", "--force-9p",
                "--cpus", "2", "--memory", "2G", "--exec", command]  # fmt: skip
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
    wall = time.monotonic() - t0
    uptime, imp = _parse(output)
    return {"tool": tool, "wall_s": round(wall, 1), "guest_uptime_at_command_s": uptime,
            "python_import_s": None if imp is None else round(imp, 1),
            "loadavg_1m_before": round(load, 2)}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args()
    vng = shutil.which("vng")
    if vng is None:
        print("testbed: error: vng not on PATH (pip install virtme-ng)", file=sys.stderr)
        return 2
    rows = []
    try:
        kernel = vm.ensure_packages()
        host = {**host_metadata(), "guest_kernel": kernel.version}
        for r in range(1, args.rounds + 1):
            for tool in ("ours", "vng"):
                row = {"format": FORMAT, "round": r, **boot(tool, kernel, vng, args.timeout)}
                print(json.dumps({**row, "host": host}), flush=True)
                rows.append(row)
    except (TestbedError, subprocess.TimeoutExpired) as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 1
    for key in ("wall_s", "guest_uptime_at_command_s", "python_import_s"):
        ratios = []
        for r in range(1, args.rounds + 1):
            ours, theirs = (next(x[key] for x in rows if x["round"] == r and x["tool"] == t)
                            for t in ("ours", "vng"))  # fmt: skip
            if ours and theirs:
                ratios.append(theirs / ours)
        if ratios:
            print(f"{key}: vng/ours median {statistics.median(ratios):.2f} "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
