"""``testbed replay``: a recorded forwarded-call stream re-issued against other delegates.

The unit tests check the timeline a replay composes (anchors, children a parent
waited for, the identity with the recording); the integration tests record a real
program against a real delegate and replay it against real delegates over tcp,
ipc and shm, with an injected delay, with the computation elided, and against a
delegate that dies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from testbed.cluster import netns
from testbed.core import mechanisms, rundir
from testbed.jobs import replay
from testbed.jobs.localdelegate import LocalDelegate
from tests.conftest import run_testbed as _run_testbed
from tests.conftest import tb_argv


def run_testbed(*args: str, **kw):
    return _run_testbed(*args, text=True, **kw)


# ------------------------------------------------------------------ the timeline


def _calls(rows: list[tuple[int, int, int, int, int, int]]) -> np.ndarray:
    """Records from (tid, bytes_in, t_trap, t_send, t_reply, t_resume), µs."""
    c = np.zeros(len(rows), dtype=rundir.CALL_DTYPE)
    for i, (tid, size, trap, send, reply, resume) in enumerate(rows):
        c[i]["tid"], c[i]["nr"], c[i]["bytes_in"] = tid, 1, size
        c[i]["t_trap"], c[i]["t_send"] = trap * 1000, send * 1000
        c[i]["t_reply"], c[i]["t_resume"] = reply * 1000, resume * 1000
        c[i]["d_send"] = 1
    return c


# A parent (tid 1) makes a call, forks a child (tid 2) that makes three calls and
# exits, waits for it, makes one more call; the program runs from 0 to 1000 µs.
PARENT_CHILD = [
    (1, 8, 100, 110, 150, 160),
    (2, 8, 200, 205, 245, 250),
    (2, 8, 300, 305, 345, 350),
    (2, 8, 400, 405, 445, 450),
    (1, 8, 600, 610, 650, 660),
]


@pytest.mark.unit
def test_the_recorded_round_trips_give_back_the_recorded_timeline():
    c = _calls(PARENT_CHILD)
    s = replay.schedule(c, 1e-3, t_exec_ns=0 + 1, t_exit_ns=1_000_000)
    trap, resume, end = replay.timeline(s, s.rtt)
    assert (trap + 1 == c["t_trap"]).all() and (resume + 1 == c["t_resume"]).all()
    assert end + 1 == 1_000_000
    assert s.stamped


@pytest.mark.unit
def test_slower_round_trips_delay_what_followed_them_and_a_parent_waits_for_its_child():
    s = replay.schedule(_calls(PARENT_CHILD), 1e-3, t_exec_ns=1, t_exit_ns=1_000_000)
    slower = s.rtt + 100_000  # every round trip 100 µs longer
    trap, _resume, end = replay.timeline(s, slower)
    # the child forked after the parent's first call starts 100 µs later; each of its
    # calls adds 100 µs; the parent's last call waited for the child: +400 µs
    assert trap[1] + 1 == 300_000
    assert trap[4] + 1 == 600_000 + 400_000
    assert end + 1 == 1_000_000 + 500_000
    assert s.waits_for[4] == 3  # the parent's last call waits for the child's last


@pytest.mark.unit
def test_threads_that_overlap_do_not_wait_for_each_other():
    # two threads calling at the same time: neither ended within the other's gaps
    rows = [(1, 0, 100 + 100 * k, 105 + 100 * k, 145 + 100 * k, 150 + 100 * k) for k in range(3)]
    rows += [(2, 0, 120 + 100 * k, 125 + 100 * k, 165 + 100 * k, 170 + 100 * k) for k in range(3)]
    s = replay.schedule(_calls(sorted(rows, key=lambda r: r[2])), 1e-3, 1, 1_000_000)
    trap, resume, end = replay.timeline(s, s.rtt + 100_000)
    by_tid = {t: resume[s.tid == t].max() for t in (1, 2)}
    # each thread is 300 µs later (its own three calls), not 600 µs
    assert by_tid[1] + 1 == 350_000 + 300_000
    assert (s.waits_for == -1).all()


@pytest.mark.unit
def test_a_run_without_exec_stamps_puts_the_outside_time_first():
    c = _calls(PARENT_CHILD)
    s = replay.schedule(c, 1e-3)  # no t_exec_ns/t_exit_ns: an older run.json
    assert not s.stamped
    _trap, _resume, end = replay.timeline(s, s.rtt)
    assert end == 1_000_000


@pytest.mark.unit
def test_unanswered_calls_are_replayed_locally():
    rows = [*PARENT_CHILD]
    rows[2] = (2, 8, 300, 0, 0, 350)  # released unsent in the source (delegate lost)
    s = replay.schedule(_calls(rows), 1e-3, 1, 1_000_000)
    assert not s.sent[2] and s.pre[2] == 50_000 and s.rtt[2] == 0
    _t, _r, end = replay.timeline(s, s.rtt + 50_000)
    _t, _r, end0 = replay.timeline(s, s.rtt)
    assert end - end0 == 4 * 50_000  # the unsent call gains nothing


@pytest.mark.unit
def test_asynchronous_writes_are_not_waited_for_until_a_flush_or_a_full_window():
    # one thread: three writes 1000 µs apart, then close; each round trip 100 µs,
    # the relay's own work 5 µs before and after
    rows = [(1, 8, 1000 * k + 100, 1000 * k + 105, 1000 * k + 205, 1000 * k + 210)
            for k in range(4)]  # fmt: skip
    c = _calls(rows)
    c["nr"][3] = 3  # close
    s = replay.schedule(c, 5e-3, 1, 5_000_000)
    _t, _r, sync_end = replay.timeline(s, s.rtt)
    trap, resume, end = replay.timeline(s, s.rtt, async_writes=4)
    assert sync_end + 1 == 5_000_000
    # the writes' answers arrived before close asked for them: 3 x 100 µs saved
    assert end == sync_end - 300_000
    assert (resume[:3] - trap[:3] == 10_000).all()  # pre + post only
    assert resume[3] - trap[3] == 110_000  # close: its own round trip, nothing left to wait
    # back to back (no gap), a window of one: each write waits for the one before
    rows = [(1, 8, 15 * k, 15 * k + 5, 15 * k + 105, 15 * k + 110) for k in range(3)]
    rows = [(t, b, tr + 100 * k, se + 100 * k, re + 100 * k, rs + 100 * k)
            for k, (t, b, tr, se, re, rs) in enumerate(rows)]  # fmt: skip
    c = _calls(rows)
    s = replay.schedule(c, 1e-3, 1, 1_000_000)
    _t, resume, end = replay.timeline(s, s.rtt, async_writes=1)
    # write 2 is sent when write 1's answer is in, write 3 when write 2's; the last
    # call of the thread (its exit) waits for its own answer
    _t, resume8, end8 = replay.timeline(s, s.rtt, async_writes=8)
    assert end8 <= end < replay.timeline(s, s.rtt)[2]
    assert resume[1] - resume[0] > resume8[1] - resume8[0]


@pytest.mark.unit
def test_writes_batch_per_thread_and_a_batch_ends_at_any_other_call():
    # thread 1: five writes, a read, two writes; thread 2: three writes in between
    kinds = [(1, 1), (1, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (1, 0), (2, 1),
             (1, 1), (1, 1)]  # fmt: skip
    rows = [(tid, 8, 100 * k + 10, 100 * k + 15, 100 * k + 55, 100 * k + 60)
            for k, (tid, _nr) in enumerate(kinds)]  # fmt: skip
    c = _calls(rows)
    c["nr"] = [nr for _tid, nr in kinds]
    s = replay.schedule(c, 2e-3, 1, 2_000_000)
    lead = replay.batches(s, 3)
    # thread 1: writes 0,1,3 | 5,6 (the read 7 ends it) | 9,10 (its last call ends it)
    assert lead.tolist() == [3, 3, 8, 3, 8, 6, 6, -1, 8, 10, 10]
    assert (replay.batches(s, 1) == -1).all()


@pytest.mark.unit
def test_the_model_what_if_terms():
    from analysis import model

    assert model.t_d_with_delay(1.0, 1000, 200e-6) == pytest.approx(1.2)
    # 400 of 1000 calls are asynchronous writes: they neither wait 2 f_c nor the delay
    got = model.t_d_what_if(1.0, 1000, 200e-6, n_async=400, f_c=50e-6)
    assert got == pytest.approx(1.0 + 600 * 200e-6 - 400 * 100e-6)


@pytest.mark.unit
def test_runs_that_cannot_be_replayed_are_refused_with_the_reason(tmp_path):
    def make(name: str, **meta) -> Path:
        d = tmp_path / name
        d.mkdir()
        base = {"rundir_version": 2, "kind": "delegated", "mode": "cost", "wall_s": 1.0,
                "complete": True, "calls": {"count": 0}}  # fmt: skip
        (d / "run.json").write_text(json.dumps({**base, **meta}))
        (d / "calls.bin").write_bytes(_calls(PARENT_CHILD).tobytes())
        return d

    cases = {
        make("off", mode="offload"): "a offload run",
        make("kt", mode="kthread"): "a kthread run",
        make("inc", complete=False): "did not finish",
        make("nowall", wall_s=None): "no wall time",
        tmp_path / "missing": "no such run directory",
    }
    empty = make("empty")
    (empty / "calls.bin").write_bytes(b"")
    cases[empty] = "no forwarded calls"
    for path, why in cases.items():
        with pytest.raises(replay.ReplayError, match=why):
            replay.load_source(path)


# ------------------------------------------------------------------ real replays


def _record(out: Path, delegate: str, *program: str) -> dict:
    r = run_testbed("run", "--quiet", "--delegate", delegate, "--forward", "read,write,openat",
                    "-o", str(out), "--", *program)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads((out / "run.json").read_text())


DD = ("dd", "if=/dev/zero", "of=/dev/null", "bs=512", "count=200", "status=none")


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rec") / "rec"
    with LocalDelegate() as d:
        return out, _record(out, d.endpoint, *DD)


def test_a_replay_writes_an_ordinary_run_directory_with_the_recorded_calls(recording, tmp_path):
    src, meta = recording
    with LocalDelegate() as d:
        r = run_testbed("replay", str(src), "--delegate", d.endpoint, "-o", str(tmp_path / "rp"))
    assert r.returncode == 0, r.stderr
    assert "predicted wall time" in r.stderr and "Traceback" not in r.stderr
    run = rundir.load(tmp_path / "rp")
    assert run.complete and run.meta["mode"] == "replay"
    assert mechanisms.mechanism(run.meta) == "replay/tcp/loopback"
    assert run.meta["replay"]["source"] == str(src.resolve())
    assert run.meta["replay"]["source_mechanism"] == "seccomp/tcp/loopback"
    got, want = run.calls(), rundir.load(src).calls()
    assert len(got) == len(want) == meta["calls"]["count"] >= 400
    for field in ("tid", "nr", "bytes_in"):
        assert sorted(got[field].tolist()) == sorted(want[field].tolist())
    assert ((got["flags"] & rundir.F_FAULT_MASK) == 0).all()
    assert (got["t_reply"] > got["t_send"]).all() and (got["d_send"] > 0).all()
    # analysis reads it as any run: per-syscall summary and an f_c
    assert {row["name"] for row in run.syscalls} == {"openat", "read", "write"}
    assert run.meta["summary"]["f_c_us"] > 0


def test_an_injected_delay_at_the_delegate_raises_the_predicted_wall_time(recording, tmp_path):
    src, meta = recording
    n, delay_us = meta["calls"]["count"], 2000
    with LocalDelegate(["--delay-us", str(delay_us)]) as d:
        for elide in (False, True):
            out = tmp_path / f"rp{int(elide)}"
            r = run_testbed("replay", str(src), "--delegate", d.endpoint, "-o", str(out),
                            *(["--elide-compute"] if elide else []))  # fmt: skip
            assert r.returncode == 0, r.stderr
            m = json.loads((out / "run.json").read_text())
            # every call waited at least the delegate's spin, less this client's own
            # cost per call that the replay takes off (measured, well under 1 ms)
            own = m["replay"]["client_overhead_us"]
            assert own < 1000
            assert m["wall_s"] >= meta["wall_s"] + n * (delay_us - own) * 1e-6
            assert m["replay"]["elide_compute"] is elide
            assert m["delegate"]["delay_us"] == delay_us
            # the model's what-if for the same change sits beside the replay's
            want = meta["wall_s"] + n * delay_us * 1e-6
            assert m["replay"]["model_wall_s"] == pytest.approx(want, rel=1e-9)


def test_asynchronous_writes_against_a_slow_delegate_save_their_waits(recording, tmp_path):
    src, meta = recording
    with LocalDelegate(["--delay-us", "1000"]) as d:
        walls = {}
        for w in (0, 64):
            out = tmp_path / f"rp{w}"
            extra = ["--async-writes", str(w)] if w else []
            r = run_testbed("replay", str(src), "--delegate", d.endpoint, "--elide-compute",
                            "-o", str(out), *extra)  # fmt: skip
            assert r.returncode == 0, r.stderr
            walls[w] = json.loads((out / "run.json").read_text())["replay"]
        r = run_testbed("replay", str(src), "--delegate", d.endpoint, "--async-writes", "4")
        assert r.returncode != 0 and "use it with --elide-compute" in r.stderr
    writes = int((rundir.load(src).calls()["nr"] == 1).sum())
    assert writes >= 200
    # dd writes 200 blocks: answered at once they no longer wait the delegate's 1 ms
    assert walls[64]["composed_wall_s"] < walls[0]["composed_wall_s"] - writes * 0.9e-3
    assert walls[64]["async_writes"] == 64
    assert walls[64]["model_wall_s"] < walls[0]["model_wall_s"]


def test_batched_writes_wait_once_per_message(tmp_path):
    loop = "i=0; while [ $i -lt 64 ]; do echo line $i; i=$((i+1)); done"
    with LocalDelegate(["--delay-us", "1000"]) as d:
        src = tmp_path / "rec"
        r = run_testbed("run", "--quiet", "--delegate", d.endpoint, "--forward", "write",
                        "-o", str(src), "--", "sh", "-c", loop)  # fmt: skip
        assert r.returncode == 0 and r.stdout.count("line") == 64, r.stderr
        got = {}
        for k in (0, 8):
            out = tmp_path / f"rp{k}"
            extra = ["--batch", str(k)] if k else []
            r = run_testbed("replay", str(src), "--delegate", d.endpoint, "--elide-compute",
                            "-o", str(out), *extra)  # fmt: skip
            assert r.returncode == 0, r.stderr
            got[k] = rundir.load(out)
        for bad, why in ((["--batch", "1"], "at least 2"),
                         (["--batch", "4", "--async-writes", "4"], "give one"),
                         (["--batch", "4"], "use it with --elide-compute")):  # fmt: skip
            extra = [] if "elide" in why else ["--elide-compute"]
            r = run_testbed("replay", str(src), "--delegate", d.endpoint, *bad, *extra)
            assert r.returncode != 0 and why in r.stderr, r.stderr
    n = len(rundir.load(src).calls())  # the shell's 64 writes, one after another
    assert n >= 64
    rp = got[8].meta["replay"]
    calls = got[8].calls()
    riders = int((calls["flags"] & rundir.F_BEHIND != 0).sum())
    # groups of 8: all but each group's last rode in another call's message
    assert rp["batched_calls"] == riders == n - -(-n // 8)
    assert int((calls["t_send"] > 0).sum()) == n - riders  # one message per group
    # ... and did not wait for the delegate's 1 ms
    base = got[0].meta["replay"]["composed_wall_s"]
    assert rp["composed_wall_s"] <= base - riders * 0.9e-3
    assert rp["model_wall_s"] < got[0].meta["replay"]["model_wall_s"]


def test_elided_computation_is_added_back_without_waiting_for_it(tmp_path):
    with LocalDelegate() as d:
        src = tmp_path / "rec"
        meta = _record(src, d.endpoint, "sh", "-c", "sleep 1.5; head -c 4096 /dev/zero")
        t0 = time.monotonic()
        r = run_testbed("replay", str(src), "--delegate", d.endpoint, "--elide-compute",
                        "-o", str(tmp_path / "rp"))  # fmt: skip
        took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "rp" / "run.json").read_text())
    assert meta["wall_s"] >= 1.5 and m["wall_s"] >= 1.5  # the sleep is in the prediction
    assert m["replay"]["replay_duration_s"] < 1.5 and took < meta["wall_s"] + 5


@pytest.mark.parametrize("scheme", ["ipc", "shm"])
def test_a_replay_runs_over_other_transports(recording, tmp_path, scheme):
    src, meta = recording
    with LocalDelegate(scheme=scheme) as d:
        r = run_testbed("replay", str(src), "--delegate", d.endpoint, "-o", str(tmp_path / "rp"))
    assert r.returncode == 0, r.stderr
    run = rundir.load(tmp_path / "rp")
    assert mechanisms.mechanism(run.meta) == f"replay/{scheme}/same-node"
    assert len(run.calls()) == meta["calls"]["count"]
    assert run.meta["calls"]["faults"] == 0


def test_a_replay_authenticates_with_curve_like_a_relay(recording, tmp_path):
    src, meta = recording
    keys = tmp_path / "keys"
    assert run_testbed("keys", "new", str(keys), timeout=60).returncode == 0
    with LocalDelegate(["--curve-keys", str(keys)], curve_keys=str(keys)) as d:
        bare = run_testbed("replay", str(src), "--delegate", d.endpoint, "--connect-timeout", "1")
        assert bare.returncode != 0 and "need --curve-keys" in bare.stderr
        r = run_testbed("replay", str(src), "--delegate", d.endpoint, "--curve-keys", str(keys),
                        "-o", str(tmp_path / "rp"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "rp" / "run.json").read_text())
    assert mechanisms.mechanism(m) == "replay/libzmq-curve-tcp/loopback" and m["curve"]
    assert m["calls"]["count"] == meta["calls"]["count"] and m["calls"]["faults"] == 0
    # no C client speaks CURVE here: the client's own cost is not measured, and says so
    assert m["replay"]["client_overhead_us"] == 0
    assert "not measured" in m["replay"]["client_overhead_how"]


def test_a_delegate_that_dies_mid_replay_ends_it_with_faults_not_a_hang(tmp_path):
    with LocalDelegate() as d:
        src = tmp_path / "rec"
        meta = _record(src, d.endpoint, "sh", "-c",
                       "for i in 1 2 3 4 5 6 7 8; do head -c 100 /dev/zero; sleep 0.2; done")  # fmt: skip
    with LocalDelegate() as d:
        proc = subprocess.Popen(
            [sys.executable, "-m", "testbed", "replay", str(src), "--delegate", d.endpoint,
             "--timeout", "0.5", "-o", str(tmp_path / "rp")],
            stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        )  # fmt: skip
        time.sleep(0.6)
        os.kill(d.proc.pid, signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    m = json.loads((tmp_path / "rp" / "run.json").read_text())
    assert m["complete"] and m["calls"]["count"] == meta["calls"]["count"]
    # the first call without a reply marks the delegate lost; the rest run unsent
    assert m["calls"]["timeouts"] >= 1 and m["calls"]["not_sent"] > 0 and "FAULTS" in err
    assert m["replay"]["delegate_lost_at_call"] is not None


def test_bad_input_gets_one_clear_line(tmp_path, recording):
    r = run_testbed("replay", str(tmp_path / "nowhere"), "--delegate", "tcp://127.0.0.1:9")
    assert r.returncode != 0 and "testbed: error:" in r.stderr and "Traceback" not in r.stderr
    src, _meta = recording
    r = run_testbed("replay", str(src), "--delegate", "tcp://127.0.0.1:9", "--connect-timeout",
                    "0.5")  # fmt: skip
    assert r.returncode != 0 and "no delegate answering" in r.stderr
    assert "Traceback" not in r.stderr
    with LocalDelegate(offload_root=tmp_path / "root") as d:
        r = run_testbed("replay", str(src), "--delegate", d.endpoint)
    assert r.returncode != 0 and "needs a cost-mode delegate" in r.stderr


def test_the_report_scores_replays_against_real_runs_of_their_target(recording, tmp_path):
    from analysis import report  # lazy: pandas and matplotlib, this test only

    src, meta = recording
    with LocalDelegate(["--delay-us", "500"]) as d:
        _record(tmp_path / "realB", d.endpoint, *DD)
        r = run_testbed("replay", str(src), "--delegate", d.endpoint, "-o", str(tmp_path / "rp"))
        assert r.returncode == 0, r.stderr
    content = report.build_report([src, tmp_path / "realB", tmp_path / "rp"])
    # the replay is a prediction: in no fit, in no runs table, scored in its own section
    assert sorted(Path(r.path).name for r in content.runs) == ["realB", "rec"]
    table = content.tables["replay_vs_measured"]
    assert len(table) == 1
    row = table.iloc[0]
    real_wall = json.loads((tmp_path / "realB" / "run.json").read_text())["wall_s"]
    replay_wall = json.loads((tmp_path / "rp" / "run.json").read_text())["wall_s"]
    assert row["target_mechanism"] == "seccomp/tcp/loopback+500us"
    assert row["measured_runs"] == 1 and row["measured_from"] == "other runs"
    assert row["measured_wall_s"] == pytest.approx(real_wall)
    assert row["replay_error"] == pytest.approx(replay_wall / real_wall - 1)
    assert row["model_wall_s"] == pytest.approx(meta["wall_s"] + meta["calls"]["count"] * 500e-6)
    md = "\n".join(content.replay.markdown)
    assert "## Replay-predicted vs measured" in md and "Mean |error| over 1 replays" in md


# ------------------------------------------------------------------ in a plan

TINY_PLAN = """
name: whatif-tiny
repetitions: 2
workloads:
  - {name: wc, size_mb: 0.5}
