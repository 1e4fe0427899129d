"""CPU placement and CPU time of the processes of a run (interference made visible).

With two CPUs the program, the relay, the delegate and ZeroMQ's I/O threads
share them: a computing program delays the relay and the relay's wake-ups
delay the program.  Experiments record the CPU time of each process and,
where the node has enough CPUs, pin them apart (``sched_setaffinity``).
"""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import dataclass

from testbed.core import wire
from testbed.core.errors import TestbedError

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
    third (or the second when there are only two).

    Pinning needs two CPUs: with fewer, ``pin`` is refused (TestbedError)
    rather than silently measuring something other than what was asked.
    """
    cpus = sorted(available if available is not None else os.sched_getaffinity(0))
    if not pin:
        return Placement(None, None, None, "not pinned (plan pin: false)")
    if len(cpus) < 2:
        raise TestbedError(f"pin: true needs at least 2 CPUs to put the program apart from the "
                           f"relay; this node has {len(cpus)} available ({format_cpus(cpus)})")  # fmt: skip
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


# ---------------------------------------------------------------- a delegate's CPU time
#
# A delegate on another node (or namespace) cannot be read through /proc by
# the experiment, so it reports its own CPU time over the wire: the relay sends
# ``[2, "stats", {}]`` before launching the program and after it exits, and the
# delegate answers ``[2, "stats", process_stats(...)]``.
#
# Changelog of ``STATS_VERSION``:
#   1 - stats_version, host, pid, boot_id, cpu_user_s, cpu_sys_s (getrusage
#       RUSAGE_SELF: every thread of the delegate, ZeroMQ's I/O thread
#       included), cpus (its affinity), cpu_count, answered (calls answered
#       to all clients), client_calls (to the asking client) (2026-12).
STATS_VERSION = 1


def boot_id() -> str | None:
    """This kernel's boot id: equal on both sides exactly when they share the CPUs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def process_stats(answered: int, client_calls: int) -> dict:
    """The ``stats`` reply of a delegate process (version ``STATS_VERSION``)."""

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "stats_version": STATS_VERSION,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "boot_id": boot_id(),
        "cpu_user_s": ru.ru_utime,
        "cpu_sys_s": ru.ru_stime,
        "cpus": affinity(os.getpid()),
        "cpu_count": os.cpu_count(),
        "answered": int(answered),
        "client_calls": int(client_calls),
    }


def request_stats(sock, timeout_s: float = 1.0) -> dict:
    """Ask the delegate behind ``sock`` (a connected DEALER) for its stats.

    Frames that are not the answer (late results, a WELCOME after a
    reconnect) are skipped.  Returns the reply map, or ``{"error": reason}``
    when the delegate does not answer in time or does not know the request.
    """

    import zmq  # lazy: pyzmq; the kthread path reads CPU stats without it

    try:
        sock.send(wire.encode_stats({}), zmq.NOBLOCK)
    except zmq.ZMQError as exc:
        return {"error": f"cannot send the stats request: {exc}"}
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            break
        try:
            kind, payload = wire.decode(sock.recv(zmq.NOBLOCK))
        except (wire.WireError, zmq.Again):
            continue
        if kind == wire.STATS:
            if payload.get("stats_version") != STATS_VERSION:
                return {"error": f"stats version {payload.get('stats_version')!r} unknown"}
            return payload
        if kind == wire.ERROR and payload.call_id is None:
            return {"error": f"the delegate does not report stats ({payload})"}
    return {"error": f"no stats reply within {timeout_s:g} s"}


def delegate_cpu(start: dict, end: dict, program_cpus) -> dict:
    """The delegate's CPU time over one run from two ``stats`` replies.

    ``delegate_cpu_s`` is the whole delegate process (every client it served
    meanwhile); ``delegate_cpu_s_client`` is that time times this client's
    share of the calls answered meanwhile.  CPU sets are comparable only when
    both sides run on one kernel (same boot id): the same node, a network
    namespace of it, or a container.  On another kernel the delegate shares
    no CPU with the program.
    """
    bad = start.get("error") or end.get("error")
    if bad or start.get("pid") != end.get("pid"):
        return {"delegate_cpu_s": None, "delegate_stats_error": bad or "the delegate restarted"}
    cpu = (end["cpu_user_s"] + end["cpu_sys_s"]) - (start["cpu_user_s"] + start["cpu_sys_s"])
    answered = end["answered"] - start["answered"]
    mine = end["client_calls"] - start["client_calls"]
    same = start.get("boot_id") is not None and start.get("boot_id") == boot_id()
    dcpus = end.get("cpus")
    return {
        "delegate_cpu_s": cpu,
        "delegate_cpu_s_client": cpu * mine / answered if answered > 0 else 0.0,
        "delegate_calls_answered": answered,
        "delegate_calls_client": mine,
        "delegate_host": end.get("host"),
        "delegate_cpus": dcpus,
        "delegate_same_kernel": same,
        "delegate_shared_cpus": sorted(set(dcpus) & set(program_cpus))
        if same and dcpus and program_cpus
        else ([] if not same else None),
        "delegate_shares_program_cpus": shared(dcpus, program_cpus) if same else False,
    }


def cell_cpu(run_cpu: dict, local_cpus=None, local_cpu_s: float | None = None) -> dict:
    """``experiment.json["cpu"]`` of one forwarded run.

    ``run_cpu`` is run.json's ``cpu`` (the relay's rusage and, from the
    delegate's ``stats`` replies, the delegate's CPU time on any node);
    ``local_cpus`` / ``local_cpu_s`` are a local delegate's affinity and CPU
    time read through /proc, kept as a cross-check (``delegate_cpu_s_proc``)
    and used when the delegate sent no stats.
    """
    relay_cpus, program_cpus = run_cpu.get("relay_cpus"), run_cpu.get("program_cpus")
    relay_s = None
    if "relay_user_s" in run_cpu:
        relay_s = (run_cpu.get("relay_user_s") or 0.0) + (run_cpu.get("relay_sys_s") or 0.0)
    out = {
        "cpu_count": run_cpu.get("cpu_count", os.cpu_count()),
        "program_cpus": program_cpus,
        "relay_cpus": relay_cpus,
        "relay_cpu_s": relay_s,
        "relay_shares_program_cpus": shared(relay_cpus, program_cpus),
    }
    if run_cpu.get("delegate_cpu_s") is not None:
        keys = ("delegate_cpu_s", "delegate_cpu_s_client", "delegate_calls_answered",
                "delegate_calls_client", "delegate_host", "delegate_cpus", "delegate_same_kernel",
                "delegate_shared_cpus", "delegate_shares_program_cpus")  # fmt: skip
        out |= {k: run_cpu.get(k) for k in keys} | {"delegate_cpu_source": "stats"}
    else:
        out |= {
            "delegate_cpu_s": local_cpu_s,
            "delegate_cpus": local_cpus,
            "delegate_shared_cpus": sorted(set(local_cpus) & set(program_cpus))
            if local_cpus is not None and program_cpus
            else None,
            "delegate_shares_program_cpus": shared(local_cpus, program_cpus),
            "delegate_cpu_source": "/proc" if local_cpu_s is not None else None,
            "delegate_stats_error": run_cpu.get("delegate_stats_error"),
        }
    out["delegate_cpu_s_proc"] = local_cpu_s
    return out
