"""CPU time and placement of a run's processes (testbed/core/cpus.py).

The delegate reports its own CPU time over the wire (``stats``), so it is
recorded for a delegate in another network namespace (or node) where the
experiment cannot read its /proc; ``pin: true`` is honoured where the node
has two CPUs and refused with one line where it has fewer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest
import zmq

from testbed.cluster import netns
from testbed.core import cpus, rundir, wire
from tests.conftest import run_testbed, tb_argv

ALL = sorted(os.sched_getaffinity(0))


# ---------------------------------------------------------------- pure functions


def _stats(pid=7, cpu=1.0, answered=100, mine=10, cpus_=(0, 1), boot=None):
    return {"stats_version": 1, "host": "h", "pid": pid, "boot_id": boot or cpus.boot_id(),
            "cpu_user_s": cpu * 0.75, "cpu_sys_s": cpu * 0.25, "cpus": list(cpus_),
            "cpu_count": 2, "answered": answered, "client_calls": mine}  # fmt: skip


@pytest.mark.unit
def test_delegate_cpu_attributes_by_call_share_and_knows_other_kernels():
    d = cpus.delegate_cpu(_stats(), _stats(cpu=3.0, answered=500, mine=110), [0])
    assert d["delegate_cpu_s"] == pytest.approx(2.0)
    assert d["delegate_cpu_s_client"] == pytest.approx(2.0 * 100 / 400)
    assert (d["delegate_calls_answered"], d["delegate_calls_client"]) == (400, 100)
    assert d["delegate_same_kernel"] is True
    assert d["delegate_shared_cpus"] == [0] and d["delegate_shares_program_cpus"] is True
    other = cpus.delegate_cpu(_stats(boot="x"), _stats(cpu=2.0, boot="x"), [0])
    assert other["delegate_same_kernel"] is False
    assert other["delegate_shares_program_cpus"] is False and other["delegate_shared_cpus"] == []
    restarted = cpus.delegate_cpu(_stats(pid=7), _stats(pid=8), [0])
    assert restarted["delegate_cpu_s"] is None
    assert "restarted" in restarted["delegate_stats_error"]
    old = cpus.delegate_cpu({"error": "the delegate does not report stats"}, _stats(), [0])
    assert old["delegate_cpu_s"] is None and "does not report" in old["delegate_stats_error"]


@pytest.mark.unit
def test_cell_cpu_prefers_the_delegates_own_stats_and_falls_back_to_proc():
    run_cpu = {"relay_user_s": 0.2, "relay_sys_s": 0.1, "relay_cpus": [1], "program_cpus": [0],
               **cpus.delegate_cpu(_stats(), _stats(cpu=1.5), [0])}  # fmt: skip
    c = cpus.cell_cpu(run_cpu, [1], 0.4)
    assert c["relay_cpu_s"] == pytest.approx(0.3) and c["relay_shares_program_cpus"] is False
    assert c["delegate_cpu_source"] == "stats" and c["delegate_cpu_s"] == pytest.approx(0.5)
    assert c["delegate_cpu_s_proc"] == 0.4
    old = cpus.cell_cpu({"relay_cpus": [1], "program_cpus": [0], "delegate_stats_error": "x"},
                        [0, 1], 0.4)  # fmt: skip
    assert old["delegate_cpu_source"] == "/proc" and old["delegate_cpu_s"] == 0.4
    assert old["delegate_shared_cpus"] == [0] and old["delegate_shares_program_cpus"] is True
    assert cpus.cell_cpu({}, None, None)["delegate_cpu_source"] is None


# ---------------------------------------------------------------- the stats request


@pytest.mark.unit
def test_stats_frames_are_maps_both_ways():
    assert wire.decode(wire.encode_stats({})) == (wire.STATS, {})
    assert wire.decode(wire.encode_stats({"stats_version": 1})) == (
        wire.STATS,
        {"stats_version": 1},
    )
    import msgpack

    with pytest.raises(wire.WireError, match="stats frame must be"):
        wire.decode(msgpack.packb([wire.WIRE_VERSION, "stats", [1]]))


def _fake_delegate(reply):
    """A ROUTER on loopback answering every frame with ``reply(frame)`` (None: silence)."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if router.poll(50):
                ident, frame = router.recv_multipart()
                out = reply(frame)
                if out is not None:
                    router.send_multipart([ident, out])
        router.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    return dealer, stop, t


