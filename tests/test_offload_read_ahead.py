# ruff: noqa: F811  (the lab fixture of tests/test_offload.py is imported by name)
"""Offload read-ahead (docs/offload.md, "Read-ahead"): ``--offload-read-ahead N``.

Real programs across two network namespaces, each compared byte for byte with
a native run of the same script: cat, tar and md5sum reading offloaded files
through a read-ahead stream; a program that interleaves sequential reads with
lseek, a write through another fd, a forked child reading the shared fd, and
reads at a growing end of file, where every answer must be the kernel's; a
delegate killed in the middle of a stream (EIO, no hang); bad options.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from testbed.core import rundir
from tests.conftest import run_testbed, tb_argv
from tests.test_offload import Lab, lab, offload  # noqa: F401 (fixture)
from tests.test_two_node import _start_delegate

pytestmark = [pytest.mark.root, pytest.mark.netns]

RA = ("--offload-read-ahead", "4")


def _files(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(21)
    (d / "big").write_bytes(rng.integers(0, 256, 6 * (1 << 20) + 12345, dtype=np.uint8).tobytes())
    (d / "f").write_bytes(rng.integers(0, 256, 20 * 65536 + 777, dtype=np.uint8).tobytes())
    for name in ("big", "f"):  # tar records mtimes: the same in both trees
        os.utime(d / name, (1_700_000_000, 1_700_000_000))


def _both(lab: Lab, tmp_path: Path, name: str, script: str, extra=RA):
    """``sh -c script`` natively (P = a local copy) and offloaded (P = PREFIX/name)."""
    for base in (lab.native, lab.root):
        shutil.rmtree(base / name, ignore_errors=True)
        _files(base / name)
    native = subprocess.run(["sh", "-c", script.format(P=lab.native / name)],
                            capture_output=True, timeout=300)  # fmt: skip
    assert native.returncode == 0, native.stderr.decode()
    res = offload(lab, tmp_path / "run", ["sh", "-c", script.format(P=lab.prefix / name)],
                  extra=extra)  # fmt: skip
    assert b"Traceback" not in res.stderr, res.stderr.decode()
    return native, res


def _meta(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "run.json").read_text())


def test_sequential_readers_match_native_and_are_served_ahead(lab, tmp_path):
    script = ("cat {P}/big | md5sum && cat {P}/big > /dev/null && "
              "tar -cf - -C {P} big f | md5sum && head -c 300000 {P}/big | md5sum && "
              "dd if={P}/f bs=65536 status=none | md5sum")  # fmt: skip
    native, res = _both(lab, tmp_path, "seq", script)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == native.stdout and len(res.stdout.splitlines()) == 4
    ra = _meta(tmp_path)["offload"]["read_ahead"]
    assert ra["active"] is True and ra["depth"] == 4
    # cat reads 128 KiB at a time: after two reads, the rest of the 6 MiB come from reads
    # sent ahead (twice), dd's 64 KiB reads likewise
    assert ra["served"] >= 2 * (6 * 8 - 3), ra
    assert ra["issued"] >= ra["served"]
    # head stopped early: what it did not use was given back, and counted
    assert ra["wasted"] >= 1 and ra["undone_bytes"] > 0
    calls = rundir.load(tmp_path / "run").calls()
    ahead = calls[(calls["flags"] & rundir.F_AHEAD) != 0]
    assert len(ahead) == ra["served"]
    assert (ahead["t_send"] < ahead["t_trap"]).any()  # sent before the program asked
    assert (ahead["bytes_out"] == np.maximum(ahead["ret"], 0)).all()
    # their round trips are no round trips: kept out of f_c
    assert not rundir.usable(ahead).any()


MIXED = textwrap.dedent("""\
    import hashlib, os, sys
    p = sys.argv[1]
    fd = os.open(p + "/f", os.O_RDWR)
    def say(*a):
        print(*a, flush=True)
    def h(b):
        return hashlib.md5(b).hexdigest()[:12] + "/" + str(len(b))
    say("r", [h(os.read(fd, 65536)) for _ in range(5)])       # a stream starts
    say("pos", os.lseek(fd, 0, os.SEEK_CUR))                   # given back: 5 * 65536
    say("r", [h(os.read(fd, 65536)) for _ in range(3)])
    say("r4096", h(os.read(fd, 4096)))                          # another size: settled
    say("r", [h(os.read(fd, 65536)) for _ in range(3)])       # fd given up on: twice wasted
    fd = os.open(p + "/f", os.O_RDONLY)                        # a new description
    fd2 = os.open(p + "/f", os.O_RDWR)
    say("r", [h(os.read(fd, 65536)) for _ in range(3)])
    os.pwrite(fd2, b"X" * 100, 5 * 65536 + 10)                 # ahead of the stream
    say("after write", [h(os.read(fd, 65536)) for _ in range(3)])
    pid = os.fork()
    if pid == 0:                                                # the shared description
        say("child", [h(os.read(fd, 65536)) for _ in range(2)])
        os._exit(0)
    os.waitpid(pid, 0)
    rest = []
    while True:                                                 # after the child's reads
        b = os.read(fd, 65536)
        rest.append(h(b))
        if not b:
            break
    say("to eof", rest)
    say("pos at eof", os.lseek(fd, 0, os.SEEK_CUR))
    os.write(fd2, b"appended")                                 # fd2 is at its own offset
    os.lseek(fd2, 0, os.SEEK_END)
    os.write(fd2, b"tail" * 5000)
    say("grown", [h(os.read(fd, 65536)) for _ in range(3)])    # the end moved: not stale
    say("stat", os.fstat(fd).st_size)
    say("final", h(open(p + "/f", "rb").read()))
