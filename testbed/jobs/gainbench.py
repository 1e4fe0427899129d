"""gainbench, the gain benchmark: the paper's synthetic workload of section IV (Figs. 12-13).

``gainbench GAMMA PHASES SAMPLES`` runs PHASES times a computation phase
(Monte Carlo pi over ``SAMPLES // GAMMA`` points: its time is divided by the
gain) followed by a fixed system-call phase with the mix :data:`MIX` (one
call type dominating, ``write``, and a tail of rarer ones, like bzip2 in the
paper's Fig. 12).  One line goes to stdout at the end (the pi estimate; it
depends on GAMMA only, so forwarded runs are compared byte for byte with
native ones).

The program is C without libc (``testbed/jobs/data/gainbench.c``, raw syscall
instructions, ``-nostdlib -static``), compiled on first use into a cache
directory, so it makes exactly the calls of its design: ``strace -c`` of it
equals :func:`expected_counts` (tested).  Where no C compiler is installed
the same benchmark runs as a Python script (``gainbench.py``, the same
mix; glibc makes its fstat a newfstatat), whose interpreter start-up adds its
own calls (openat, read, mmap, ...) on top of the design and whose computation is :data:`PY_SAMPLE_DIVISOR`
times smaller per sample; profiles and runs measure whatever runs, so the
model still applies, only the counts are no longer the design's alone.

In an experiment plan the benchmark is the workload ``gainbench`` (its runs
are ``gainbench-g<GAMMA>``); :mod:`testbed.jobs.gainbench_sweep` is
``testbed gainbench``, the whole sweep and its report.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from testbed.core import numbers
from testbed.core.errors import TestbedError

SOURCE = Path(__file__).resolve().parent / "data" / "gainbench.c"
PY_SOURCE = Path(__file__).resolve().parent / "data" / "gainbench.py"

#: System calls of one system-call phase, in the order they are made.  Write
#: sizes cycle 512, 1024, 2048, 4096 bytes (to /dev/null), reads are 4096
#: bytes from /dev/zero, lseek/fstat act on those fds.
MIX: dict[str, int] = {
    "write": 500,
    "lseek": 120,
    "read": 60,
    "fstat": 6,
    "getppid": 3,
    "uname": 1,
}
#: Calls made once per run: the exec, two openat and two close (the fds of the
#: phases) and one write of the result line to stdout.  exit_group ends the
#: run (strace -c does not list it: it never returns).
ONCE: dict[str, int] = {"execve": 1, "openat": 2, "close": 2, "write": 1}

#: The benchmark's workload name in a plan (runs ``gainbench-g<GAMMA>``), and
#: the name it had before, still accepted: a plan that says ``gain`` keeps its
#: run names ``gain-g<GAMMA>`` (so its results resume and analyse as before).
WORKLOAD = "gainbench"
OLD_WORKLOADS = ("gain",)

DEFAULT_PHASES = 10
#: Monte Carlo points per phase at gamma = 1: ~2.5 s of computation in all
#: on the project's 2-vCPU machine (about 4e8 points/s).
DEFAULT_SAMPLES = 100_000_000
#: The Python fallback computes this many times fewer points per phase.
PY_SAMPLE_DIVISOR = 100
MAX_GAMMA = 4096

_CFLAGS = ["-O2", "-static", "-nostdlib", "-fno-stack-protector", "-fno-builtin",
           "-fno-pie", "-no-pie", "-fno-asynchronous-unwind-tables"]  # fmt: skip


def expected_counts(phases: int = DEFAULT_PHASES, exit_group: bool = False) -> dict[str, int]:
    """The design: ``{syscall: n}`` of one run with ``phases`` phases (any gamma).

    ``exit_group``: count the final exit_group too (``testbed profile`` and a
    forwarded run see it; ``strace -c`` does not list it).
    """
    out = {name: k * phases for name, k in MIX.items()}
    for name, k in ONCE.items():
        out[name] = out.get(name, 0) + k
    if exit_group:
        out["exit_group"] = 1
    return out


def _defines() -> list[str]:
    return [f"-DN_{name.upper()}={k}" for name, k in MIX.items()]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "testbed"


def compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def build(cache: Path | None = None) -> Path | None:
    """Compile gainbench.c (once per source and flags); None without a C compiler.

    A compiler that fails is an error (a broken toolchain should not silently
    switch the benchmark to the fallback).
    """
    cc = compiler()
    if cc is None:
        return None
    flags = [*_CFLAGS, *_defines()]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    dirs = [cache] if cache else [cache_dir(), Path(tempfile.gettempdir()) / "testbed-cache"]
    for d in dirs:  # a read-only home (e.g. a VM guest on the host's root) falls back to /tmp
        if (d / f"gainbench-{key}").exists():
            return d / f"gainbench-{key}"
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".gainbench-", dir=d)
            os.close(fd)
            break
        except OSError as exc:
            err = f"cannot write the gain benchmark to {d}: {exc.strerror}"
    else:
        raise TestbedError(err)
    exe = d / f"gainbench-{key}"
    proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise TestbedError(f"compiling the gain benchmark with {cc} failed: {last}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, exe)
    return exe


def command(gamma: int, phases: int = DEFAULT_PHASES, samples: int = DEFAULT_SAMPLES,
            fallback: bool = False) -> list[str]:  # fmt: skip
    """argv of one gain-benchmark run (the C build, or the Python fallback)."""
    check_gamma(gamma)
    exe = None if fallback else build()
    if exe is not None:
        return [str(exe), str(gamma), str(phases), str(samples)]
    py_samples = max(samples // PY_SAMPLE_DIVISOR, 1)
    return [sys.executable, "-I", "-S", str(PY_SOURCE), str(gamma), str(phases), str(py_samples)]


def check_gamma(gamma: object) -> int:
    """A gain is an integer in 1..MAX_GAMMA (the benchmark divides integer work)."""
    if isinstance(gamma, bool) or not isinstance(gamma, int) or not 1 <= gamma <= MAX_GAMMA:
        raise TestbedError(f"gamma {gamma!r} is not an integer in 1..{MAX_GAMMA}")
    return gamma


def parse_gammas(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``, each a valid gain (:func:`check_gamma`), once;
    one clear error for anything else (:func:`testbed.core.numbers.parse_gammas`)."""
    return numbers.parse_gammas(text, integer=True, check=check_gamma)
