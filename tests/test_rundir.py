"""Run-directory format: records, derived quantities, summaries, versioning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testbed.core import rundir


def _write_run(path, n=10, delay=1000):
    rec = rundir.CallRecorder(path / rundir.CALLS_BIN)
    for i in range(n):
        t = 1_000_000 * (i + 1)
        rec.add(100 + i % 2, i % 2, 0, 0, 8 * (i % 2), 0,
                t, t + 100, t + 100 + delay + 50, t + 100 + delay + 80,
                5_000 + t, 5_000 + t + 10, 5_000 + t + 10, 5_000 + t + delay)  # fmt: skip
    rec.close()
    rundir.write_meta(path, {"kind": "delegated", "calls": {"count": rec.count}})


@pytest.mark.unit
def test_records_round_trip_and_derived_quantities(tmp_path):
    _write_run(tmp_path)
    run = rundir.load(tmp_path)
    calls = run.calls()
    assert calls.size == 10 and calls.dtype == rundir.CALL_DTYPE
    assert calls["seq"].tolist() == list(range(10))
    d = rundir.derived(calls)
    assert np.all(d["rtt"] == 1050)
    assert np.all(d["residence"] == 1000)
    assert np.all(d["wire"] == 50)
    assert np.all(d["overhead"] == 1180)
    rows = rundir.summarize(calls)
    assert [(r["name"], r["n"], r["bytes_in"]) for r in rows] == [("read", 5, 0), ("write", 5, 40)]
    assert rows[0]["rtt_p50_us"] == pytest.approx(1.05, rel=0.013)
    assert rundir.overall(calls)["f_c_us"] == pytest.approx(0.59, rel=0.013)


@pytest.mark.unit
def test_unknown_version_and_missing_and_truncated(tmp_path):
    with pytest.raises(rundir.RunDirError, match="no such run directory"):
        rundir.load(tmp_path / "nope")
    with pytest.raises(rundir.RunDirError, match="not a run directory"):
        rundir.load(tmp_path)
    (tmp_path / rundir.RUN_JSON).write_text(json.dumps({"rundir_version": 99}))
    with pytest.raises(rundir.RunDirError, match="version 99 not supported"):
        rundir.load(tmp_path)
    (tmp_path / rundir.RUN_JSON).write_text("{not json")
    with pytest.raises(rundir.RunDirError, match="unreadable"):
        rundir.load(tmp_path)
    _write_run(tmp_path)
    with open(tmp_path / rundir.CALLS_BIN, "ab") as f:
        f.write(b"xx")
    with pytest.raises(rundir.RunDirError, match="truncated"):
        rundir.load(tmp_path).calls()


@pytest.mark.unit
def test_create_refuses_non_empty_directory(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(rundir.RunDirError, match="not empty"):
        rundir.create(tmp_path)
    assert (tmp_path / "x").read_text() == "keep me"


def test_recorder_memory_is_bounded_for_a_million_calls(tmp_path):
    """Peak RSS growth of a fresh process while recording 10^6 calls (~92 MiB of data).

    ``ru_maxrss`` is a process-wide peak, so the recording runs in a new
    interpreter whose peak no earlier test has raised.
    """
    script = (
        "import resource, sys\n"
        "from testbed.core import rundir\n"
        "rec = rundir.CallRecorder(sys.argv[1])\n"
        "rec.add(1, 1, 0, 1, 1, 0, 0, 0, 0, 0)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for i in range(1_000_000):\n"
        "    rec.add(1, 1, 0, 1, 1, 0, i, i, i, i)\n"
        "rec.close()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = tmp_path / rundir.CALLS_BIN
    res = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert res.returncode == 0, res.stderr
    grown_kib = int(res.stdout)
    assert out.stat().st_size == 1_000_001 * rundir.CALL_DTYPE.itemsize
    assert grown_kib < 16 * 1024, f"recorder grew by {grown_kib} KiB for 1e6 records"


@pytest.mark.unit
def test_host_metadata_versions_are_the_installed_distributions():
    """run.json's software versions are read from the modules (no metadata scan at start-up):
    they must be what the installed distributions say, the testbed's own included."""
    from importlib import metadata

    from testbed.core.hostinfo import host_metadata

    h = host_metadata()
    assert h["pyzmq"] == metadata.version("pyzmq")
    assert h["msgpack"] == metadata.version("msgpack")
    assert h["testbed"] == metadata.version("delegation-testbed")
