"""``testbed bench --transports`` and the transport-aware mechanism names."""

from __future__ import annotations

import json
import math
import re

import pytest

from testbed.core import errors
from testbed.core.mechanisms import carrier, mechanism
from testbed.jobs.bench import bench
from tests.conftest import run_testbed

TRANSPORTS = {"ipc": "unix-socket", "tcp": "tcp-socket", "libzmq-tcp": "tcp-socket",
              "shm": "futex"}  # fmt: skip
REFERENCES = ("unix-socket", "tcp-socket", "futex", "futex-spin")


@pytest.mark.integration
def test_bench_transports_measures_each_transport_next_to_its_reference(tmp_path, monkeypatch):
    monkeypatch.delenv("TESTBED_ZMTP", raising=False)  # the raw ZMTP rows need it unset
    out = tmp_path / "transports.json"
    res = run_testbed("bench", "--transports", "--calls", "600", "--rounds", "2", "--size", "64",
                      "--json", str(out), timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    text, err = res.stdout.decode(), res.stderr.decode()
    assert "transports round 1/2" in err and "transports round 2/2" in err  # progress
    data = json.loads(out.read_text())
    assert data["rounds"] == 2 and data["calls_per_round"] == 300
    assert set(data["transports"]) == set(TRANSPORTS)
    assert set(data["references"]) == set(REFERENCES)
    for key, ref in TRANSPORTS.items():
        t = data["transports"][key]
        assert t["n"] == 600 and t["reference"] == ref
        for k in ("p50_us", "p99_us"):
            assert math.isfinite(t[k]) and t[k] > 0, (key, k)
        assert t["p99_us"] >= t["p50_us"]
        for k in ("relay_cpu_us", "delegate_cpu_us"):
            assert math.isfinite(t[k]["median"]) and t[k]["median"] > 0, (key, k)
        # the row's runs went over the transport it names, and analysis names them so
        assert t["mechanism"].split("/")[1] == key, t["mechanism"]
        assert t["mechanism"] in text
        # the printed ratio is the JSON's p50 over the reference's p50
        want = t["p50_us"] / data["references"][ref]["p50_us"]
        assert t["ratio"] == pytest.approx(want)
        m = re.search(rf"ratio {re.escape(key)} / {re.escape(ref)}\s+([\d.]+)", text)
        assert m, (key, text)
        assert float(m[1]) == pytest.approx(want, abs=0.006)
    assert data["transports"]["ipc"]["endpoint"].startswith("ipc://")
    assert data["transports"]["ipc"]["mechanism"] == "seccomp/ipc/same-node"
    assert data["transports"]["tcp"]["mechanism"] == "seccomp/tcp/loopback"
    assert data["transports"]["libzmq-tcp"]["delegate_transport"] == "libzmq"
    assert data["transports"]["shm"]["endpoint"].startswith("shm://")
    assert data["transports"]["shm"]["mechanism"] == "seccomp/shm/same-node"
    for key in REFERENCES:
        r = data["references"][key]
        assert r["n"] == 600 and math.isfinite(r["p50_us"]) and r["p50_us"] > 0, key
        assert r["what"] in text
    for key in ("futex", "futex-spin"):  # the physical floor of the shm transport
        assert data["references"][key]["reference_for"].startswith("shm")
    assert text.count("(reference for shm") == 2


@pytest.mark.unit
def test_bench_transports_refuses_what_it_cannot_measure(monkeypatch):
    with pytest.raises(errors.TestbedError, match="drop --delegate"):
        bench("tcp://127.0.0.1:5555", 1000, 64, transports=True)
    with pytest.raises(errors.TestbedError, match="choose one"):
        bench(None, 1000, 64, breakdown=True, transports=True)
    with pytest.raises(errors.TestbedError, match="at least 100 calls per round"):
        bench(None, 300, 64, rounds=5, transports=True)
    monkeypatch.setenv("TESTBED_ZMTP", "0")
    with pytest.raises(errors.TestbedError, match="TESTBED_ZMTP"):
        bench(None, 1000, 64, transports=True)


LOOP, REMOTE, IPC = "tcp://127.0.0.1:5555", "tcp://10.0.0.2:5555", "ipc:///run/testbed/d.sock"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("meta", "label"),
    [
        # raw ZMTP spoken by the relay: named by its socket
        ({"transport": "zmtp", "endpoint": LOOP}, "seccomp/tcp/loopback"),
        ({"transport": "zmtp", "endpoint": "tcp://localhost:5"}, "seccomp/tcp/loopback"),
        ({"transport": "zmtp", "endpoint": REMOTE}, "seccomp/tcp/remote"),
        ({"transport": "zmtp", "endpoint": IPC}, "seccomp/ipc/same-node"),
        # libzmq, with and without CURVE
        ({"transport": "libzmq", "endpoint": LOOP}, "seccomp/libzmq-tcp/loopback"),
        ({"transport": "libzmq", "endpoint": "tcp://[::1]:5"}, "seccomp/libzmq-tcp/loopback"),
        ({"transport": "libzmq", "endpoint": IPC}, "seccomp/libzmq-ipc/same-node"),
        (
            {"transport": "libzmq", "endpoint": REMOTE, "curve": True},
            "seccomp/libzmq-curve-tcp/remote",
        ),
        # a transport of its own over its own scheme (the shared-memory one to come)
        ({"transport": "shm", "endpoint": "shm:///testbed-0"}, "seccomp/shm/same-node"),
        # run.json from before the raw ZMTP relay records no transport: it was libzmq
        ({"endpoint": LOOP}, "seccomp/libzmq-tcp/loopback"),
        ({"endpoint": REMOTE}, "seccomp/libzmq-tcp/remote"),
        ({"endpoint": IPC}, "seccomp/libzmq-ipc/same-node"),
        ({"transport": None, "endpoint": REMOTE, "curve": True}, "seccomp/libzmq-curve-tcp/remote"),
        # delay and offload keep their places; kmod's relay is named the same way
        (
            {"transport": "zmtp", "endpoint": REMOTE, "delegate": {"delay_us": 50}},
            "seccomp/tcp/remote+50us",
        ),
        (
            {"transport": "zmtp", "endpoint": LOOP, "mode": "offload"},
            "seccomp/tcp/loopback/offload",
        ),
        ({"backend": "kmod", "transport": "zmtp", "endpoint": REMOTE}, "kmod/tcp/remote"),
        # the kernel thread has no transport: its labels are unchanged
        (
            {"backend": "kmod", "mode": "kthread", "endpoint": None, "delegate": {"delay_us": 0}},
            "kmod-kthread/same-node",
        ),
        (
            {
                "backend": "kmod",
                "mode": "kthread",
                "endpoint": None,
                "delegate": {"delay_us": 5, "faithful": True},
            },
            "kmod-kthread-faithful/same-node+5us",
        ),
    ],
)
def test_mechanism_names_the_transport(meta, label):
    assert mechanism({"backend": "seccomp", "mode": "cost", **meta}) == label


@pytest.mark.unit
def test_carrier_of_every_transport_endpoint_kind():
    assert carrier("zmtp", "tcp://127.0.0.1:1") == "tcp"
    assert carrier("zmtp", "ipc:///x") == "ipc"
    assert carrier("libzmq", "tcp://h:1") == "libzmq-tcp"
    assert carrier("libzmq", "ipc:///x") == "libzmq-ipc"
    assert carrier("libzmq", "tcp://h:1", curve=True) == "libzmq-curve-tcp"
    assert carrier(None, "tcp://h:1") == carrier("", "tcp://h:1") == "libzmq-tcp"
    assert carrier("shm", "shm:///x") == "shm"
    assert carrier("shm", "ipc:///x") == "shm-ipc"  # never confused with either
    assert carrier("zmtp", "") == "?"