@pytest.mark.parametrize(
    "reply, expect",
    [
        (lambda f: wire.encode_error(wire.E_UNSUPPORTED, "unknown message type 'stats'"),
         "does not report stats"),
        (lambda f: None, "no stats reply within 0.3 s"),
        (lambda f: wire.encode_stats({"stats_version": 99}), "stats version 99 unknown"),
    ],
)  # fmt: skip
def test_request_stats_records_why_a_delegate_gave_none(reply, expect):
    dealer, stop, t = _fake_delegate(reply)
    try:
        got = cpus.request_stats(dealer, timeout_s=0.3)
    finally:
        dealer.close()
        stop.set()
        t.join(5)
    assert set(got) == {"error"} and expect in got["error"]


def test_request_stats_skips_late_frames_and_reads_the_answer():
    from testbed.delegate.daemon import Delegate

    with Delegate("tcp://127.0.0.1:*") as d:  # __enter__ starts it
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(d.bound_endpoint)
        s.send(wire.encode_hello({}))  # its WELCOME arrives before the stats reply: skipped
        got = cpus.request_stats(s, timeout_s=5)
        s.close()
    assert got["stats_version"] == cpus.STATS_VERSION and got["pid"] == os.getpid()
    assert got["cpus"] == ALL and got["boot_id"] == cpus.boot_id()
    assert got["cpu_user_s"] + got["cpu_sys_s"] > 0 and got["client_calls"] == 0


# ---------------------------------------------------------------- a delegate in another namespace

_ok, _why = netns.available()


def needs_netns(f):
    for mark in (pytest.mark.root, pytest.mark.netns,
                 pytest.mark.skipif(not _ok, reason=f"needs network namespaces: {_why}")):  # fmt: skip
        f = mark(f)
    return f


@pytest.fixture(scope="module")
def topo():
    with netns.Topology(["compute", "delegate"]) as t:
        yield t


def _delegate_in(topo, port, prefix=()):
    endpoint = f"tcp://{topo.addr('delegate')}:{port}"
    proc = topo.popen("delegate", [*prefix, *tb_argv("delegate", "--listen", endpoint, "--quiet")])
    probe = f"from testbed.compute.relay import connect; connect({endpoint!r}, timeout_s=1.0)[1].close()"
    for _ in range(40):
        if topo.run("compute", [tb_argv()[0], "-c", probe], capture_output=True).returncode == 0:
            return endpoint, proc
        assert proc.poll() is None, f"delegate exited with {proc.returncode}"
        time.sleep(0.25)
    raise AssertionError("delegate never answered")


def _stop(proc):
    proc.terminate()
    proc.wait(10)


