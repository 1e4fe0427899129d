"""``testbed bench --breakdown``: where a forwarded call's time goes, and the targets.

In ``rounds`` interleaved rounds (A B A B ..., so the machine's drift hits every
measurement alike), each of ``calls / rounds`` ``write(fd, buf, SIZE)`` calls:

  trap-only  Python (the relay's idle loop)  vs  C (``cref/trapcont.c``, SYNC_WAKE_UP)
  forwarded  ``testbed run`` sleeping and ``--busy-poll``  vs  raw ZeroMQ, same waiting
  raw ZMTP   the raw C client's frames on a plain TCP socket speaking ZMTP itself
             (:mod:`testbed.core.zmtp`): no libzmq, so no I/O thread, on the client's side
  raw C TCP  loopback round trip of the same sizes (``cref/tcprtt.c``), blocking and spinning

Per forwarded call, from the relay's records, its stage stamps
(``RunSpec.stage_trace``: ``testbed run --stage-trace``), the delegate's stamps and the
program's own call start/end (one clock: the delegate runs on this host), the
stages telescope to the round trip the program measured:

  trap       program enters write -> relay holds the notification
  marshal    -> about to send (read the buffer, encode)
  send       -> zmq send returned
  transport  -> reply received, less the delegate's residence (both ways, both I/O threads)
  delegate   delegate residence (d_recv -> d_send)
  decode     reply received -> decoded
  resume     -> the program is back from write (NOTIF_SEND and the caller's wake-up;
             with SYNC_WAKE_UP the caller often runs before NOTIF_SEND returns)
  record     NOTIF_SEND returned -> record written (after the resume: off the path)

Each call's stages add up exactly to its round trip; the medians add up to the
median within the spread.  A stage is wall time on a shared machine: when the
relay is preempted inside one (busy-polled, often by the ZeroMQ I/O thread its
send woke), that stage absorbs the next ("send" then holds most of "transport").

CPU per forwarded call, per thread group (schedstat): the relay's
(``run.json`` ``hot_path.thread_cpu_s``: from the program's launch to its exit,
the launch itself excluded) and the delegate's (before and after each run):
libzmq's I/O threads ("zmq") and the rest (the relay loop; the delegate's
serving thread, with its connection guard); and the raw C clients' own CPU per
round trip (libzmq's DEALER with its I/O thread, against raw ZMTP): what a
relay speaking ZMTP itself would save (docs/design-notes.md).

Each round runs the relay's C path (:mod:`testbed.compute.fastpath`, the default) and
its Python path (``TESTBED_FASTPATH=0``) side by side, in alternating order.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from testbed.compute import fastpath
from testbed.compute.spec import RunSpec
from testbed.core import rundir, wire, zmtp
from testbed.core.errors import TestbedError
from testbed.jobs import latency
from testbed.jobs.localdelegate import LocalDelegate, ping

CREF = Path(__file__).with_name("cref")
STAGES = ("trap", "marshal", "send", "transport", "delegate", "decode", "resume")
OFF_PATH = ("record",)


def cref_binary(name: str) -> Path:
    return latency.compile_c(name, (CREF / f"{name}.c").read_text())


def _run_c(args: list[str]) -> str:
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise TestbedError(f"{Path(args[0]).name} failed with status {res.returncode}")
    return res.stdout


def trap_c(exe: Path, n: int, size: int, tmp: Path) -> tuple[np.ndarray, bool]:
    out = tmp / "trapc.bin"
    text = _run_c([str(exe), str(n), str(size), str(out)])
    return latency.read_latencies(out, n), "sync_wakeup=1" in text


def tcp_c(exe: Path, n: int, req: int, resp: int, busy: bool, tmp: Path) -> np.ndarray:
    out = tmp / "tcp.bin"
    _run_c([str(exe), str(n), str(req), str(resp), str(out), *(["busy"] if busy else [])])
    return latency.read_latencies(out, n)


def forwarded_stages(
    exe: Path,
    n: int,
    size: int,
    endpoint: str,
    delegate_pid: int | None,
    tmp: Path,
    busy: bool,
    python_path: bool = False,
    libzmq: bool = False,
) -> dict:
    """One ``testbed run`` of the write loop; per-call stages (ns) and CPU per call.

    ``python_path``: with the relay's C path turned off (:data:`testbed.compute.fastpath.ENV`);
    ``libzmq``: the relay's connection through libzmq (:data:`testbed.core.zmtp.ENV`).
    """
    tag = ("busy" if busy else "sleep") + ("-py" if python_path else "")
    out, starts, trace = tmp / f"fwd-{tag}.bin", tmp / f"start-{tag}.bin", tmp / f"st-{tag}.bin"
    run_dir = tmp / f"run-{tag}-{os.urandom(4).hex()}"
    spec = RunSpec((str(exe), str(n), str(size), str(out), str(starts)), delegate=endpoint,
                   forward="write", output=run_dir, busy_poll=busy, stage_trace=trace)  # fmt: skip
    cmd = [sys.executable, "-m", "testbed", "run", "--quiet", *spec.to_argv()]
    d0 = fastpath.thread_cpu_ns(delegate_pid) if delegate_pid else {}
    env = dict(os.environ)
    if python_path:
        env[fastpath.ENV] = "0"
    if libzmq:
        env[zmtp.ENV] = "0"
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    d1 = fastpath.cpu_since(d0, delegate_pid) if delegate_pid else {}
    if res.returncode != 0:
        raise TestbedError(f"forwarded run failed: {res.stderr.strip().splitlines()[-1:]}")
    run = rundir.load(run_dir)
    recs = run.calls()
    st = np.fromfile(trace, dtype=np.int64).reshape(-1, 3)
    if len(recs) < n or len(st) != len(recs):
        raise TestbedError(
            f"forwarded run left {len(recs)} records, {len(st)} stage stamps; expected {n}"
        )
    if run.meta["calls"]["faults"]:
        raise TestbedError(f"{run.meta['calls']['faults']} forwarded calls faulted")
    r, s = recs[:n], st[:n]
    lat = latency.read_latencies(out, n).astype(np.int64)
    p0 = np.fromfile(starts, dtype="<u8").astype(np.int64)
    t_sent, t_dec, t_rec = s[:, 0], s[:, 1], s[:, 2]
    residence = r["d_send"] - r["d_recv"]
    stages = {
        "trap": r["t_trap"] - p0,
        "marshal": r["t_send"] - r["t_trap"],
        "send": t_sent - r["t_send"],
        "transport": (r["t_reply"] - t_sent) - residence,
        "delegate": residence,
        "decode": t_dec - r["t_reply"],
        "resume": p0 + lat - t_dec,
        "record": t_rec - r["t_resume"],
    }
    count = run.meta["calls"]["count"]
    threads = run.meta["hot_path"]["thread_cpu_s"]  # the program's lifetime, launch excluded
    nan = float("nan")
    return {
        "lat": lat,
        "stages": stages,
        "c_share": run.meta["hot_path"]["c_calls"] / count if count else 0.0,
        "relay_cpu_us": sum(threads.values()) * 1e6 / count,
        "relay_main_us": threads.get("main", nan) * 1e6 / count,
        "relay_zmq_us": threads.get("zmq", 0.0) * 1e6 / count,  # none: raw ZMTP (zmtp.Dealer)
        "delegate_cpu_us": sum(d1.values()) * 1e6 / count if d1 else nan,
        "delegate_serve_us": (sum(d1.values()) - d1.get("zmq", 0.0)) * 1e6 / count if d1 else nan,
        "delegate_zmq_us": d1.get("zmq", 0.0) * 1e6 / count if d1 else nan,
    }


def _p50(a: np.ndarray) -> float:
    return float(np.median(a)) / 1e3


def _spread(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def run_breakdown(endpoint: str | None, n: int, size: int, rounds: int) -> dict:
    if rounds < 1 or n // rounds < 100:
        raise TestbedError("--rounds must be >= 1 with at least 100 calls per round")
    exe = latency.writeloop_binary()
    trap_exe, tcp_exe = cref_binary("trapcont"), cref_binary("tcprtt")
    with tempfile.TemporaryDirectory(prefix="testbed-breakdown-") as t:
        tmp = Path(t)
        if endpoint is None:
            # the delegate as it comes (raw ZMTP unless TESTBED_ZMTP=0), and one through
            # libzmq for the baselines: the relay and delegate as they were before
            with LocalDelegate() as d, LocalDelegate(["--transport", "libzmq"]) as b:
                return _rounds(exe, trap_exe, tcp_exe, n // rounds, size, rounds, d.endpoint,
                               d.proc.pid, tmp, base=(b.endpoint, b.proc.pid))  # fmt: skip
        return _rounds(exe, trap_exe, tcp_exe, n // rounds, size, rounds, endpoint, None, tmp)


#: Baselines for the CPU target: (tag, Python path) through libzmq on both ends
#: (a ``--transport libzmq`` delegate, ``TESTBED_ZMTP=0`` relay).  "filed" is
#: the code as issue 14 found it (the relay in Python); "libzmq" its C path.
BASELINES = (("libzmq", False), ("filed", True))


def _rounds(exe, trap_exe, tcp_exe, m, size, rounds, endpoint, dpid, tmp, base=None) -> dict:
    result_bytes = len(wire.encode_result(wire.Result(2**20, 0, 0, *(time_ns_like(),) * 4, ())))
    per: dict[str, list] = {"trap_py": [], "trap_fast": [], "trap_c": []}
    for key in ("", "_busy"):
        for k in ("raw_zmq", "raw_zmq_c", "raw_zmtp_c", "fwd", "fwd_py", "tcp_c"):
            per[k + key] = []
    # the raw C clients' own CPU per round trip (this process: its thread, libzmq's)
    client_cpu = {c + key: {"main": [], "zmq": []} for c in ("zmq_c", "zmtp_c")
                  for key in ("", "_busy")}  # fmt: skip
    tags = ("sleep", "busy", "sleep-py", "busy-py")
    base_tags = tuple(f"{w}-{b}" for w in ("sleep", "busy") for b, _py in BASELINES) if base else ()
    stages: dict[str, dict[str, list]] = {t: {} for t in tags}
    parts = ("relay", "relay_main", "relay_zmq", "delegate", "delegate_serve", "delegate_zmq")
    cpu: dict[str, dict[str, list]] = {t: {k: [] for k in (*parts, "c_share")}
                                       for t in (*tags, *base_tags)}  # fmt: skip
    base_p50: dict[str, list] = {t: [] for t in base_tags}
    totals: dict[str, list] = {t: [] for t in tags}
    sync = False
    frame_bytes = 0
    for r in range(rounds):
        print(f"bench: breakdown round {r + 1}/{rounds} ...", file=sys.stderr, flush=True)
        # A B A B: alternate which path goes first, so drift does not favour one
        order = (False, True) if r % 2 == 0 else (True, False)
        for c_path in order:
            lat, _ = latency.trap_only_lat(exe, m, size, tmp, c_path=c_path)
            per["trap_fast" if c_path else "trap_py"].append(_p50(lat))
        lat, sync = trap_c(trap_exe, m, size, tmp)
        per["trap_c"].append(_p50(lat))
        for busy, key in ((False, ""), (True, "_busy")):
            for c_client in order:
                before = fastpath.thread_cpu_ns()
                lat, frame_bytes = latency.raw_zmq_lat(endpoint, m, size, busy, c_client=c_client)
                per[("raw_zmq_c" if c_client else "raw_zmq") + key].append(_p50(lat))
                if c_client:
                    _client_cpu(client_cpu["zmq_c" + key], before, m)
            before = fastpath.thread_cpu_ns()
            per["raw_zmtp_c" + key].append(_p50(latency.raw_zmtp_lat(endpoint, m, size, busy)))
            _client_cpu(client_cpu["zmtp_c" + key], before, m)
            for py in (not o for o in order):
                tag = ("busy" if busy else "sleep") + ("-py" if py else "")
                f = forwarded_stages(exe, m, size, endpoint, dpid, tmp, busy, python_path=py)
                per[("fwd_py" if py else "fwd") + key].append(_p50(f["lat"]))
                totals[tag].append(f["lat"])
                for name, arr in f["stages"].items():
                    stages[tag].setdefault(name, []).append(arr)
                _add_cpu(cpu[tag], f)
            for name, py in BASELINES if base else ():
                tag = ("busy-" if busy else "sleep-") + name
                f = forwarded_stages(exe, m, size, base[0], base[1], tmp, busy, python_path=py,
                                     libzmq=True)  # fmt: skip
                base_p50[tag].append(_p50(f["lat"]))
                _add_cpu(cpu[tag], f)
            per["tcp_c" + key].append(_p50(tcp_c(tcp_exe, m, frame_bytes, result_bytes, busy, tmp)))
    out: dict = {"calls_per_round": m, "rounds": rounds, "size": size, "endpoint": endpoint,
                 "relay_transport": zmtp.transport(endpoint),  # the forwarded rows' (run.json)
                 "delegate_transport": ping(endpoint).get("transport", "libzmq"),  # (WELCOME)
                 "sync_wakeup": sync, "frame_bytes": frame_bytes, "result_bytes": result_bytes,
                 "p50_us": {k: _spread(v) for k, v in per.items()},
                 "client_cpu_us": {c: {k: _spread(v) for k, v in parts_.items()}
                                   for c, parts_ in client_cpu.items()}}  # fmt: skip

    def diff(a: str, b: str) -> dict[str, float]:
        return _spread([x - y for x, y in zip(per[a], per[b], strict=True)])

    def ratio(a: list, b: list) -> dict[str, float]:
        return _spread([x / y for x, y in zip(a, b, strict=True)])

    out["targets"] = {
        "trap_fast_over_c": ratio(per["trap_fast"], per["trap_c"]),
        "trap_py_over_c": ratio(per["trap_py"], per["trap_c"]),
        "fwd_minus_zmq": diff("fwd", "raw_zmq"),
        "fwd_minus_zmq_busy": diff("fwd_busy", "raw_zmq_busy"),
        "fwd_minus_zmq_c": diff("fwd", "raw_zmq_c"),
        "fwd_minus_zmq_c_busy": diff("fwd_busy", "raw_zmq_c_busy"),
        "fwd_py_minus_zmq": diff("fwd_py", "raw_zmq"),
        "fwd_py_minus_zmq_busy": diff("fwd_py_busy", "raw_zmq_busy"),
        "fwd_minus_tcp": diff("fwd", "tcp_c"),
        "fwd_minus_tcp_busy": diff("fwd_busy", "tcp_c_busy"),
        "zmq_c_minus_tcp": diff("raw_zmq_c", "tcp_c"),
        "zmq_minus_tcp": diff("raw_zmq", "tcp_c"),
        "zmtp_c_minus_zmq_c": diff("raw_zmtp_c", "raw_zmq_c"),
        "zmtp_c_minus_zmq_c_busy": diff("raw_zmtp_c_busy", "raw_zmq_c_busy"),
        "zmtp_c_minus_tcp": diff("raw_zmtp_c", "tcp_c"),
    }
    for key in ("", "_busy"):
        zmq_total = [a + b for a, b in zip(client_cpu["zmq_c" + key]["main"],
                                           client_cpu["zmq_c" + key]["zmq"], strict=True)]  # fmt: skip
        out["targets"]["client_cpu_zmtp_over_zmq" + key] = ratio(
            client_cpu["zmtp_c" + key]["main"], zmq_total
        )
    for w in ("sleep", "busy"):
        for k in ("relay", "delegate"):
            out["targets"][f"{k}_cpu_c_over_py_{w}"] = ratio(cpu[w][k], cpu[w + "-py"][k])

    def both(tag: str) -> list[float]:
        return [a + b for a, b in zip(cpu[tag]["relay"], cpu[tag]["delegate"], strict=True)]

    out["baselines"] = {}
    for tag in base_tags:
        w, name = tag.split("-")
        out["targets"][f"cpu_over_{name}_{w}"] = ratio(both(w), both(tag))
        out["baselines"][tag] = {"p50_us": _spread(base_p50[tag]),
                                 "c_share": _spread(cpu[tag]["c_share"]),
                                 **{_cpu_key(k): _spread(cpu[tag][k]) for k in parts}}  # fmt: skip
    out["stages"] = {}
    for tag in tags:
        total = np.concatenate(totals[tag]) / 1e3
        med = {k: float(np.median(np.concatenate(v))) / 1e3 for k, v in stages[tag].items()}
        out["stages"][tag] = {
            "median_us": med,
            "sum_of_medians_us": sum(med[k] for k in STAGES),
            "round_trip_p50_us": float(np.median(total)),
            "round_trip_p25_us": float(np.percentile(total, 25)),
            "round_trip_p75_us": float(np.percentile(total, 75)),
            "round_trip_p10_us": float(np.percentile(total, 10)),
            "round_trip_p90_us": float(np.percentile(total, 90)),
            **{_cpu_key(k): _spread(cpu[tag][k]) for k in parts},
            "c_share": _spread(cpu[tag]["c_share"]),
        }
    return out


def _add_cpu(into: dict[str, list], f: dict) -> None:
    """Add one forwarded run's CPU per call (each part) and C-path share to ``into``."""
    for k in into:
        into[k].append(f["c_share"] if k == "c_share" else f[_cpu_key(k)])


