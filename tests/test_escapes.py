"""run.json ``escapes``: what the forwarded set could not see (testbed/compute/escapes.py).

Real programs under ``testbed run``: an io_uring writer (raw syscalls, compiled
here), a writer through a shared file mapping, ``dd`` forwarding only ``read``,
a program whose dead thread and reaped child wrote too, and a forwarded vDSO
call.  The pure parts (the classification, the arithmetic, the report's table)
are unit tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from analysis import escapes as report_escapes
from analysis.report import build_report, render_markdown
from analysis.synthetic import delegated_run
from testbed.compute import escapes
from testbed.compute.interpose import WATCH_KEYS, count_watched
from testbed.compute.run import run
from testbed.compute.spec import RunSpec
from testbed.core import rundir, syscalls
from tests.conftest import run_testbed

NR = syscalls.NR_BY_NAME

# ---------------------------------------------------------------- programs

#: IORING_OP_WRITE of one line to stdout, N times, one io_uring_enter each (no liburing).
URING_C = r"""
#include <linux/io_uring.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 3;
    struct io_uring_params p;
    static const char msg[] = "written by io_uring\n";

    memset(&p, 0, sizeof(p));
    int fd = (int)syscall(__NR_io_uring_setup, 4, &p);
    if (fd < 0)
        return 2;
    unsigned char *sq = mmap(0, p.sq_off.array + p.sq_entries * sizeof(unsigned),
                 PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                 IORING_OFF_SQ_RING);
    unsigned char *cq = mmap(0, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe),
                 PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                 IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(0, p.sq_entries * sizeof(*sqes), PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED)
        return 3;
    unsigned *tail = (unsigned *)(sq + p.sq_off.tail), *smask = (unsigned *)(sq + p.sq_off.ring_mask);
    unsigned *array = (unsigned *)(sq + p.sq_off.array);
    unsigned *head = (unsigned *)(cq + p.cq_off.head), *ctail = (unsigned *)(cq + p.cq_off.tail);
    unsigned *cmask = (unsigned *)(cq + p.cq_off.ring_mask);
    struct io_uring_cqe *cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);

    for (int i = 0; i < n; i++) {
        unsigned t = *tail, idx = t & *smask;
        struct io_uring_sqe *s = &sqes[idx];

        memset(s, 0, sizeof(*s));
        s->opcode = IORING_OP_WRITE;
        s->fd = 1;
        s->addr = (unsigned long)msg;
        s->len = sizeof(msg) - 1;
        s->off = (unsigned long long)-1;
        array[idx] = idx;
        __atomic_store_n(tail, t + 1, __ATOMIC_RELEASE);
        if (syscall(__NR_io_uring_enter, fd, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0)
            return 4;
        unsigned h = __atomic_load_n(head, __ATOMIC_ACQUIRE);
        if (h == __atomic_load_n(ctail, __ATOMIC_ACQUIRE) ||
            cqes[h & *cmask].res != (int)sizeof(msg) - 1)
            return 5;
        __atomic_store_n(head, h + 1, __ATOMIC_RELEASE);
    }
    return 0;
}
"""

#: PAGES pages written through a writable MAP_SHARED mapping of a new file: no write call.
MAPWRITE_PY = """
import mmap, os, sys
path, pages = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, pages * 4096)
m = mmap.mmap(fd, pages * 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
for i in range(pages):
    m[i * 4096:(i + 1) * 4096] = bytes([65 + i % 26]) * 4096
m.close()
os.close(fd)
"""

#: 300 writes in a thread that ends, 200 in a child it reaps, 100 of its own.
FAMILY_PY = """
import os, threading
def w(n):
    fd = os.open("/dev/null", os.O_WRONLY)
    for _ in range(n):
        os.write(fd, b"x" * 1000)
    os.close(fd)
t = threading.Thread(target=w, args=(300,))
t.start()
t.join()
pid = os.fork()
if pid == 0:
    w(200)
    os._exit(0)
os.waitpid(pid, 0)
w(100)
"""


def _io_uring_allowed() -> bool:
    try:
        return Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() == "0"
    except OSError:
        return True  # (kernels before 6.6 have no switch)


@pytest.fixture(scope="module")
def uring_exe() -> Path:
    if not _io_uring_allowed():
        pytest.skip("io_uring is disabled here (/proc/sys/kernel/io_uring_disabled)")
    from testbed.jobs.latency import compile_c

    exe = compile_c("uring_write", URING_C)
    if subprocess.run([str(exe), "1"], capture_output=True).returncode != 0:
        pytest.skip("io_uring_setup is refused here")
    return exe


def _run(delegate, program, forward, out_dir: Path, stdout=None) -> dict:
    res = run(RunSpec(program, delegate=delegate.endpoint, forward=forward, output=out_dir),
              stdout=stdout)  # fmt: skip
    assert res.exit_status == 0
    assert res.meta == rundir.load(res.path).meta
    return res.meta


# ---------------------------------------------------------------- real runs


@pytest.mark.parametrize("fast", ["c", "python"])
def test_io_uring_calls_are_counted_exactly_and_not_forwarded(delegate, uring_exe, tmp_path,
                                                              monkeypatch, fast):  # fmt: skip
    monkeypatch.setenv("TESTBED_FASTPATH", "1" if fast == "c" else "0")
    native = subprocess.run([str(uring_exe), "7"], capture_output=True, check=True).stdout
    assert native == b"written by io_uring\n" * 7
    with open(tmp_path / "out", "wb") as f:
        meta = _run(delegate, [str(uring_exe), "7"], "write", tmp_path / "r", stdout=f)
    assert (tmp_path / "out").read_bytes() == native  # byte-identical to the native run
    assert meta["hot_path"]["c"] is (fast == "c")
    e = meta["escapes"]
    assert e["io_uring"] == {"setup": 1, "enter": 7}
    # the three ring mappings are writable MAP_SHARED mappings of the ring's fd
    assert e["mmap_files"]["shared_writable"] == 3
    assert e["mmap_files"]["all"] >= 3  # (plus the loader's: libc)
    # the writes went through the ring: none trapped, and the kernel counted none either
    assert meta["calls"]["count"] == 0 and e["forwarded_io"]["write_calls"] == 0
    assert e["proc_io"]["since"] == "exec" and e["proc_io"]["syscw"] == 0
    rows = {r["name"] for r in rundir.load(tmp_path / "r").syscalls}
    assert not rows & {"io_uring_setup", "io_uring_enter", "mmap"}  # not in calls.bin
    assert e["vdso"] == [] and e["why_null"] == {}


def test_writes_through_a_shared_file_mapping_are_not_seen(delegate, tmp_path):
    pages = 64
    meta = _run(delegate, [sys.executable, "-S", "-c", MAPWRITE_PY, str(tmp_path / "m"),
                           str(pages)], "write,pwrite64,writev", tmp_path / "r")  # fmt: skip
    assert (tmp_path / "m").read_bytes()[:4096] == b"A" * 4096
    e = meta["escapes"]
    assert e["mmap_files"]["shared_writable"] == 1
    assert e["mmap_files"]["all"] > 1  # the interpreter's libraries
    # the pages reached the file's page cache (write_bytes: dirtied pages) with no
    # write call at all: not in wchar, not among the forwarded calls
    io = e["proc_io"]
    assert io["write_bytes"] >= pages * 4096
    assert io["wchar"] < 4096 and e["forwarded_io"]["write_bytes"] < 4096


def test_dd_forwarding_only_read_leaves_its_writes_unseen(delegate, tmp_path):
    if shutil.which("dd") is None:
        pytest.skip("dd is not installed")
    program = ["dd", "if=/dev/zero", f"of={tmp_path / 'f'}", "bs=4096", "count=100"]
    meta = _run(delegate, program, "read", tmp_path / "r")
    assert (tmp_path / "f").stat().st_size == 409600
    e = meta["escapes"]
    assert e["forwarded_io"]["read_calls"] == meta["calls"]["count"] >= 100
    assert e["forwarded_io"]["write_calls"] == 0
    assert e["unseen"]["write_calls"] >= 100
    assert e["unseen"]["write_bytes"] >= 409600
    # the forwarded reads were seen: what is left is the kernel's own reads at execve
    # and any the loader made (a handful), not dd's 100
    assert e["unseen"]["read_calls"] < 50
    assert e["io_uring"] == {"setup": 0, "enter": 0}


def test_proc_io_includes_dead_threads_and_reaped_children(delegate, tmp_path):
    """Read at the zombie: the thread's 300 writes, the child's 200 and its own 100."""
    meta = _run(delegate, [sys.executable, "-S", "-c", FAMILY_PY], "read", tmp_path / "r")
    e = meta["escapes"]
    assert e["proc_io"]["syscw"] == 600
    assert e["proc_io"]["wchar"] == 600_000
    assert e["unseen"]["write_calls"] == 600 and e["unseen"]["write_bytes"] == 600_000


def test_forwarding_a_vdso_call_warns_and_is_listed(delegate, tmp_path):
    res = run_testbed("run", "--delegate", delegate.endpoint, "--forward",
                      "clock_gettime,write", "-o", str(tmp_path / "r"), "--", "true")  # fmt: skip
    assert res.returncode == 0, res.stderr
    err = res.stderr.decode()
    warn = [ln for ln in err.splitlines() if "vDSO" in ln]
    assert len(warn) == 1 and warn[0].startswith("testbed: warning: clock_gettime ")
    meta = json.loads((tmp_path / "r" / "run.json").read_text())
    assert meta["escapes"]["vdso"] == ["clock_gettime"]
    quiet = run_testbed("run", "--delegate", delegate.endpoint, "--forward", "write",
                        "-o", str(tmp_path / "q"), "--", "true")  # fmt: skip
    assert quiet.returncode == 0 and b"vDSO" not in quiet.stderr


# ---------------------------------------------------------------- pure parts


@pytest.mark.unit
def test_count_watched_classifies_mmaps():
    counts = [0] * len(WATCH_KEYS)
    count_watched(counts, NR["io_uring_setup"], (0,) * 6)
    for _ in range(3):
        count_watched(counts, NR["io_uring_enter"], (0,) * 6)
    count_watched(counts, NR["mmap"], (0, 4096, 0x1, 0x02, 3, 0))  # PROT_READ, MAP_PRIVATE
    count_watched(counts, NR["mmap"], (0, 4096, 0x3, 0x02, 3, 0))  # writable but private
    count_watched(counts, NR["mmap"], (0, 4096, 0x1, 0x01, 3, 0))  # shared, read-only
    count_watched(counts, NR["mmap"], (0, 4096, 0x3, 0x01, 3, 0))  # MAP_SHARED, PROT_WRITE
    count_watched(counts, NR["mmap"], (0, 4096, 0x2, 0x03, 3, 0))  # MAP_SHARED_VALIDATE
    assert dict(zip(WATCH_KEYS, counts, strict=True)) == {
        "io_uring_setup": 1, "io_uring_enter": 3, "mmap_file": 5, "mmap_file_shared_write": 2}  # fmt: skip


def _rows(**counts) -> list[dict]:
    """Per-syscall rows as rundir.summarize_all makes them: name=(n, bytes_in)."""
    return [{"name": k, "nr": NR[k], "n": n, "bytes_in": b} for k, (n, b) in counts.items()]


IO = {"rchar": 5000, "wchar": 10_000, "syscr": 12, "syscw": 30, "read_bytes": 0,
      "write_bytes": 8192}  # fmt: skip


@pytest.mark.unit
def test_build_subtracts_the_launcher_and_the_forwarded_calls():
    start = {k: 1 for k in IO}  # the launcher's I/O before its execve
    e = escapes.build(forwarded=frozenset({NR["write"], NR["read"], NR["clock_gettime"]}),
                      mode="cost", backend="seccomp", watched=[1, 2, 9, 1], start_io=start,
                      end_io=IO, rows=_rows(write=(20, 4000), pwrite64=(5, 999),
                                            read=(40, 0)))  # fmt: skip
    assert e["proc_io"] == {**{k: max(0, v - 1) for k, v in IO.items()}, "since": "exec"}
    assert e["forwarded_io"] == {"read_calls": 40, "write_calls": 25, "write_bytes": 4999}
    # syscr 11 - 40 forwarded reads: clamped at 0; syscw 29 - 25; wchar 9999 - 4999
    assert e["unseen"] == {"read_calls": 0, "write_calls": 4, "write_bytes": 5000}
    assert e["io_uring"] == {"setup": 1, "enter": 2}
    assert e["mmap_files"] == {"all": 9, "shared_writable": 1}
    assert e["vdso"] == ["clock_gettime"] and e["why_null"] == {}


@pytest.mark.unit
def test_build_says_why_a_count_is_missing():
    e = escapes.build(forwarded=frozenset({NR["read"]}), mode="cost", backend="kmod",
                      watched=None, start_io=None, end_io="/proc/9/io: Permission denied",
                      rows=[])  # fmt: skip
    assert e["proc_io"] is None and e["unseen"] is None
    assert e["io_uring"] is None and e["mmap_files"] is None
    assert e["why_null"]["proc_io"] == "/proc/9/io: Permission denied"
    assert "kmod backend" in e["why_null"]["io_uring"]
    off = escapes.build(forwarded=frozenset({NR["read"], NR["mmap"]}), mode="offload",
                        backend="seccomp", watched=None, start_io=None, end_io=IO, rows=[])  # fmt: skip
    assert off["proc_io"]["since"] == "launch" and off["unseen"] is None
    assert "ENOSYS" in off["why_null"]["io_uring"] and "offload" in off["why_null"]["unseen"]
    assert "mmap is forwarded" in off["why_null"]["mmap_files"]
    # forwarded io_uring calls are counted from calls.bin (the rows)
    fwd = escapes.build(forwarded=frozenset({NR["io_uring_setup"], NR["io_uring_enter"]}),
                        mode="cost", backend="kmod", watched=None, start_io=None, end_io=IO,
                        rows=_rows(io_uring_enter=(4, 0)))  # fmt: skip
    assert fwd["io_uring"] == {"setup": 0, "enter": 4}
    assert escapes.watch_set("cost", "seccomp") and not escapes.watch_set("offload", "seccomp")
    assert not escapes.watch_set("cost", "kmod")


@pytest.mark.unit
def test_the_report_table_has_a_row_per_run_with_escapes_only(tmp_path):
    esc = escapes.build(forwarded=frozenset({NR["read"], NR["time"]}), mode="cost",
                        backend="seccomp", watched=[1, 7, 8, 3],
                        start_io=None, end_io=IO, rows=_rows(read=(10, 0)))  # fmt: skip
    old = SimpleNamespace(path=tmp_path / "old", meta={"kind": "delegated"})
    new = SimpleNamespace(path=tmp_path / "new", meta={"escapes": esc})
    nulls = SimpleNamespace(path=tmp_path / "k", meta={"escapes": {**esc, "io_uring": None}})
    df = report_escapes.table([old, new, nulls])
    assert df["run"].tolist() == ["new", "k"]
    r = df.iloc[0]
    assert (r["io_uring_calls"], r["file_mmaps"], r["shared_writable_mmaps"]) == (8, 8, 3)
    assert (r["read_calls_not_seen"], r["write_calls_not_seen"]) == (2, 30)
    assert r["bytes_written_not_seen"] == 10_000 and r["vdso_forwarded"] == "time"
    assert df.iloc[1]["io_uring_calls"] is None
    md = "\n".join(report_escapes.markdown(df))
    assert "## What the forwarded set did not see" in md and "| new | 8 | 8 | 3 |" in md
    assert "| new | 8 | 8 | 3 | 2 | 30 | 10000 | time |" in md  # ints, even beside a None
    assert "| k | – | 8 | 3 |" in md
    assert report_escapes.markdown(report_escapes.table([old])) == []


@pytest.mark.unit
def test_the_report_renders_the_table_and_older_runs_render_without_it(tmp_path):
    def make(name: str, esc: dict | None) -> Path:
        p = delegated_run(tmp_path / name, ["prog", "x"], {"write": 50}, 20e-6, 0.5,
                          native=False, seed=len(name))  # fmt: skip
        if esc is not None:
            meta = rundir.load(p).meta
            rundir.write_meta(p, {**meta, "escapes": esc})
        return p

    esc = escapes.build(forwarded=frozenset({NR["write"]}), mode="cost", backend="seccomp",
                        watched=[0, 0, 12, 1], start_io=None, end_io=IO,
                        rows=_rows(write=(50, 4000)))  # fmt: skip
    old = make("old", None)
    c = build_report([old])
    assert "escapes" not in c.tables
    assert "did not see" not in render_markdown(c, "now")
    c = build_report([old, make("new", esc)])
    assert c.tables["escapes"]["run"].tolist() == ["new"]
    md = render_markdown(c, "now")
    assert "## What the forwarded set did not see" in md
    assert "| new | 0 | 12 | 1 | 12 | 0 | 6000 | – |" in md
    section = md.split("did not see", 1)[1].split("\n## ", 1)[0]
    assert [ln for ln in section.splitlines() if ln.startswith("| ")][1:] == [
        "| new | 0 | 12 | 1 | 12 | 0 | 6000 | – |"
    ]  # header, then only the new run