def _dd_run(topo, endpoint, out, *extra):
    argv = tb_argv("run", "--delegate", endpoint, "--forward", "read,write", "-o", str(out),
                   "--quiet", *extra, "--", "dd", "if=/dev/zero", "of=/dev/null", "bs=4k",
                   "count=3000")  # fmt: skip
    res = topo.run("compute", argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return rundir.load(out)


@needs_netns
def test_delegate_cpu_in_another_namespace_is_recorded_and_agrees_with_its_proc(topo, tmp_path):
    endpoint, proc = _delegate_in(topo, 5561)
    try:
        # ip netns exec execs the delegate: proc.pid is the delegate process
        before = cpus.proc_cpu_s(proc.pid)
        run = _dd_run(topo, endpoint, tmp_path / "run")
        after = cpus.proc_cpu_s(proc.pid)
    finally:
        _stop(proc)
    c = run.meta["cpu"]
    assert "delegate_stats_error" not in c, c
    # every forwarded call was answered to this client, and counted as such
    assert c["delegate_calls_client"] == c["delegate_calls_answered"] == run.meta["calls"]["count"]
    assert run.meta["calls"]["count"] >= 6000
    assert c["delegate_cpu_s_client"] == pytest.approx(c["delegate_cpu_s"])
    # the delegate's own rusage agrees with what /proc says of it, read around the whole relay
    # (clock-tick resolution: 10 ms per reading; the relay's start-up is a few guard ticks)
    assert 0 < c["delegate_cpu_s"] <= after - before + 0.03
    assert c["delegate_cpu_s"] >= 0.8 * (after - before) - 0.03
    # same machine (a namespace shares the kernel and its CPUs)
    assert c["delegate_same_kernel"] is True and c["delegate_host"] == socket.gethostname()
    assert c["delegate_cpus"] == ALL and c["delegate_shared_cpus"] == c["program_cpus"] == ALL
    assert c["delegate_shares_program_cpus"] is True


@needs_netns
@pytest.mark.skipif(len(ALL) < 2, reason="pinning apart needs two CPUs")
def test_pinned_apart_the_remote_delegate_shares_no_cpu_with_the_program(topo, tmp_path):
    endpoint, proc = _delegate_in(topo, 5562, prefix=("taskset", "-c", str(ALL[1])))
    try:
        run = _dd_run(topo, endpoint, tmp_path / "run", "--pin-program", str(ALL[0]))
    finally:
        _stop(proc)
    c = run.meta["cpu"]
    assert c["program_cpus"] == [ALL[0]] and c["delegate_cpus"] == [ALL[1]]
    assert c["delegate_shared_cpus"] == [] and c["delegate_shares_program_cpus"] is False
    assert c["delegate_cpu_s"] > 0


# ---------------------------------------------------------------- pin: true in a plan


def _plan(tmp_path, pin):
    p = tmp_path / "plan.yml"
    p.write_text(f"name: pin\nworkloads: [{{name: wc, size_mb: 1}}]\nforward: [read]\n"
                 f"delegates: [local]\npin: {str(pin).lower()}\n")  # fmt: skip
    return p


def test_pin_true_is_refused_with_one_line_on_one_cpu(tmp_path):
    res = subprocess.run(["taskset", "-c", str(ALL[0]), *tb_argv("experiment",
                          str(_plan(tmp_path, True)), "-o", str(tmp_path / "res"))],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [
        "testbed: error: pin: true needs at least 2 CPUs to put the program apart from the "
        f"relay; this node has 1 available ({ALL[0]})"
    ]
    assert not (tmp_path / "res").exists()  # refused before anything was written


@pytest.mark.skipif(len(ALL) < 2, reason="pinning apart needs two CPUs")
def test_pin_true_puts_program_apart_in_natives_and_forwarded_runs(tmp_path):
    res = run_testbed("experiment", str(_plan(tmp_path, True)), "-o", str(tmp_path / "res"),
                      "--host-label", "here", text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    base = tmp_path / "res" / "here"
    native = rundir.load(base / "native" / "wc.read.local.r1")
    assert native.meta["cpu"]["program_cpus"] == [ALL[0]]
    run = rundir.load(base / "wc.read.local.r1")
    cell = json.loads((base / "wc.read.local.r1" / "experiment.json").read_text())
    c = cell["cpu"]
    assert cell["pinning"]["program"] == [ALL[0]] and cell["pinning"]["relay"] == [ALL[1]]
    assert c["program_cpus"] == [ALL[0]] and c["relay_cpus"] == [ALL[1]]
    assert c["delegate_cpus"] == [ALL[2] if len(ALL) > 2 else ALL[1]]
    assert c["relay_shares_program_cpus"] is False and c["delegate_shares_program_cpus"] is False
    # the local delegate's stats agree with its /proc (clock ticks: 10 ms per reading)
    assert c["delegate_cpu_source"] == "stats"
    assert abs(c["delegate_cpu_s"] - c["delegate_cpu_s_proc"]) <= 0.03 + 0.2 * c["delegate_cpu_s"]
    assert c["delegate_calls_client"] == run.meta["calls"]["count"] > 0
