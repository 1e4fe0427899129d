"""The gain benchmark: the paper's synthetic workload of section IV (Figs. 12-13).

``gainbench GAMMA PHASES SAMPLES`` runs PHASES times a computation phase
(Monte Carlo pi over ``SAMPLES // GAMMA`` points: its time is divided by the
gain) followed by a fixed system-call phase with the mix :data:`MIX` (one
call type dominating, ``write``, and a tail of rarer ones, like bzip2 in the
paper's Fig. 12).  One line goes to stdout at the end (the pi estimate; it
depends on GAMMA only, so forwarded runs are compared byte for byte with
native ones).

The program is C without libc (``testbed/data/gainbench.c``, raw syscall
instructions, ``-nostdlib -static``), compiled on first use into a cache
directory, so it makes exactly the calls of its design: ``strace -c`` of it
equals :func:`expected_counts` (tested).  Where no C compiler is installed
the same benchmark runs as a Python script (``gainbench.py``, the same
mix; glibc makes its fstat a newfstatat), whose interpreter start-up adds its
own calls (openat, read, mmap, ...) on top of the design and whose computation is :data:`PY_SAMPLE_DIVISOR`
times smaller per sample; profiles and runs measure whatever runs, so the
model still applies, only the counts are no longer the design's alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from testbed.errors import TestbedError

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
    """``"1,2,4"`` -> ``[1, 2, 4]``; one clear error for anything else."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise TestbedError(
                f"gamma list {text!r}: {part!r} is not an integer (e.g. 1,2,4,8,16)"
            ) from None
        check_gamma(value)
        if value in out:
            raise TestbedError(f"gamma list {text!r}: {value} appears twice")
        out.append(value)
    return out


# ---------------------------------------------------------------- testbed gamma

#: The forwarded sets of the sweep: the paper's two policies and a read,write set.
DEFAULT_SETS = ("min-freq:20%", "max-freq:20%", "read,write")


def sweep_plan(
    gammas: list[int],
    repetitions: int = 3,
    phases: int = DEFAULT_PHASES,
    samples: int = DEFAULT_SAMPLES,
    sets: tuple[str, ...] | list[str] = DEFAULT_SETS,
    backend: str = "seccomp",
    pin: bool = False,
    name: str = "gamma",
) -> dict:
    """The plan (a mapping for ``testbed.experiment.parse_plan``) of the gain sweep."""
    forward = [s if ":" not in s else {"policy": s} for s in sets]
    return {
        "name": name,
        "repetitions": repetitions,
        "backend": backend,
        "pin": pin,
        "workloads": [
            {"name": "gain", "gamma": list(gammas), "phases": phases, "samples": samples}
        ],  # fmt: skip
        "forward": forward,
        "delegates": ["local"],
    }


def main_gamma(args) -> int:
    """``testbed gamma``: the whole gain sweep, then the report (Figs. 12-13)."""
    import json
    import socket

    from testbed import experiment

    gammas = parse_gammas(args.gammas)
    data = sweep_plan(gammas, args.repetitions, args.phases, args.samples,
                      args.forward or DEFAULT_SETS, args.backend, args.pin)  # fmt: skip
    plan = experiment.parse_plan(data, "gamma", "testbed gamma", args.delegate or None)
    results = Path(args.output).absolute()
    host = experiment.label(args.host_label or socket.gethostname())
    if args.check:
        print(json.dumps(plan.to_json(), indent=2))
        print(f"plan {plan.name}: valid, {len(experiment.cells(plan))} runs")
        return 0
    counts = experiment.run_plan(plan, results, host)
    print(f"gamma sweep: ran={counts['ran']} skipped={counts['skipped']} "
          f"failed={counts['failed']} results={results}")  # fmt: skip
    if args.report:
        from analysis.report import write_report

        report = write_report([results], args.report)
        head = report.read_text().split("\n## ", 1)[0].splitlines()
        for line in head:
            if line.startswith(("**Model accuracy", "- ")):
                print(line.replace("**", ""))
        print(f"report: {report}")
    return 1 if counts["failed"] else 0
