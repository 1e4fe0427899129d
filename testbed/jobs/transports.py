"""``testbed bench --transports``: the forwarded round trip over each transport, next
to its physical reference in C.

In ``rounds`` interleaved rounds (the order rotates each round, so the machine's
drift hits every row alike), each of ``calls / rounds`` forwarded
``write(fd, buf, SIZE)`` calls through the real relay and a delegate of this
bench's own, over every transport available here:

  ipc          raw ZMTP spoken by relay and delegate over ``ipc://`` (a Unix stream socket)
  tcp          raw ZMTP over ``tcp://127.0.0.1`` (loopback)
  libzmq-tcp   libzmq at both ends over ``tcp://127.0.0.1`` (the relay with
               ``TESTBED_ZMTP=0``, the delegate with ``--transport libzmq``)
  shm          shared-memory rings, ``shm://`` (docs/wire.md)

and the C ping-pongs that carry the same bytes (the CALL frame out, a RESULT
frame back) with nothing else:

  unix-socket  a Unix stream socket pair, a forked echo server (``cref/tcprtt.c unix``)
  tcp-socket   loopback TCP, TCP_NODELAY (``cref/tcprtt.c``)
  futex        two threads pinned to two CPUs handing the bytes over in memory and
               waking each other with FUTEX_WAKE (``cref/futexrtt.c``), and the same
               with the client spinning: the references for shm

Each forwarded run is one ``testbed run`` (:func:`testbed.jobs.breakdown.forwarded_stages`:
the program times each call; relay and delegate CPU per call from schedstat).  The
rows' keys are the transport part of the mechanism label
(:func:`testbed.core.mechanisms.carrier`), checked against each run's ``run.json``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from testbed.core import rundir, wire, zmtp
from testbed.core.errors import TestbedError
from testbed.core.mechanisms import carrier, mechanism
from testbed.jobs import latency
from testbed.jobs.breakdown import _spread, cref_binary, forwarded_stages, time_ns_like
from testbed.jobs.localdelegate import LocalDelegate, ping

#: (key, what, delegate options, relay through libzmq, reference key, endpoint scheme)
TRANSPORTS = (
    ("ipc", "raw ZMTP, ipc://", ["--transport", "zmtp"], False, "unix-socket", "ipc"),
    ("tcp", "raw ZMTP, tcp:// loopback", ["--transport", "zmtp"], False, "tcp-socket", "tcp"),
    ("libzmq-tcp", "libzmq, tcp:// loopback", ["--transport", "libzmq"], True, "tcp-socket", "tcp"),
    ("shm", "shared-memory rings, shm://", [], False, "futex", "shm"),
)

#: (key, what, program, extra arguments)
REFERENCES = (
    ("unix-socket", "C Unix-socket ping-pong (cref/tcprtt.c unix)", "tcprtt", ["unix"]),
    ("tcp-socket", "C TCP ping-pong (cref/tcprtt.c)", "tcprtt", []),
    ("futex", "C futex ping-pong, 2 threads on 2 CPUs", "futexrtt", []),
    ("futex-spin", "the same, client spinning", "futexrtt", ["busy"]),
)

#: The transport a reference is the physical floor of, where the row name does not say it.
FLOOR_OF = {"futex": "shm", "futex-spin": "shm (a client that spins)"}


def _pcts(ns: list[np.ndarray]) -> dict[str, float]:
    us = np.concatenate(ns).astype(np.float64) / 1e3
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "n": int(us.size),
    }


def _c_rtt(exe: Path, n: int, req: int, resp: int, extra: list[str], tmp: Path) -> tuple:
    """One C reference run: its latencies (ns) and what it printed."""
    out = tmp / f"ref-{exe.name}.bin"
    res = subprocess.run([str(exe), str(n), str(req), str(resp), str(out), *extra],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    if res.returncode != 0:
        raise TestbedError(f"{exe.name} {' '.join(extra)} failed with status {res.returncode}")
    return latency.read_latencies(out, n), res.stdout.strip()


def frame_sizes(size: int) -> tuple[int, int]:
    """Bytes of the CALL frame of a ``write`` of ``size`` bytes and of its RESULT frame."""
    call = wire.encode_call(
        wire.Call(
            1, os.getpid(), latency.NR_WRITE, (3, 0, size, 0, 0, 0), ((1, bytes(size)),), "cost"
        )  # fmt: skip
    )
    result = wire.encode_result(wire.Result(2**20, 0, 0, *(time_ns_like(),) * 4, ()))
    return len(call), len(result)


def run_transports(n: int, size: int, rounds: int) -> dict:
    if rounds < 1 or n // rounds < 100:
        raise TestbedError("--rounds must be >= 1 with at least 100 calls per round")
    if zmtp.disabled_by_env():
        raise TestbedError(f"--transports measures raw ZMTP rows: unset {zmtp.ENV}=0")
    exe = latency.writeloop_binary()
    refs = {k: cref_binary(prog) for k, _w, prog, _x in REFERENCES}
    with tempfile.TemporaryDirectory(prefix="testbed-transports-") as t:
        tmp = Path(t)
        delegates = []
        for key, _what, opts, _lz, _ref, scheme in TRANSPORTS:
            delegates.append(LocalDelegate(opts, scheme=scheme))
            (tmp / key).mkdir()
        entered = []
        try:
            for d in delegates:
                entered.append(d.__enter__())
            return _rounds(exe, refs, n // rounds, size, rounds, delegates, tmp)
        finally:
            for d in reversed(entered):
                d.__exit__()


def _rounds(exe, refs, m, size, rounds, delegates, tmp) -> dict:
    req, resp = frame_sizes(size)
    lat: dict[str, list] = {k[0]: [] for k in (*TRANSPORTS, *REFERENCES)}  # keys all differ
    p50: dict[str, list] = {k: [] for k in lat}
    cpu = {k[0]: {"relay": [], "delegate": []} for k in TRANSPORTS}
    steps = [("fwd", i) for i in range(len(TRANSPORTS))]
    steps += [("ref", i) for i in range(len(REFERENCES))]
    printed: dict[str, str] = {}
    t0 = time.monotonic()
    for r in range(rounds):
        print(f"bench: transports round {r + 1}/{rounds} ({len(steps)} measurements x {m} calls, "
              f"{time.monotonic() - t0:.0f} s so far) ...", file=sys.stderr, flush=True)  # fmt: skip
        k = r % len(steps)
        for kind, i in steps[k:] + steps[:k]:  # rotate: no row always goes first
            if kind == "fwd":
                key, _what, _opts, libzmq, _ref, _scheme = TRANSPORTS[i]
                d = delegates[i]
                f = forwarded_stages(exe, m, size, d.endpoint, d.proc.pid, tmp / key, busy=False,
                                     libzmq=libzmq)  # fmt: skip
                got = f["lat"]
                cpu[key]["relay"].append(f["relay_cpu_us"])
                cpu[key]["delegate"].append(f["delegate_cpu_us"])
            else:
                key, _what, _prog, extra = REFERENCES[i]
                got, printed[key] = _c_rtt(refs[key], m, req, resp, extra, tmp)
            lat[key].append(got)
            p50[key].append(float(np.median(got)) / 1e3)
    out: dict = {"mode": "transports", "calls_per_round": m, "rounds": rounds, "size": size,
                 "frame_bytes": req, "result_bytes": resp, "transports": {},
                 "references": {}}  # fmt: skip
    for key, what, prog, extra in REFERENCES:
        out["references"][key] = {"what": what, "program": f"cref/{prog}.c", "args": extra,
                                  **_pcts(lat[key]), "p50_per_round_us": _spread(p50[key]),
                                  "reference_for": FLOOR_OF.get(key)}  # fmt: skip
        if printed.get(key, "").startswith("cpus="):
            out["references"][key]["cpus"] = printed[key][5:]
    for (key, what, _opts, _lz, ref, _scheme), d in zip(TRANSPORTS, delegates, strict=True):
        meta = rundir.load(sorted((tmp / key).glob("run-*"))[0]).meta
        got = carrier(meta.get("transport"), d.endpoint, bool(meta.get("curve")))
        if got != key:
            raise TestbedError(f"the {key} row's runs went over {got} (is TESTBED_ZMTP=0 set?)")
        row = {"what": what, "endpoint": d.endpoint, "mechanism": mechanism(meta),
               "relay_transport": meta.get("transport"),
               "delegate_transport": ping(d.endpoint).get("transport", "libzmq"),
               **_pcts(lat[key]), "p50_per_round_us": _spread(p50[key]),
               "relay_cpu_us": _spread(cpu[key]["relay"]),
               "delegate_cpu_us": _spread(cpu[key]["delegate"]), "reference": ref}  # fmt: skip
        row["ratio"] = row["p50_us"] / out["references"][ref]["p50_us"]
        row["ratio_per_round"] = _spread([a / b for a, b in zip(p50[key], p50[ref], strict=True)])
        out["transports"][key] = row
    return out


def format_transports(r: dict, host: dict) -> str:
    lines = [
        f"testbed bench --transports: {r['rounds']} interleaved rounds x {r['calls_per_round']} "
        f"forwarded write({r['size']} B) per transport; C references carry the same bytes "
        f"({r['frame_bytes']} B out, {r['result_bytes']} B back)",
        f"  kernel {host['kernel']}, {host['cores']} cores, {host['cpu_model']}",
        "  p50/p99 over every call of every round; CPU per forwarded call (µs): median over rounds",
        f"  {'forwarded, by transport':46s}{'p50':>9s}{'p99':>10s}{'relay CPU':>11s}"
        f"{'delegate CPU':>14s}   mechanism",
    ]
    for key, t in r["transports"].items():
        lines.append(
            f"  {key + ' (' + t['what'] + ')':46s}{t['p50_us']:7.2f}µs{t['p99_us']:8.2f}µs"
            f"{t['relay_cpu_us']['median']:9.2f}µs{t['delegate_cpu_us']['median']:12.2f}µs"
            f"   {t['mechanism']}"
        )
    lines.append(f"  {'C references':46s}{'p50':>9s}{'p99':>10s}")
    for ref in r["references"].values():
        note = f"  CPUs {ref['cpus']}" if ref.get("cpus") else ""
        if ref.get("reference_for"):
            note += f"  (reference for {ref['reference_for']})"
        lines.append(f"  {ref['what']:46s}{ref['p50_us']:7.2f}µs{ref['p99_us']:8.2f}µs{note}")
    lines.append(
        "  ratio of p50s, transport / its reference (per-round ratio median [min .. max]):"
    )
    for key, t in r["transports"].items():
        pr = t["ratio_per_round"]
        lines.append(
            f"    ratio {key + ' / ' + t['reference']:30s}{t['ratio']:7.2f}   "
            f"[{pr['min']:.2f} .. {pr['max']:.2f}]  (transport adds "
            f"{t['p50_us'] - r['references'][t['reference']]['p50_us']:.2f} µs p50)"
        )
    return "\n".join(lines)