def _client_cpu(into: dict[str, list], before: dict[str, int], calls: int) -> None:
    """Add this process's CPU since ``before``, µs per round trip: its main thread's
    and libzmq's I/O thread's."""
    cpu = fastpath.cpu_since(before)
    into["main"].append(cpu.get("main", 0.0) / calls * 1e6)
    into["zmq"].append(cpu.get("zmq", 0.0) / calls * 1e6)


def _cpu_key(part: str) -> str:
    return part + ("_us" if "_" in part else "_cpu_us")


def time_ns_like() -> int:
    """A timestamp of today's magnitude (sizes the RESULT frame like a real one)."""
    return int(1e15)


def _fmt(s: dict, unit: str = "µs", sign: bool = False) -> str:
    f = "+.2f" if sign else ".2f"
    return f"{s['median']:{f}} {unit} [{s['min']:{f}} .. {s['max']:{f}}]"


def format_breakdown(r: dict, host: dict) -> str:
    p = r["p50_us"]
    t = r["targets"]
    lines = [
        f"testbed bench --breakdown: {r['rounds']} interleaved rounds x {r['calls_per_round']} "
        f"x write({r['size']} B) on {r['endpoint']}, relay transport {r['relay_transport']}, delegate transport "
        f"{r['delegate_transport']}",
        f"  kernel {host['kernel']}, {host['cores']} cores, {host['cpu_model']}, "
        f"SYNC_WAKE_UP {'yes' if r['sync_wakeup'] else 'no'}; frames {r['frame_bytes']} B out, "
        f"{r['result_bytes']} B back",
        "  p50 per round: median [min .. max] over rounds",
    ]
    labels = [("trap_fast", "trap-only, relay C path"), ("trap_py", "trap-only, relay Python path"),
              ("trap_c", "trap-only, C (cref/trapcont.c)")]  # fmt: skip
    for key, what in (("", "sleeping"), ("_busy", "busy-polled")):
        labels += [(f"raw_zmq_c{key}", f"raw ZeroMQ from C, {what}"),
                   (f"raw_zmtp_c{key}", f"raw ZMTP from C (no libzmq), {what}"),
                   (f"raw_zmq{key}", f"raw ZeroMQ from Python, {what}"),
                   (f"fwd{key}", f"forwarded, C path, {what}"),
                   (f"fwd_py{key}", f"forwarded, Python path, {what}"),
                   (f"tcp_c{key}", "raw C TCP (cref/tcprtt.c)" + (", spinning" if key else ""))]  # fmt: skip
    for key, label in labels:
        lines.append(f"    {label:42s}{_fmt(p[key])}")
    lines += [
        "  targets (per-round ratio or difference, median [min .. max]):",
        f"    trap-only relay C path / C ref       {_fmt(t['trap_fast_over_c'], 'x')}   (target <= 1.5x)",
        f"    trap-only relay Python path / C ref  {_fmt(t['trap_py_over_c'], 'x')}",
        f"    forwarded - raw ZeroMQ, sleeping     {_fmt(t['fwd_minus_zmq'], 'µs', True)}   (target <= +15 µs)",
        f"    forwarded - raw ZeroMQ, busy-poll    {_fmt(t['fwd_minus_zmq_busy'], 'µs', True)}   (target <= +15 µs)",
        f"    forwarded - raw ZeroMQ from C, sleep {_fmt(t['fwd_minus_zmq_c'], 'µs', True)}",
        f"    forwarded - raw ZeroMQ from C, busy  {_fmt(t['fwd_minus_zmq_c_busy'], 'µs', True)}",
        f"    Python path - raw ZeroMQ, sleeping   {_fmt(t['fwd_py_minus_zmq'], 'µs', True)}",
        f"    Python path - raw ZeroMQ, busy-poll  {_fmt(t['fwd_py_minus_zmq_busy'], 'µs', True)}",
        f"    forwarded - raw C TCP, sleeping      {_fmt(t['fwd_minus_tcp'], 'µs', True)}",
        f"    forwarded - raw C TCP, busy/spin     {_fmt(t['fwd_minus_tcp_busy'], 'µs', True)}",
        f"    raw ZeroMQ from C - raw C TCP        {_fmt(t['zmq_c_minus_tcp'], 'µs', True)}   (the transport's own share)",
        f"    raw ZMTP from C - raw ZeroMQ from C  {_fmt(t['zmtp_c_minus_zmq_c'], 'µs', True)}   (sleeping; libzmq off the client)",
        f"    the same, busy-polled                {_fmt(t['zmtp_c_minus_zmq_c_busy'], 'µs', True)}",
        f"    raw ZMTP from C - raw C TCP          {_fmt(t['zmtp_c_minus_tcp'], 'µs', True)}   (what the delegate adds to a C echo)",
        f"    relay CPU/call C / Python, sleeping  {_fmt(t['relay_cpu_c_over_py_sleep'], 'x')}   (target <= 0.5x)",
        f"    relay CPU/call C / Python, busy-poll {_fmt(t['relay_cpu_c_over_py_busy'], 'x')}",
        "  stages of a forwarded call, median µs over all rounds",
        "    (C path sleeping | busy-poll | Python path sleeping | busy-poll):",
    ]  # fmt: skip
    st = r["stages"]
    tags = ("sleep", "busy", "sleep-py", "busy-py")
    for k in (*STAGES, *OFF_PATH):
        note = "  (after the resume: off the caller's path)" if k in OFF_PATH else ""
        row = " | ".join(f"{st[g]['median_us'][k]:8.2f}" for g in tags)
        lines.append(f"    {k:12s}{row}{note}")
    for g in tags:
        s = st[g]
        lines.append(
            f"    {g:9s}: stages sum {s['sum_of_medians_us']:.2f} µs, round trip p50 "
            f"{s['round_trip_p50_us']:.2f} µs (p10..p90 {s['round_trip_p10_us']:.2f}.."
            f"{s['round_trip_p90_us']:.2f}), calls served by C {s['c_share']['median']:.1%}"
        )
    cc = r["client_cpu_us"]
    lines.append("  client CPU per raw round trip, µs (median [min .. max] over rounds):")
    for key, what in (("", "sleeping"), ("_busy", "busy-polled")):
        z, m = cc["zmq_c" + key], cc["zmtp_c" + key]
        lines.append(
            f"    {what:11s} ZeroMQ from C {z['main']['median']:.1f} + libzmq {z['zmq']['median']:.1f};"
            f" ZMTP from C {_fmt(m['main'])}; ratio {_fmt(t['client_cpu_zmtp_over_zmq' + key], 'x')}"
        )
    lines.append("  CPU per forwarded call, µs (median [min .. max] over rounds):")
    for g, s in (*((g, st[g]) for g in tags), *r.get("baselines", {}).items()):
        lines.append(
            f"    {g:9s} relay {_fmt(s['relay_cpu_us'])} (main {s['relay_main_us']['median']:.1f}"
            f" + libzmq {s['relay_zmq_us']['median']:.1f}), delegate "
            f"{_fmt(s['delegate_cpu_us'])} (serving {s['delegate_serve_us']['median']:.1f}"
            f" + libzmq {s['delegate_zmq_us']['median']:.1f})"
        )
    if r.get("baselines"):
        d = r["delegate_transport"]
        lines += [
            "    (sleep-libzmq, busy-libzmq: C path, libzmq on both ends; sleep-filed, busy-filed:",
            "     Python path, libzmq on both ends, as issue 14 found them)",
            f"  relay + delegate CPU per call, delegate transport {d} / baseline (per round):",
        ]
        for w, what in (("sleep", "sleeping"), ("busy", "busy-poll")):
            lines.append(f"    / as filed, {what:9s}  {_fmt(t[f'cpu_over_filed_{w}'], 'x')}"
                         f"   (target <= 0.5x)")  # fmt: skip
            lines.append(f"    / C path + libzmq, {what:9s} {_fmt(t[f'cpu_over_libzmq_{w}'], 'x')}")
    else:
        lines.append("  (no baselines: they need the bench's own delegates, not --delegate)")
    return "\n".join(lines)
