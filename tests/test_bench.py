"""testbed bench and testbed demo run end to end on this machine."""

from __future__ import annotations

import json

from testbed import rundir
from tests.conftest import run_testbed


def test_bench_measures_all_four_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    res = run_testbed("bench", "--calls", "2000", "--size", "64", "--json", str(out), timeout=300)
    assert res.returncode == 0, res.stderr
    text = res.stdout.decode()
    for label in ("native write", "trap-only (seccomp)", "raw ZeroMQ round trip",
                  "full forwarded", "ratio full/raw-ZeroMQ", "ratio trap-only/native"):  # fmt: skip
        assert label in text, label
    data = json.loads(out.read_text())
    for key in ("native", "trap_only", "raw_zmq", "forwarded", "raw_zmq_busy", "forwarded_busy"):
        assert data[key]["n"] == 2000
        assert data[key]["p50_us"] > 0 and data[key]["p99_us"] >= data[key]["p50_us"]
    assert data["forwarded"]["faults"] == 0
    assert data["raw_zmq"]["frame_bytes"] > 64  # the frame carries the 64-byte buffer


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