""")


def test_interleaved_calls_see_what_the_kernel_would(lab, tmp_path):
    (tmp_path / "mixed.py").write_text(MIXED)
    native, res = _both(lab, tmp_path, "mixed", f"python3 {tmp_path}/mixed.py {{P}}")
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().splitlines() == native.stdout.decode().splitlines()
    assert (lab.root / "mixed" / "f").read_bytes() == (lab.native / "mixed" / "f").read_bytes()
    ra = _meta(tmp_path)["offload"]["read_ahead"]
    # the first fd: 3 + 1 reads served, then given up on after two streams thrown away;
    # the second: 1 before the writer settled it, 1 + the child's 2 + the rest to EOF
    assert ra["served"] >= 4 + 1 + 3 + 8 and ra["wasted"] >= 8 and ra["lseeks"] >= 6, ra
    assert ra["undone_bytes"] % 65536 == 0


def test_without_the_option_nothing_is_read_ahead(lab, tmp_path):
    native, res = _both(lab, tmp_path, "off", "cat {P}/big | md5sum", extra=())
    assert res.returncode == 0 and res.stdout == native.stdout
    meta = _meta(tmp_path)
    assert "read_ahead" not in meta["offload"]
    calls = rundir.load(tmp_path / "run").calls()
    assert not ((calls["flags"] & rundir.F_AHEAD) != 0).any()


SLOW_READER = textwrap.dedent("""\
    import os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY)
    n = 0
    try:
        while True:
            b = os.read(fd, 65536)
            if not b:
                break
            n += len(b)
            time.sleep(0.02)
    except OSError as e:
        print("errno", e.errno, "after", n, flush=True)
        sys.exit(3)
    print("read", n)
