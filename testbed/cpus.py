"""CPU placement and CPU time of the processes of a run (interference made visible).

With two CPUs the program, the relay, the delegate and ZeroMQ's I/O threads
share them: a computing program delays the relay and the relay's wake-ups
delay the program.  Experiments record the CPU time of each process and,
where the node has enough CPUs, pin them apart (``sched_setaffinity``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Placement:
    """CPU sets of the program, the relay and a local delegate (None: not pinned)."""

    program: frozenset[int] | None
    relay: frozenset[int] | None
    delegate: frozenset[int] | None
    note: str

    def as_json(self) -> dict:
        def lst(s: frozenset[int] | None) -> list[int] | None:
            return sorted(s) if s is not None else None

        return {"program": lst(self.program), "relay": lst(self.relay),
                "delegate": lst(self.delegate), "note": self.note}  # fmt: skip


def placement(pin: bool, available: set[int] | None = None) -> Placement:
    """Program on the first CPU, relay on the second, a local delegate on the
    third (or the second when there are only two); unpinned with < 2 CPUs."""
    cpus = sorted(available if available is not None else os.sched_getaffinity(0))
    if not pin:
        return Placement(None, None, None, "not pinned (plan pin: false)")
    if len(cpus) < 2:
        return Placement(None, None, None, f"not pinned: only {len(cpus)} CPU available")
    delegate = cpus[2] if len(cpus) >= 3 else cpus[1]
    return Placement(frozenset({cpus[0]}), frozenset({cpus[1]}), frozenset({delegate}),
                     f"pinned on {len(cpus)} CPUs")  # fmt: skip


def parse_cpus(text: str) -> frozenset[int]:
    """``"0,2-3"`` -> {0, 2, 3} (the taskset -c list syntax)."""
    out: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list such as 0,2-3")
        out.update(range(int(lo), int(hi if sep else lo) + 1))
    return frozenset(out)


def format_cpus(cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def affinity(pid: int) -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return None


def proc_cpu_s(pid: int) -> float | None:
    """user + system CPU seconds of all threads of process ``pid`` (/proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    # fields[0] is field 3 (state): utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / _TICK


def shared(a, b) -> bool | None:
    """Whether two CPU sets overlap (None when one is unknown)."""
    if a is None or b is None:
        return None
    return bool(set(a) & set(b))