forward:
  - read,write,openat
delegates:
  - {name: near, local: tcp}
  - {name: slow, local: tcp, delay_us: 500}
  - {name: shm, local: shm}
replay: {from: near}
"""


def test_a_plan_records_replays_and_reruns_and_the_report_scores_it(tmp_path):
    from analysis import report  # lazy: pandas and matplotlib, this test only

    plan = tmp_path / "plan.yml"
    plan.write_text(TINY_PLAN)
    res = tmp_path / "res"
    check = run_testbed("experiment", str(plan), "--check")
    assert check.stdout.strip() == "plan whatif-tiny: valid, 6 runs and 4 replays", check.stderr
    r = run_testbed("experiment", str(plan), "-o", str(res), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ran=10 skipped=0 failed=0" in r.stdout
    # each repetition's replays run right after the real runs they predict, before the next
    out = r.stdout + r.stderr
    at = {k: out.index(k) for k in ("[replay 1/4] wc.read+write+openat.slow.r1.",
                                    "[replay 2/4] wc.read+write+openat.shm.r1.",
                                    "wc.read+write+openat.shm.r1  ok",
                                    "wc.read+write+openat.near.r2  ok",
                                    "[replay 3/4] wc.read+write+openat.slow.r2.")}  # fmt: skip
    order = sorted(at, key=at.get)
    assert order == ["wc.read+write+openat.shm.r1  ok", "[replay 1/4] wc.read+write+openat.slow.r1.",
                     "[replay 2/4] wc.read+write+openat.shm.r1.",
                     "wc.read+write+openat.near.r2  ok",
                     "[replay 3/4] wc.read+write+openat.slow.r2."]  # fmt: skip
    host = next(p for p in res.iterdir() if p.is_dir())
    for target in ("slow", "shm"):
        d = host / f"wc.read+write+openat.{target}.r1.replayed-from-near"
        cell = json.loads((d / "experiment.json").read_text())
        assert cell["replay_of"] == "wc.read+write+openat.near.r1" and cell["delegate"] == target
        assert rundir.load(d).meta["replay"]["source"] == str(
            (host / "wc.read+write+openat.near.r1").resolve()
        )
    # resumable: nothing is run twice
    again = run_testbed("experiment", str(plan), "-o", str(res), timeout=300)
    assert again.returncode == 0 and "ran=0 skipped=6 failed=0" in again.stdout
    content = report.build_report([res])
    table = content.tables["replay_vs_measured"]
    assert len(table) == 4
    assert set(table["target_mechanism"]) == {"seccomp/tcp/loopback+500us", "seccomp/shm/same-node"}
    assert (table["measured_from"] == "other runs").all() and (table["measured_runs"] == 2).all()
    # the model has a term for the delay, none for the change of transport
    slow = table["target_mechanism"] == "seccomp/tcp/loopback+500us"
    assert (table.loc[slow, "model_wall_s"] > 0).all()
    assert table.loc[~slow, "model_wall_s"].isna().all()
    # beside each replay, the model's own cross-validated prediction of the same real runs:
    # the repetition scheme predicts r2 from r1 (one workload, one forwarded set)
    acc = content.tables["model_accuracy"]
    for mech, runs in table.groupby("target_mechanism"):
        pred = acc[(acc["mechanism"] == mech) & acc["predicted"].notna()]
        assert list(pred["run"]) == [
            f"wc.read+write+openat.{'slow' if '500' in mech else 'shm'}.r2"
        ]
        assert (runs["model_cv_runs"] == 1).all()
        assert runs["model_cv_wall_s"].tolist() == pytest.approx([pred["predicted"].iloc[0]] * 2)
        want = pred["predicted"].iloc[0] / runs["measured_wall_s"] - 1
        assert runs["model_cv_error"].tolist() == pytest.approx(want.tolist())
    assert "against the model's own" in "\n".join(content.replay.markdown)
    assert len(content.runs) == 6  # the replays are in no fit


@pytest.mark.unit
def test_a_plan_replay_names_a_delegate_with_calls_and_somewhere_to_replay_to(tmp_path):
    from testbed.jobs.experiment.plan import PlanError, parse_plan

    base = {"workloads": ["wc"], "forward": ["read"],
            "delegates": [{"name": "near", "local": "tcp"}, "kthread",
                          {"name": "slow", "local": "tcp", "delay_us": 200}]}  # fmt: skip
    plan = parse_plan({**base, "replay": {"from": "near"}}, "p", "plan")
    assert plan.replay.source == "near" and plan.delegates[2].delay_us == 200
    assert plan.to_json()["replay"] == {"from": "near", "elide_compute": False}
    assert plan.to_json()["delegates"][2]["delay_us"] == 200
    from testbed.jobs.experiment.plan import replay_cells

    assert [rc.run_id for rc in replay_cells(plan)] == ["wc.read.slow.r1.replayed-from-near"]
    for bad, why in (
        ({"from": "far"}, "not a delegate of the plan"),
        ({"from": "kthread"}, "not a delegate of the plan"),
        ({"from": "near", "elide_compute": "yes"}, "true or false"),
        ({"to": "near"}, "replay is"),
        ("near", "replay is"),
    ):
        with pytest.raises(PlanError, match=why):
            parse_plan({**base, "replay": bad}, "p", "plan")
    only = {**base, "delegates": [{"name": "near", "local": "tcp"}, "kthread"]}
    with pytest.raises(PlanError, match="no other delegate"):
        parse_plan({**only, "replay": {"from": "near"}}, "p", "plan")
    bad_delay = {**base, "delegates": [{"name": "x", "local": "tcp", "delay_us": -1}]}
    with pytest.raises(PlanError, match="delay_us"):
        parse_plan(bad_delay, "p", "plan")


# ------------------------------------------------------------------ a capped link

_netns_ok, _netns_why = netns.available()


@pytest.mark.root
@pytest.mark.netns
@pytest.mark.skipif(not _netns_ok, reason=f"needs network namespaces: {_netns_why}")
def test_a_replay_across_a_capped_link_pays_the_transmission_the_model_adds(tmp_path):
    from analysis import model  # lazy: numpy maths, this test only

    with LocalDelegate() as d:  # recorded on loopback: 64 KiB writes
        src = tmp_path / "rec"
        r = run_testbed("run", "--quiet", "--delegate", d.endpoint, "--forward", "write",
                        "-o", str(src), "--", "dd", "if=/dev/zero", "of=/dev/null",
                        "bs=64k", "count=12", "status=none")  # fmt: skip
        assert r.returncode == 0, r.stderr
    meta = json.loads((src / "run.json").read_text())
    sent = int(rundir.load(src).calls()["bytes_in"].sum())
    assert sent >= 12 * 65536
    with netns.Topology(["compute", "delegate"]) as topo:
        assert topo.shape("compute", "8mbit") == 8_000_000  # the requests' direction
        qdisc = topo.run("compute", ["tc", "qdisc", "show", "dev", "eth0"], capture_output=True,
                         text=True).stdout  # fmt: skip
        assert "tbf" in qdisc and "8Mbit" in qdisc
        ep = f"tcp://{topo.addr('delegate')}:5571"
        topo.popen("delegate", tb_argv("delegate", "--listen", ep, "--quiet"))
        argv = tb_argv("replay", str(src), "--delegate", ep, "-o", str(tmp_path / "rp"),
                       "--connect-timeout", "10")  # fmt: skip
        res = topo.run("compute", argv, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "rp" / "run.json").read_text())
    assert m["calls"]["faults"] == 0
    # each 64 KiB request waited for its transmission at 8 Mbit/s (65 ms), less the
    # bucket's 16 KiB burst: the model's term, bounded from below
    floor = model.t_d_with_bandwidth(meta["wall_s"], sent - 12 * 16384, 8e6)
    assert m["wall_s"] >= floor
    with pytest.raises(netns.NetnsError, match="64kbit to 100gbit"):
        netns.parse_rate("8 furlongs")
