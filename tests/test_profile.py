"""`testbed profile`: real programs, checked against an independent strace count."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.jobs.catalogue import prepare
from testbed.jobs.profile import parse_perf_summary, parse_strace, perf_works

PY = sys.executable


def tb(*args, stdout: Path | None = None, **kw):
    """``testbed ARGS``; the program's stdout to the file ``stdout`` (workloads write
    their result there: ``tar -cf -`` skips its reads when it writes to /dev/null)."""
    if stdout is None:
        return subprocess.run([PY, "-m", "testbed", *args], capture_output=True, text=True,
                              timeout=180, **kw)  # fmt: skip
    with open(stdout, "wb") as f:
        return subprocess.run([PY, "-m", "testbed", *args], stdout=f, stderr=subprocess.PIPE,
                              text=True, timeout=180, **kw)  # fmt: skip


def strace_c(argv, stdout: Path) -> dict[str, int]:
    """Independent per-syscall counts: strace -f -c on the program alone."""
    with open(stdout, "wb") as f:
        r = subprocess.run(["strace", "-f", "-c", "-U", "name,calls", "-o", "/dev/stderr", *argv],
                           stdout=f, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    out = {}
    for line in r.stderr.splitlines():
        m = re.match(r"^\s*(\w+)\s+(\d+)\s*$", line)
        if m and m[1] != "total":
            out[m[1]] = int(m[2])
    return out


def load(d: Path) -> tuple[dict, dict[str, dict]]:
    meta = json.loads((d / "run.json").read_text())
    with open(d / "syscalls.csv") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    return meta, rows


@pytest.fixture(scope="module")
def have_tracers():
    if not shutil.which("strace"):
        pytest.skip("strace not installed (apt-get install strace)")


@pytest.mark.parametrize("method", ["auto", "strace"])
@pytest.mark.parametrize("workload", ["bzip2", "tar-tree"])
def test_profile_agrees_with_strace(tmp_path, workload, method, have_tracers):
    """The default profile (strace, exact counts) agrees with strace -c on every syscall."""
    argv = prepare(workload, tmp_path / "in", 0.5)
    r = tb("profile", "--quiet", "--method", method, "-o", str(tmp_path / "prof"), "--", *argv,
           stdout=tmp_path / "ours.out")  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta, rows = load(tmp_path / "prof")
    assert meta["kind"] == "profile" and meta["exit_status"] == 0
    exact = True  # auto picks strace when it is installed (have_tracers)
    assert meta["method"] == "strace -f -T"
    traced = strace_c(argv, tmp_path / "theirs.out")
    independent = {k: v for k, v in traced.items() if k != "exit_group"}
    assert (tmp_path / "ours.out").read_bytes() == (tmp_path / "theirs.out").read_bytes()
    ours = {k: int(v["n"]) for k, v in rows.items() if k != "exit_group"}
    top = sorted(independent, key=lambda k: -independent[k])[:3]
    assert {k: ours.get(k) for k in top} == {k: independent[k] for k in top}  # the heavy hitters
    if exact:
        assert ours == independent  # and every other call too
    for r_ in rows.values():
        assert int(r_["n"]) > 0 and int(r_["g_ns"]) >= 0 and int(r_["errors"]) >= 0
    assert int(rows["read"]["g_ns"]) > 0


def test_profile_of_true_matches_strace_call_for_call(tmp_path, have_tracers):
    """Nothing of the shim leaks into the profile (its pre-exec calls are calibrated out)."""
    r = tb("profile", "--quiet", "-o", str(tmp_path / "t"), "--", "/usr/bin/true")
    assert r.returncode == 0, r.stderr
    meta, rows = load(tmp_path / "t")
    ours = {k: int(v["n"]) for k, v in rows.items() if k != "exit_group"}
    theirs = {
        k: v
        for k, v in strace_c(["/usr/bin/true"], tmp_path / "true.out").items()
        if k != "exit_group"
    }
    assert ours == theirs
    assert isinstance(meta["shim_calls_removed"], dict)  # what was calibrated out is recorded


def test_run_json_fields_and_derived_numbers(tmp_path, have_tracers):
    argv = prepare("bzip2", tmp_path / "in", 0.25)
    out = tmp_path / "p.out"
    assert (
        tb("profile", "--quiet", "-o", str(tmp_path / "p"), "--", *argv, stdout=out).returncode == 0
    )
    meta, rows = load(tmp_path / "p")
    for k in ("command", "exit_status", "wall_s", "user_s", "sys_s", "C_s", "p_sys", "p_g",
              "method", "host", "t_nd_s", "threads"):  # fmt: skip
        assert k in meta, k
    assert meta["command"] == argv
    g = sum(int(r["g_ns"]) for r in rows.values()) / 1e9
    assert meta["g_total_s"] == pytest.approx(g)
    cpu = meta["user_s"] + meta["sys_s"]
    assert meta["p_sys"] == pytest.approx(meta["sys_s"] / cpu)
    assert meta["p_g"] == pytest.approx(g / meta["wall_s"])
    assert meta["C_s"] == pytest.approx(meta["user_s"])
    assert meta["t_nd_s"] == pytest.approx(meta["C_s"] + g)
    assert meta["threads"] == 1 and meta["host"]["kernel"]
    assert out.read_bytes()[:3] == b"BZh" and len(out.read_bytes()) > 1000  # bzip2 really ran


def test_native_runs_are_timed_untraced(tmp_path, have_tracers):
    argv = prepare("tar-tree", tmp_path / "in", 0.3)
    r = tb("profile", "--quiet", "--native-runs", "3", "-o", str(tmp_path / "n"), "--", *argv,
           stdout=tmp_path / "n.out")  # fmt: skip
    assert r.returncode == 0, r.stderr
    meta, _ = load(tmp_path / "n")
    nat = meta["native"]
    assert nat["runs"] == 3 and len(nat["walls_s"]) == 3
    assert nat["wall_s"] == sorted(nat["walls_s"])[1]  # the median
    assert all(w > 0 for w in nat["walls_s"])


def test_strace_fallback_and_exit_status(tmp_path, have_tracers):
    r = tb("profile", "--quiet", "--method", "strace", "-o", str(tmp_path / "s"), "--",
           "sh", "-c", "ls / >/dev/null; exit 3")  # fmt: skip
    assert r.returncode == 3, r.stderr
    meta, rows = load(tmp_path / "s")
    assert meta["method"] == "strace -f -T" and meta["exit_status"] == 3
    assert meta["threads"] == 2  # sh and ls
    assert int(rows["getdents64"]["n"]) >= 2 and int(rows["execve"]["n"]) >= 2


def test_perf_and_strace_methods_agree(tmp_path, have_tracers):
    if not perf_works():
        pytest.skip("perf trace -s does not work on this machine")
    argv = prepare("tar-tree", tmp_path / "in", 0.3)
    for m in ("perf", "strace"):
        assert (
            tb(
                "profile",
                "--quiet",
                "--method",
                m,
                "-o",
                str(tmp_path / m),
                "--",
                *argv,
                stdout=tmp_path / f"{m}.out",
            ).returncode
            == 0
        )
    meta, a = load(tmp_path / "perf")
    _, b = load(tmp_path / "strace")
    # perf trace reads a ring buffer and can drop a few calls without saying so
    # (why auto uses strace): it must never over-count, and loses at most 2 %
    for name in ("newfstatat", "openat", "read", "write"):
        perf_n, exact_n = int(a[name]["n"]), int(b[name]["n"])
        assert exact_n * 0.98 <= perf_n <= exact_n, (name, perf_n, exact_n, meta["lost_events"])


def test_signal_exit_status(tmp_path, have_tracers):
    r = tb("profile", "--quiet", "-o", str(tmp_path / "k"), "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + 15


@pytest.mark.parametrize(
    "args,msg",
    [(["--", "/no/such/program"], "not found"), ([], "no program given")],
)
def test_profile_errors_are_one_line(tmp_path, args, msg):
    r = tb("profile", "-o", str(tmp_path / "e"), *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: error:") and msg in lines[0]


def test_existing_nonempty_output_is_refused(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    r = tb("profile", "-o", str(tmp_path / "o"), "--", "true")
    assert r.returncode != 0 and "not empty" in r.stderr


PERF_TEXT = """
 Summary of events:

 python3 (100), 10 events, 50.0%

   syscall            calls  errors  total       min       avg       max       stddev
                                     (msec)    (msec)    (msec)    (msec)        (%)
   --------------- --------  ------ -------- --------- --------- ---------     ------
   read                   9      0     5.000     0.001     0.010     0.100     10.00%

 prog (101), 12 events, 40.0%

   syscall            calls  errors  total       min       avg       max       stddev
   --------------- --------  ------ -------- --------- --------- ---------     ------
   read                   4      1     0.250     0.001     0.010     0.100     10.00%
   write                  2      0     0.004     0.001     0.002     0.003      1.00%

 prog (102), 3 events, 10.0%

   syscall            calls  errors  total       min       avg       max       stddev
   --------------- --------  ------ -------- --------- --------- ---------     ------
   read                   1      0     0.001     0.001     0.001     0.001      0.00%
"""


@pytest.mark.unit
def test_parse_perf_summary_sums_threads_and_drops_the_shim():
    t = parse_perf_summary(PERF_TEXT, exclude_tids=[100])
    assert t == {"read": {"n": 5, "g_ns": 251_000, "errors": 1},
                 "write": {"n": 2, "g_ns": 4_000, "errors": 0}}  # fmt: skip


STRACE_TEXT = """\
7 read(3, "abc", 3) = 3 <0.000010>
8 openat(AT_FDCWD, "/nope", O_RDONLY) = -1 ENOENT (No such file or directory) <0.000020>
8 read(4,  <unfinished ...>
9 write(1, "x", 1) = 1 <0.000001>
8 <... read resumed>"", 10) = 0 <0.000500>
8 +++ exited with 0 +++
8 exit_group(0) = ?
"""


@pytest.mark.unit
def test_parse_strace_counts_split_calls_once():
    t = parse_strace(STRACE_TEXT, exclude_pids=[9])
    assert t["read"] == {"n": 2, "g_ns": 510_000, "errors": 0}
    assert t["openat"] == {"n": 1, "g_ns": 20_000, "errors": 1}
    assert t["exit_group"]["n"] == 1 and "write" not in t