""")


def test_a_delegate_killed_mid_stream_gives_eio_not_a_hang(lab, tmp_path):
    root = tmp_path / "root"
    _files(root)
    (tmp_path / "slow.py").write_text(SLOW_READER)
    endpoint, proc = _start_delegate(lab.topo, 5611, "--offload-root", str(root), "--insecure")
    cmd = ["python3", str(tmp_path / "slow.py"), f"{lab.prefix}/big"]
    run = lab.topo.popen("compute", tb_argv(
        "run", "--delegate", endpoint, "--mode", "offload", "--offload-path", str(lab.prefix),
        "--quiet", "--timeout", "1", "-o", str(tmp_path / "run"), *RA, "--", *cmd),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    time.sleep(1.5)  # 64 KiB every 20 ms: a stream is running
    proc.kill()
    proc.wait(10)
    out, err = run.communicate(timeout=60)
    assert run.returncode != 0
    assert out.decode().startswith("errno 5 after "), (out, err)
    assert int(out.split()[-1]) < (root / "big").stat().st_size
    meta = _meta(tmp_path)
    assert meta["offload"]["delegate_lost"] is True
    assert b"offloaded calls now fail with EIO" in err


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (("--offload-read-ahead", "9"), "--offload-read-ahead must be a number of reads in 0..8"),
        (("--offload-read-ahead", "-1"), "--offload-read-ahead must be a number of reads in 0..8"),
        (("--offload-read-ahead", "2", "--offload-write-behind", "1M"),
         "--offload-read-ahead and --offload-write-behind cannot be combined"),
    ],
)  # fmt: skip
def test_bad_read_ahead_options_get_one_clear_line(tmp_path, args, why):
    r = run_testbed("run", "--delegate", "tcp://127.0.0.1:9", "--mode", "offload",
                    "--offload-path", "/nonexistent-prefix", *args, "--", "true",
                    text=True)  # fmt: skip
    assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_testbed("run", "--delegate", "tcp://127.0.0.1:9", "--forward", "read",
                    "--offload-read-ahead", "2", "--", "true", text=True)  # fmt: skip
    assert r.returncode == 2 and "only used with --mode offload" in r.stderr, r.stderr


LARGE = textwrap.dedent("""\
    import ctypes, hashlib, mmap, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    libc.read.restype = ctypes.c_ssize_t
    libc.pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
    libc.pread.restype = ctypes.c_ssize_t
    p = sys.argv[1]
    fd = os.open(p + "/big", os.O_RDONLY)
    size = os.fstat(fd).st_size
    def h(b):
        return hashlib.md5(b).hexdigest()[:12] + "/" + str(len(b))
    for n in (1 << 20, 300000, 262145, 5000, 1 << 20):           # in chunks above 256 KiB
        print("read", n, h(os.read(fd, n)))
    print("pos", os.lseek(fd, 0, os.SEEK_CUR))
    print("pread across eof", h(os.pread(fd, 700000, size - 500000)))
    os.lseek(fd, size - 400000, os.SEEK_SET)
    print("read across eof", h(os.read(fd, 1 << 20)), os.lseek(fd, 0, os.SEEK_CUR))
    print("read at eof", h(os.read(fd, 1 << 20)))
    # a hole in the caller's buffer: the kernel stops there, and so must the offset
    m = mmap.mmap(-1, 1 << 20)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(base + 600 * 1024, 4096, 0) == 0
    os.lseek(fd, 12345, os.SEEK_SET)
    got = libc.read(fd, base, 1 << 20)
    print("read into a hole", got, ctypes.get_errno() if got < 0 else "",
          h(m[:max(got, 0)]), os.lseek(fd, 0, os.SEEK_CUR))
    got = libc.pread(fd, base + 600 * 1024, 1 << 19, 0)
    print("pread onto the hole", got, ctypes.get_errno() if got < 0 else "",
          os.lseek(fd, 0, os.SEEK_CUR))
""")


def test_large_reads_travel_in_chunks_and_answer_as_one_call(lab, tmp_path):
    """Reads and preads above 256 KiB go as pipelined chunks (no option): the same bytes,
    counts, offsets and errors as the kernel's one call, across EOF and onto a hole."""
    (tmp_path / "large.py").write_text(LARGE)
    native, res = _both(lab, tmp_path, "large", f"python3 {tmp_path}/large.py {{P}}", extra=())
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout.decode().splitlines() == native.stdout.decode().splitlines()
    assert "read into a hole 614400" in native.stdout.decode()  # the kernel's answer
    off = _meta(tmp_path)["offload"]
    assert off["chunked_reads"] >= 6, off
    assert "read_ahead" not in off
