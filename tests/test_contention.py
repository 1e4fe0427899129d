"""testbed contention + the delegate's queue: real callers, real relays, one delegate."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zmq

from analysis import contention
from testbed.core import queue_record, rundir, wire
from testbed.core.sweep_record import CELL_JSON, load_cycles
from testbed.delegate import service
from testbed.delegate.daemon import Delegate
from tests.conftest import PY, REPO, run_testbed


def _one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.decode() if isinstance(proc.stderr, bytes) else proc.stderr
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workers", "0"], "workers must be >= 1"),
        (["--service-us", "-5"], "service time must be > 0"),
        (["--think-us", "-1"], "think time must be >= 0"),
        (["--callers", "1,x"], "not a comma-separated list"),
        (["--callers", "100000"], "this machine can start at most"),
        (["--duration", "-2"], "duration > 0"),
    ],
)
def test_bad_sweep_input_is_one_clear_line(tmp_path, args, message):
    base = {"--callers": "1", "--workers": "1", "--service-us": "100", "--think-us": "100"}
    for k, v in zip(args[::2], args[1::2], strict=True):
        base[k] = v
    argv = ["contention", "-o", str(tmp_path / "out")] + [x for kv in base.items() for x in kv]
    line = _one_error_line(run_testbed(*argv, text=True))
    assert message in line
    assert not (tmp_path / "out").exists()  # nothing started


def test_delegate_rejects_a_negative_service_time():
    proc = run_testbed("delegate", "--listen", "tcp://127.0.0.1:1", "--service-us", "-1", text=True)
    assert proc.returncode == 2 and "--service-us" in proc.stderr and "Traceback" not in proc.stderr


def test_caller_script_refuses_bad_arguments_and_a_late_start(tmp_path):
    import subprocess

    caller = str(REPO / "testbed" / "jobs" / "caller.py")
    bad = subprocess.run([PY, "-S", "-I", caller, "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    now = time.monotonic_ns()
    (tmp_path / "go").write_text(f"{now - 10**9} {now}\n")
    late = subprocess.run([PY, "-S", "-I", caller, str(tmp_path / "go"), "0", "sleep",
                           "exp", "1", str(tmp_path / "o")], capture_output=True, text=True)  # fmt: skip
    assert late.returncode == 3 and "after the common start" in late.stderr


def test_queued_delegate_serves_first_come_first_served_with_w_servers():
    """Four calls arriving together at W = 2: the third and fourth start only when a
    server is free, in arrival order; d_recv in the reply is the recorded receipt."""
    svc = service.Service(20_000, kind="sleep", dist="fixed")
    d = Delegate("tcp://127.0.0.1:*", workers=2, service=svc).start()
    ctx = zmq.Context()
    try:
        socks = []
        for _ in range(4):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.bound_endpoint)
            socks.append(s)
        for i, s in enumerate(socks):
            s.send(wire.encode_call(wire.Call(i, 1, 110, (0,) * 6, (), "cost")))
        results = []
        for s in socks:
            assert s.poll(10_000)
            kind, res = wire.decode(s.recv())
            assert kind == wire.RESULT
            results.append(res)
    finally:
        for s in socks:
            s.close()
        ctx.term()
        d.stop()
    rec = np.sort(svc.records(), order="t_recv")
    assert rec.size == 4
    assert sorted(r.t_recv for r in results) == sorted(rec["t_recv"].tolist())
    assert set(rec["worker"].tolist()) == {0, 1}
    # FIFO with two servers: calls 3 and 4 start after the first two have ended
    first_end = np.sort(rec["t_end"][:2])
    assert rec["t_start"][2] >= first_end[0] and rec["t_start"][3] >= first_end[1]
    assert list(rec["queue"]) == [0, 1, 2, 3] or rec["queue"][-1] >= 2
    s = queue_record.summarize(rec, 2)
    assert s["calls"] == 4 and s["wait_mean_us"] > 0


def test_short_sweep_runs_end_to_end_and_is_analysed(tmp_path):
    out = tmp_path / "sweep"
    proc = run_testbed("contention", "--callers", "1,4", "--workers", "1", "--service-us", "500",
                       "--think-us", "2000", "--duration", "1.5", "--warmup", "0.3",
                       "-o", str(out), text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # order: the fit cell, a single-caller reference, the N = 4 cell, a reference
    for k, name in enumerate(("W1-N1", "W1-N1-r0", "W1-N4", "W1-N1-r1"), 1):
        assert f"[{k}/4] {name}: X " in proc.stderr
    starts = [json.loads((out / c / CELL_JSON).read_text())["start_ns"]
              for c in ("W1-N1", "W1-N1-r0", "W1-N4", "W1-N1-r1")]  # fmt: skip
    assert starts == sorted(starts)
    assert json.loads((out / "W1-N1-r0" / CELL_JSON).read_text())["reference"] is True
    for n in (1, 4):
        cell = out / f"W1-N{n}"
        meta = json.loads((cell / CELL_JSON).read_text())
        cyc = load_cycles(cell)
        assert len(cyc) == n
        forwarded = 0
        for i, c in enumerate(cyc):
            run = rundir.load(cell / "callers" / f"c{i:03d}")
            assert run.meta["exit_status"] == 0 and run.meta["calls"]["faults"] == 0
            assert run.meta["forwarded"] == ["getppid"]
            assert run.meta["calls"]["count"] == len(c) > 0  # every call of the loop forwarded
            forwarded += len(c)
        dmeta, rec = queue_record.load_record(cell / "delegate")
        assert rec.size == forwarded  # the delegate served each forwarded call once
        assert np.all(rec["t_end"] - rec["t_start"] >= rec["drawn"])  # served at least the draw
        assert abs(rec["drawn"].mean() / 500e3 - 1) < 0.5  # exponential draws, mean 500 µs
        assert dmeta["delegate"]["workers"] == 1 and dmeta["service"] == "sleep"
        s = meta["summary"]
        if n == 1:
            assert s["delegate"]["found_mean"] == 0  # a lone caller never finds a queue
        else:
            assert s["delegate"]["found_mean"] > 0
        # operational laws on the measured window: U = X S / W, queue = X wait
        dd = s["delegate"]
        assert dd["utilisation"] == pytest.approx(
            s["X_per_s"] * dd["service_mean_us"] / 1e6, rel=0.15
        )
        assert dd["queue_mean"] == pytest.approx(
            s["X_per_s"] * dd["wait_mean_us"] / 1e6, rel=0.15, abs=0.01
        )
    rep = run_testbed("analyze", str(out), "-o", str(tmp_path / "report"), text=True)
    assert rep.returncode == 0, rep.stderr
    text = (tmp_path / "report" / "contention.md").read_text()
    assert "Prediction error per (N, W)" in text
    for f in ("contention_response.png", "contention_throughput.png", "contention_speedup.png"):
        assert (tmp_path / "report" / "figures" / f).stat().st_size > 0
    cells = contention.load_sweep(out)
    df = contention.predict(cells, contention.fit(cells))
    assert sorted(df["N"]) == [1, 4]  # reference cells feed the fit, not the table
    ones = cells[cells["N"] == 1]
    st = contention.fit(cells)[1]
    # S: the configured mean + the measured overhead beyond the drawn times (control
    # variate); D: the single callers' response minus their realised service
    s_fit, d_fit = st.S, st.D
    assert s_fit == pytest.approx(500e-6 + np.average(ones["S_over"], weights=ones["calls"]))
    pooled = np.average(ones["R_mean"] - ones["S"], weights=ones["calls"])
    assert d_fit == pytest.approx(max(pooled, 0.0))
    assert 0 < st.S - 500e-6 < 5e-3 and st.Z > 2000e-6
    one = df[df["N"] == 1].iloc[0]
    assert one["R_pred"] == pytest.approx(st.D + st.S, rel=1e-9)  # N = 1 is the fit
    four = df[df["N"] == 4].iloc[0]
    assert four["fit"] == "W1-N1-r0+W1-N1-r1"  # predicted from the cells around it
    refs = cells[cells["name"].isin(["W1-N1-r0", "W1-N1-r1"])]
    assert four["R_pred"] > np.average(refs["R_mean"], weights=refs["calls"])
    assert four["wait_pred"] > 0


def test_analyze_says_which_cell_is_missing_its_fit(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "contention.json").write_text("{}")
    rep = run_testbed("analyze", str(out), "-o", str(tmp_path / "r"), text=True)
    assert "no finished cells" in _one_error_line(rep)


def test_the_threads_of_a_stopped_queued_delegate_end():
    svc = service.Service(100, kind="spin")
    d = Delegate("tcp://127.0.0.1:*", workers=3, service=svc).start()
    before = threading.active_count()
    d.stop()
    assert d._stopped.is_set() and threading.active_count() < before


@pytest.mark.system  # creates network namespaces (netns.Topology in the sweep)
def test_sweep_over_namespace_nodes_reaches_the_delegate_over_tcp(tmp_path):
    """Callers on two netns nodes, the delegate on a third: real TCP over veth."""
    from testbed.cluster import netns

    ok, why = netns.available()
    if not ok:
        pytest.skip(why)
    out = tmp_path / "sweep"
    proc = run_testbed("contention", "--callers", "2", "--workers", "2", "--service-us", "300",
                       "--think-us", "1000", "--duration", "1", "--warmup", "0.2",
                       "--nodes", "2", "-o", str(out), text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    cell = out / "W2-N2"
    meta = json.loads((cell / CELL_JSON).read_text())
    assert meta["placement"].startswith("2 netns nodes")
    endpoints = set()
    for i in range(2):
        run = rundir.load(cell / "callers" / f"c{i:03d}")
        assert run.meta["calls"]["faults"] == 0 and run.meta["calls"]["count"] > 0
        endpoints.add(run.meta["endpoint"])
        assert run.meta["delegate"]["host"]  # the WELCOME came back over the veth link
    (ep,) = endpoints
    assert not ep.startswith("tcp://127.")  # the namespace address, not loopback
    _, rec = queue_record.load_record(cell / "delegate")
    assert rec.size == sum(len(c) for c in load_cycles(cell))


def test_queued_delegate_answers_malformed_input_and_keeps_serving():
    svc = service.Service(100, kind="sleep", dist="fixed")
    d = Delegate("tcp://127.0.0.1:*", workers=1, service=svc).start()
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(d.bound_endpoint)
        s.send(b"\xc1 not msgpack")
        assert s.poll(10_000)
        assert wire.decode(s.recv())[0] == wire.ERROR
        s.send_multipart([b"a", b"b", b"c"])  # not [identity, payload]
        assert s.poll(10_000)
        assert wire.decode(s.recv())[0] == wire.ERROR
        s.send(wire.encode_call(wire.Call(7, 1, 110, (0,) * 6, (), "cost")))
        assert s.poll(10_000)
        kind, res = wire.decode(s.recv())
        assert kind == wire.RESULT and res.call_id == 7
    finally:
        s.close()
        ctx.term()
        d.stop()
    assert svc.records().size == 1  # only the call was served and recorded


def test_contention_help_documents_every_option():
    import argparse

    from testbed.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["contention"]
    text = " ".join(run_testbed("contention", "--help").stdout.decode().split())
    for action in parser._actions:
        assert action.help and len(action.help.split()) >= 2, action.dest
        for flag in action.option_strings:
            assert flag in text


def test_non_finite_times_are_refused():
    proc = run_testbed("contention", "-o", "/nonexistent/x", "--service-us", "inf",
                       "--think-us", "1", text=True)  # fmt: skip
    assert proc.returncode == 2 and "finite" in proc.stderr and "Traceback" not in proc.stderr
