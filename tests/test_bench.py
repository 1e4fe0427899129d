"""testbed bench and testbed demo run end to end on this machine."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

from testbed.core import rundir
from tests.conftest import run_testbed


@pytest.mark.usefixtures("relay_transport")  # the forwarded rows on both
def test_bench_measures_all_four_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    res = run_testbed("bench", "--calls", "2000", "--size", "64", "--json", str(out), timeout=300)
    assert res.returncode == 0, res.stderr
    text = res.stdout.decode()
    for label in ("native write", "trap-only (seccomp, C path)", "raw ZeroMQ round trip",
                  "full forwarded", "ratio full/raw-ZeroMQ", "ratio trap-only/native"):  # fmt: skip
        assert label in text, label
    data = json.loads(out.read_text())
    for key in ("native", "trap_only", "raw_zmq", "forwarded", "raw_zmq_busy", "forwarded_busy"):
        assert data[key]["n"] == 2000
        assert data[key]["p50_us"] > 0 and data[key]["p99_us"] >= data[key]["p50_us"]
    assert data["forwarded"]["faults"] == 0
    assert data["trap_only"]["c_path"]  # the loop testbed run uses here (cc is installed)
    assert data["raw_zmq"]["frame_bytes"] > 64  # the frame carries the 64-byte buffer
    p50 = {k: v["p50_us"] for k, v in data.items() if isinstance(v, dict) and "p50_us" in v}
    fw = data["forwarded"]
    # structural orderings (each path contains the one before it), not timings:
    # a trapped write does the native one plus a seccomp round trip; a forwarded
    # one the trap plus a ZeroMQ round trip.  Per call, the relay's ZeroMQ round
    # trip and its overhead (held - the delegate's residence) both lie inside the
    # time the program measured around that call, so their medians do too.  (Not
    # asserted: raw ZeroMQ < forwarded. The raw client is Python and the relay's
    # C path is not, so the forwarded call can be the faster of the two.)
    assert p50["native"] < p50["trap_only"] < p50["forwarded"], p50
    assert p50["trap_only"] < p50["forwarded_busy"], p50
    assert fw["relay_rtt_p50_us"] <= fw["p50_us"], fw
    assert fw["relay_overhead_p50_us"] <= fw["p50_us"], fw
    # the printed ratios are the measured ones
    ratio = re.search(r"ratio full/raw-ZeroMQ\s+([\d.]+)", text)
    assert ratio and float(ratio[1]) == pytest.approx(p50["forwarded"] / p50["raw_zmq"], abs=0.006)
    ratio = re.search(r"ratio trap-only/native\s+([\d.]+)", text)
    assert ratio and float(ratio[1]) == pytest.approx(p50["trap_only"] / p50["native"], abs=0.006)


def test_bench_rejects_bad_size():
    res = run_testbed("bench", "--size", "-5")
    assert res.returncode == 2
    assert (
        res.stderr.decode().strip() == "testbed: error: --size must be between 0 and 1048576 bytes"
    )


def test_demo_is_the_main_job(tmp_path):
    res = run_testbed("demo", "--size-mb", "1", "-o", str(tmp_path / "demo"), timeout=120)
    assert res.returncode == 0, res.stderr
    text = res.stdout.decode()
    assert "output identical to native: yes" in text
    assert "f_c" in text and "slowdown" in text
    run = rundir.load(tmp_path / "demo" / "forwarded-1")
    assert run.meta["calls"]["count"] > 0 and run.meta["calls"]["faults"] == 0
    assert run.meta["forwarded"] == ["read", "write"]
    profile = rundir.load(tmp_path / "demo" / "profile")
    assert profile.kind == "profile" and profile.meta["native"]["wall_s"] > 0
    fwd_counts = {r["name"]: int(r["n"]) for r in run.syscalls}
    native_counts = {r["name"]: int(r["n"]) for r in profile.syscalls}
    assert fwd_counts == {k: native_counts[k] for k in ("read", "write")}


def test_bench_breakdown_stages_add_up_to_the_round_trip(tmp_path, relay_transport):
    out = tmp_path / "breakdown.json"
    res = run_testbed("bench", "--breakdown", "--calls", "1200", "--rounds", "2", "--size", "64",
                      "--json", str(out), timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    text = res.stdout.decode()
    for label in ("trap-only, C (cref/trapcont.c)", "raw C TCP (cref/tcprtt.c)",
                  "forwarded - raw ZeroMQ, busy-poll", "CPU per forwarded call"):  # fmt: skip
        assert label in text, label
    data = json.loads(out.read_text())
    assert data["rounds"] == 2 and data["calls_per_round"] == 600
    assert data["relay_transport"] == relay_transport
    for key in ("trap_py", "trap_fast", "trap_c", "raw_zmq", "raw_zmq_c", "fwd", "fwd_py",
                "raw_zmq_busy", "fwd_busy", "fwd_py_busy", "tcp_c", "raw_zmtp_c",
                "raw_zmtp_c_busy"):  # fmt: skip
        assert data["p50_us"][key]["median"] > 0, key
    assert "raw ZMTP from C (no libzmq), busy-polled" in text
    # the raw ZMTP client's calls do not go through libzmq: its I/O threads (still
    # alive for the process's other sockets) do a small fraction of what they do
    # for the libzmq client's
    for key in ("", "_busy"):
        zmtp, zmq_c = data["client_cpu_us"]["zmtp_c" + key], data["client_cpu_us"]["zmq_c" + key]
        assert zmtp["main"]["median"] > 0 and zmq_c["zmq"]["median"] > 0
        assert zmtp["zmq"]["median"] < 0.2 * zmq_c["zmq"]["median"], (zmtp, zmq_c)
    for tag in ("sleep", "busy", "sleep-py", "busy-py"):
        s = data["stages"][tag]
        med = s["median_us"]
        assert set(med) == {"trap", "marshal", "send", "transport", "delegate", "decode",
                            "resume", "record"}  # fmt: skip
        # each call's stages telescope to what the program measured; the sum of
        # the stage medians lands within the round trip's spread (p10..p90; a
        # stage left out - send + transport, the network part, is most of it - would not;
        # busy-polled, the relay is often preempted in send, so the two go together)
        assert s["round_trip_p10_us"] <= s["sum_of_medians_us"] <= s["round_trip_p90_us"], s
        assert s["sum_of_medians_us"] - med["send"] - med["transport"] < s["round_trip_p10_us"]
        assert med["delegate"] > 0 and med["send"] + med["transport"] > 0 and med["record"] > 0
        assert s["relay_cpu_us"]["median"] > 0 and s["delegate_cpu_us"]["median"] > 0
        assert s["relay_main_us"]["median"] > 0
        if relay_transport == "libzmq":  # TESTBED_ZMTP=0: libzmq on both ends
            assert s["relay_zmq_us"]["median"] > 0 and s["delegate_zmq_us"]["median"] > 0
        else:  # raw ZMTP: no libzmq I/O thread runs in the relay or the delegate
            assert s["relay_zmq_us"]["max"] == 0 and s["delegate_zmq_us"]["max"] == 0
        # the C path served the C rows (all but the odd call), the Python path the others
        assert s["c_share"]["min"] > 0.9 if tag in ("sleep", "busy") else s["c_share"]["max"] == 0
    assert data["delegate_transport"] == relay_transport
    # the baselines of the CPU target: libzmq on both ends (its I/O threads do run),
    # C path and Python path; the printed ratios are the measured ones
    for w in ("sleep", "busy"):
        for name, c_path in (("libzmq", True), ("filed", False)):
            b = data["baselines"][f"{w}-{name}"]
            assert b["relay_zmq_us"]["min"] > 0 and b["delegate_zmq_us"]["min"] > 0, b
            assert b["c_share"]["min"] > 0.9 if c_path else b["c_share"]["max"] == 0
            assert b["p50_us"]["median"] > 0
            ratio = data["targets"][f"cpu_over_{name}_{w}"]
            assert ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["min"] > 0
            line = f"/ {'as filed' if name == 'filed' else 'C path + libzmq'}, " + (
                "sleeping" if w == "sleep" else "busy-poll"
            )
            assert re.search(re.escape(line) + rf"\s+{ratio['median']:.2f} x", text), line


def test_bench_breakdown_rejects_too_many_rounds():
    res = run_testbed("bench", "--breakdown", "--calls", "300", "--rounds", "5")
    assert res.returncode == 2
    assert "testbed: error: --rounds" in res.stderr.decode()


def test_raw_zmtp_client_round_trips_and_refuses_what_it_cannot_speak(tmp_path):
    from testbed.core.errors import TestbedError
    from testbed.jobs import latency
    from testbed.jobs.localdelegate import LocalDelegate

    with LocalDelegate() as d:
        lat = latency.raw_zmtp_lat(d.endpoint, 50, 64)
        assert len(lat) == 50 and (lat > 0).all()
    with pytest.raises(TestbedError, match="tcp://HOST:PORT"):
        latency.raw_zmtp_lat(f"ipc://{tmp_path}/d.sock", 1, 64)
    # a TCP peer that is not ZMTP: one clear error, not a hang or a traceback
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def answer_garbage():
        conn, _ = srv.accept()
        conn.sendall(b"HTTP/1.0 200 OK\r\n" + b"x" * 80)
        time.sleep(1)
        conn.close()

    t = threading.Thread(target=answer_garbage, daemon=True)
    t.start()
    try:
        with pytest.raises(TestbedError, match="does not speak ZMTP 3"):
            latency.raw_zmtp_lat(f"tcp://127.0.0.1:{port}", 1, 64)
    finally:
        t.join(5)
        srv.close()
