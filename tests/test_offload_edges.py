"""Offload mode at its edges (issue 19): names with a NUL inside, iovec calls
compared with the kernel, replies a delegate must not be trusted with, fd and
memory limits across clients.

Programs run natively and under ``testbed run --mode offload`` against a real
``testbed delegate --offload-root`` on loopback, and their outputs and files
are compared byte for byte; wire-level tests speak ``testbed.core.wire`` over a
pyzmq DEALER (a client) or ROUTER (a malicious delegate); the limit tests
drive the executor with real fds.
"""

from __future__ import annotations

import errno as E
import hashlib
import os
import resource
import select
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

from testbed.core import limits, procs, syscalls, wire
from testbed.core.offload_calls import (
    AT_FDCWD,
    AT_REMOVEDIR,
    AT_SYMLINK_FOLLOW,
    AT_SYMLINK_NOFOLLOW,
)
from testbed.delegate.offload.execute import Executor
from testbed.jobs.localdelegate import LocalDelegate, wait_ready
from tests.conftest import tb_argv

U64 = (1 << 64) - 1
CWD = AT_FDCWD & U64
NR = syscalls.NR_BY_NAME
A, B = b"client-a", b"client-b"


def _gcc(src: str, out: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(out), str(c)], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    return out


def offload_run(endpoint: str, prefix: Path, argv: list[str], out: Path, timeout: float = 180):
    cmd = tb_argv("run", "--delegate", endpoint, "--mode", "offload", "--offload-path",
                  str(prefix), "--quiet", "-o", str(out), "--", *argv)  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=timeout)


def tree_bytes(top: Path) -> dict[str, tuple]:
    """Relative path -> (type, mode, size, content hash) of a tree."""
    out = {}
    for p in sorted(top.rglob("*")):
        st = p.lstat()
        h = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        h = os.readlink(p) if stat.S_ISLNK(st.st_mode) else h
        out[str(p.relative_to(top))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                        st.st_size if stat.S_ISREG(st.st_mode) else 0, h)  # fmt: skip
    return out


# ---------------------------------------------------------------- 1. names with a NUL


class WireClient:
    """A client speaking testbed.core.wire itself (no relay): whatever bytes it likes."""

    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 1
        self.sock.send(wire.encode_hello({"role": "test"}))
        kind, _ = self._recv()
        assert kind == wire.WELCOME

    def _recv(self):
        assert self.sock.poll(30_000), "no answer from the delegate"
        return wire.decode(self.sock.recv())

    def call(self, name: str, *args: int, **bufs: bytes):
        """``(kind, payload)`` of one offload call; bufs keyed b0..b5."""
        full = tuple(a & U64 for a in args) + (0,) * (6 - len(args))
        bl = tuple((int(k[1:]), v) for k, v in bufs.items())
        self.next_id += 1
        self.sock.send(wire.encode_call(
            wire.Call(self.next_id, 1, NR[name], full, bl, "offload")))  # fmt: skip
        while True:
            kind, payload = self._recv()
            if getattr(payload, "call_id", None) == self.next_id:
                return kind, payload

    def close(self) -> None:
        self.sock.close(0)


BAD_NAMES = [b"..\0", b"..\0x", b"x\0/../..", b"\0", b"..\0/", b"sub/..\0", b"sub/../..\0",
             b"f\0/../../sibling_file", b"\x003\0/..", b"lnk\0/.."]  # fmt: skip
TIMES = struct.pack("<qqqq", 1234, 0, 1234, 0)  # atime, mtime: 1234 s
OPEN_HOW = struct.pack("<QQQ", os.O_RDONLY, 0, 0)


def _path_calls(bad: bytes, d: int):
    """Every path-taking offloaded call with ``bad`` in each path position (dirfd ``d``)."""
    W = os.O_WRONLY | os.O_CREAT
    one = [
        ("open", (0, os.O_RDONLY), {"b0": bad}),
        ("open", (0, W | os.O_TRUNC, 0o666), {"b0": bad}),
        ("creat", (0, 0o666), {"b0": bad}),
        ("openat", (d, 0, W, 0o666), {"b1": bad}),
        ("openat2", (d, 0, 0, 24), {"b1": bad, "b2": OPEN_HOW}),
        ("stat", (0, 0), {"b0": bad}),
        ("lstat", (0, 0), {"b0": bad}),
        ("newfstatat", (d, 0, 0, 0), {"b1": bad}),
        ("newfstatat", (d, 0, 0, AT_SYMLINK_NOFOLLOW), {"b1": bad}),
        ("statx", (d, 0, AT_SYMLINK_NOFOLLOW, 0xFFF, 0), {"b1": bad}),
        ("statfs", (0, 0), {"b0": bad}),
        ("access", (0, 0), {"b0": bad}),
        ("faccessat", (d, 0, 0), {"b1": bad}),
        ("faccessat2", (d, 0, 0, AT_SYMLINK_NOFOLLOW), {"b1": bad}),
        ("unlink", (0,), {"b0": bad}),
        ("unlinkat", (d, 0, 0), {"b1": bad}),
        ("unlinkat", (d, 0, AT_REMOVEDIR), {"b1": bad}),
        ("rmdir", (0,), {"b0": bad}),
        ("mkdir", (0, 0o777), {"b0": bad}),
        ("mkdirat", (d, 0, 0o777), {"b1": bad}),
        ("readlink", (0, 0, 100), {"b0": bad}),
        ("readlinkat", (d, 0, 0, 100), {"b1": bad}),
        ("truncate", (0, 0), {"b0": bad}),
        ("chmod", (0, 0o777), {"b0": bad}),
        ("fchmodat", (d, 0, 0o777), {"b1": bad}),
        ("chown", (0, 1234, 1234), {"b0": bad}),
        ("lchown", (0, 1234, 1234), {"b0": bad}),
        ("fchownat", (d, 0, 1234, 1234, 0), {"b1": bad}),
        ("fchownat", (d, 0, 1234, 1234, AT_SYMLINK_NOFOLLOW), {"b1": bad}),
        ("utimensat", (d, 0, 0, 0), {"b1": bad, "b2": TIMES}),
        ("utimensat", (d, 0, 0, AT_SYMLINK_NOFOLLOW), {"b1": bad, "b2": TIMES}),
        ("utimensat", (d, 0, 0, AT_SYMLINK_NOFOLLOW), {"b1": bad}),  # times NULL: now
        ("chdir", (0,), {"b0": bad}),
        ("symlink", (0, 0), {"b0": bad, "b1": b"newlink"}),  # the target
        ("symlink", (0, 0), {"b0": b"f", "b1": bad}),
        ("symlinkat", (0, d, 0), {"b0": b"f", "b2": bad}),
        ("symlinkat", (0, d, 0), {"b0": bad, "b2": b"newlink"}),
    ]
    for old, new in ((bad, b"newname"), (b"f", bad)):
        one += [
            ("rename", (0, 0), {"b0": old, "b1": new}),
            ("renameat", (d, 0, d, 0), {"b1": old, "b3": new}),
            ("renameat2", (d, 0, d, 0, 0), {"b1": old, "b3": new}),
            ("link", (0, 0), {"b0": old, "b1": new}),
            ("linkat", (d, 0, d, 0, 0), {"b1": old, "b3": new}),
            ("linkat", (d, 0, d, 0, AT_SYMLINK_FOLLOW), {"b1": old, "b3": new}),
        ]
    return one


def _meta(p: Path) -> tuple:
    st = p.lstat()
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_mtime_ns,
            st.st_ctime_ns)  # fmt: skip


def _around(top: Path) -> dict[str, tuple]:
    """Metadata (mtime and ctime included) of ``top`` and everything beneath it."""
    out = {".": _meta(top)}
    for p in sorted(top.rglob("*")):
        content = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        out[str(p.relative_to(top))] = (*_meta(p), hashlib.sha256(content).hexdigest())
    return out


def test_names_with_a_nul_never_reach_the_kernel(tmp_path, ctx):
    parent = tmp_path / "parent"
    root = parent / "root"
    (root / "sub").mkdir(parents=True)
    (root / "f").write_bytes(b"inside")
    os.symlink("f", root / "lnk")
    (parent / "sibling").mkdir()
    (parent / "sibling" / "secret").write_bytes(b"secret")
    (parent / "sibling_file").write_bytes(b"sibling")
    for p in [*sorted(parent.rglob("*"), reverse=True), parent]:
        os.utime(p, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    time.sleep(0.05)  # any later change gets a later ctime
    before = _around(parent)
    with LocalDelegate(offload_root=root) as dlg:
        client = WireClient(ctx, dlg.endpoint)
        try:
            kind, res = client.call("open", 0, os.O_RDONLY | os.O_DIRECTORY, b0=b"sub")
            assert kind == wire.RESULT and res.errno == 0
            sub = res.ret
            answers = []
            for bad in BAD_NAMES:
                for d in (CWD, sub):
                    for name, args, bufs in _path_calls(bad, d):
                        kind, res = client.call(name, *args, **bufs)
                        answers.append((name, bad, d == sub, kind,
                                        getattr(res, "ret", None), getattr(res, "errno", None)))  # fmt: skip
            # nothing beside, above or inside the root changed (mtimes, ctimes, entries)
            after = _around(parent)
            changed = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
            assert after == before, (changed, [a for a in answers if a[5] == 0])
            # every answer is an error the program can see (never an ERROR frame,
            # which would make a relay count the delegate as lost)
            wrong = [a for a in answers if a[3] != wire.RESULT or not a[5] or a[4] != -a[5]]
            assert wrong == [], wrong[:10]
            assert len(answers) == len(BAD_NAMES) * 2 * len(_path_calls(b"x", CWD))
            # the delegate still serves plain names
            kind, res = client.call("stat", 0, 0, b0=b"f")
            assert kind == wire.RESULT and res.errno == 0
        finally:
            client.close()


@pytest.mark.unit
def test_cname_is_the_one_way_names_reach_the_kernel(tmp_path):
    from testbed.delegate.offload import execute, sandbox

    assert sandbox.cname(b"a/b") == b"a/b\0"
    assert sandbox.cname(b"a/b").text == b"a/b"
    for bad in (b"..\0", b"\0", b"a\0b"):
        with pytest.raises(OSError) as exc:
            sandbox.cname(bad)
        assert exc.value.errno == E.EINVAL
    box = sandbox.Sandbox(str(tmp_path))
    try:
        with pytest.raises(TypeError):
            sandbox.openat2(box.rootfd, b".", os.O_PATH)  # plain bytes are refused
        with pytest.raises(TypeError):
            execute._sys(NR["mkdirat"], box.rootfd, b"x\0", 0o755)
        # an absolute name's parent stays absolute: refused like every absolute path
        with pytest.raises(OSError) as exc:
            box.parent(None, b"/x")
        assert exc.value.errno == E.EXDEV
    finally:
        box.close()


NAMES_C = r"""#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static void show(const char *label, long r) {
    printf("%-24s ret=%ld errno=%d\n", label, r, r < 0 ? errno : 0);
    fflush(stdout);
}
#define T(label, expr) do { errno = 0; show(label, (long)(expr)); } while (0)

static long mtime(const char *p, int follow) {
    struct stat st;
    if ((follow ? stat(p, &st) : lstat(p, &st)) < 0) return -errno;
    return (long)st.st_mtime;
}

int main(int argc, char **argv) {
    if (chdir(argv[1]) < 0) { perror("chdir"); return 1; }
    T("mkdir-d", mkdir("d", 0755));
    T("mkdir-d2-slash", mkdir("d2/", 0755));
    T("creat-f", close(open("f", O_WRONLY | O_CREAT, 0644)));
    T("symlink-lnk", symlink("f", "lnk"));
    T("symlink-dl", symlink("d", "dl"));
    T("unlink-f/", unlink("f/"));
    T("unlink-d/", unlink("d/"));
    T("unlink-nope/", unlink("nope/"));
    T("unlink-lnk/", unlink("lnk/"));
    T("unlink-dl/", unlink("dl/"));
    T("unlink-.", unlink("."));
    T("unlink-d/..", unlink("d/.."));
    T("unlink-empty", unlink(""));
    T("rmdir-f/", rmdir("f/"));
    T("rmdir-dl/", rmdir("dl/"));
    T("rmdir-.", rmdir("."));
    T("rmdir-..", rmdir(".."));
    T("rmdir-d/.", rmdir("d/."));
    T("rmdir-nope/..", rmdir("nope/.."));
    T("rmdir-d2/", rmdir("d2/"));
    T("mkdir-.", mkdir(".", 0755));
    T("mkdir-d/..", mkdir("d/..", 0755));
    T("mkdir-f/", mkdir("f/", 0755));
    T("mkdir-empty", mkdir("", 0755));
    T("rename-f/-g", rename("f/", "g"));
    T("rename-f-g/", rename("f", "g/"));
    T("rename-.-x", rename(".", "x"));
    T("rename-f-..", rename("f", ".."));
    T("renameat2-noreplace-..", syscall(SYS_renameat2, AT_FDCWD, "f", AT_FDCWD, "d/..", 1));
    T("rename-d/-d3/", rename("d/", "d3/"));
    T("rename-d3-d", rename("d3", "d"));
    T("rename-dl/-x", rename("dl/", "x"));
    T("rename-nope/-x", rename("nope/", "x"));
    T("renameat2-xchg-f-d/", syscall(SYS_renameat2, AT_FDCWD, "f", AT_FDCWD, "d/", 2));
    T("renameat2-xchg-d-f/", syscall(SYS_renameat2, AT_FDCWD, "d", AT_FDCWD, "f/", 2));
    T("link-f/-h", link("f/", "h"));
    T("link-f-h/", link("f", "h/"));
    T("link-f-d/", link("f", "d/"));
    T("link-f-.", link("f", "."));
    T("link-d/-h", link("d/", "h"));
    T("link-.-h", link(".", "h"));
    T("link-nope/-h", link("nope/", "h"));
    T("linkat-follow-dl/-h", linkat(AT_FDCWD, "dl/", AT_FDCWD, "h", AT_SYMLINK_FOLLOW));
    T("linkat-follow-f-h/", linkat(AT_FDCWD, "f", AT_FDCWD, "h/", AT_SYMLINK_FOLLOW));
    T("symlink-t-s/", symlink("t", "s/"));
    T("symlink-t-d/", symlink("t", "d/"));
    T("symlink-t-f/", symlink("t", "f/"));
    T("symlink-t-..", symlink("t", ".."));
    T("symlink-empty", symlink("", "s"));
    struct timespec ts[2] = {{1000000, 0}, {1000000, 0}};
    T("utimensat-nf-dl/", utimensat(AT_FDCWD, "dl/", ts, AT_SYMLINK_NOFOLLOW));
    printf("mtime d=%ld dl-set=%d\n", mtime("d", 1), mtime("dl", 0) == 1000000);
    ts[0].tv_sec = ts[1].tv_sec = 2000000;
    T("utimensat-nf-dl", utimensat(AT_FDCWD, "dl", ts, AT_SYMLINK_NOFOLLOW));
    printf("mtime d=%ld dl=%ld\n", mtime("d", 1), mtime("dl", 0));
    ts[0].tv_sec = ts[1].tv_sec = 3000000;
    T("utimensat-nf-d/.", utimensat(AT_FDCWD, "d/.", ts, AT_SYMLINK_NOFOLLOW));
    printf("mtime d=%ld\n", mtime("d", 1));
    T("utimensat-nf-lnk/", utimensat(AT_FDCWD, "lnk/", ts, AT_SYMLINK_NOFOLLOW));
    T("utimensat-badflags", utimensat(AT_FDCWD, "f", ts, 0x4000));
    T("lstat-dl/-isdir", ({ struct stat st; lstat("dl/", &st) < 0 ? -1 : S_ISDIR(st.st_mode); }));
    char b[64];
    T("readlink-lnk/", readlink("lnk/", b, sizeof b));
    T("readlink-dl/", readlink("dl/", b, sizeof b));
    T("readlink-bufsiz0", readlink("lnk", b, 0));
    T("readlink-lnk", readlink("lnk", b, sizeof b));
    T("access-f-8", access("f", 8));
    T("faccessat-badflag", syscall(SYS_faccessat2, AT_FDCWD, "f", 0, 0x4));
    T("unlinkat-badflag", unlinkat(AT_FDCWD, "f", 0x1));
    T("linkat-badflag", linkat(AT_FDCWD, "f", AT_FDCWD, "q", 0x8));
    static char longp[4300] = "d";
    while (strlen(longp) < 4200) strcat(longp, "/.");
    T("stat-4200-bytes", ({ struct stat st; stat(longp, &st); }));
    T("mkdir-4200-bytes", mkdir(longp, 0755));
    T("unlink-lnk", unlink("lnk"));
    T("rmdir-d", rmdir("d"));
    return 0;
}
"""


def test_dot_dotdot_and_trailing_slashes_match_the_kernel(tmp_path):
    """Entry calls act on one plain name; ".", ".." and "x/" get the kernel's answers
    (50c3902: unlink("f/") removed the file, symlink("t", "s/") made "s", ...)."""
    prog = _gcc(NAMES_C, tmp_path / "names")
    native_dir, root, prefix = tmp_path / "native", tmp_path / "root", tmp_path / "mnt"
    for d in (native_dir, root / "n", prefix):
        d.mkdir(parents=True)
    native = subprocess.run([str(prog), str(native_dir)], capture_output=True, timeout=60)
    assert native.returncode == 0, native.stderr.decode()
    with LocalDelegate(offload_root=root) as dlg:
        res = offload_run(dlg.endpoint, prefix, [str(prog), str(prefix / "n")], tmp_path / "run")
    lines = native.stdout.decode().splitlines()
    assert len(lines) > 60
    assert res.stdout.decode().splitlines() == lines
    assert res.returncode == 0, res.stderr.decode()
    assert tree_bytes(root / "n") == tree_bytes(native_dir)
    assert os.listdir(prefix) == []


# ---------------------------------------------------------------- 2. iovec calls

EDGE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static int fd;
static void show(const char *label, long r) {
    int e = r < 0 ? errno : 0;
    long pos = lseek(fd, 0, SEEK_CUR);
    printf("%-26s ret=%ld errno=%d pos=%ld\n", label, r, e, pos);
    fflush(stdout);
}
#define SYS(label, ...) do { errno = 0; long r_ = syscall(__VA_ARGS__); show(label, r_); } while (0)
#define IOV(b, n) ((struct iovec){(void *)(b), (size_t)(n)})
#define BIG (3 << 20)
static char big[BIG], back[BIG];
static struct iovec many[1100];
static char ones[1100];

static void split(struct iovec *w, char *base, size_t rem) {
    /* [1 MiB - 10, empty, 100, the rest]: entries cross the relay's 1 MiB */
    size_t a = rem < (1 << 20) - 10 ? rem : (1 << 20) - 10;
    size_t c = rem - a < 100 ? rem - a : 100;
    w[0] = IOV(base, a); w[1] = IOV(big, 0); w[2] = IOV(base + a, c);
    w[3] = IOV(base + a + c, rem - a - c);
}

int main(int argc, char **argv) {
    char path[4096];
    long pg = sysconf(_SC_PAGESIZE);
    char buf[64] = {0}, buf2[64] = {0};
    struct iovec v[4];
    snprintf(path, sizeof path, "%s/edge", argv[1]);
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror("open"); return 1; }
    memset(ones, 'x', sizeof ones);
    for (int i = 0; i < 1100; i++) many[i] = IOV(ones + i, 1);
    /* two writable pages, then a hole */
    char *reg = mmap(NULL, 3 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    munmap(reg + 2 * pg, pg);
    memset(reg, 'r', 2 * pg);

    v[0] = IOV("", 0); v[1] = IOV("hello", 5);
    SYS("writev-empty-first", SYS_writev, fd, v, 2);
    v[0] = IOV("ab", 2); v[1] = IOV("", 0); v[2] = IOV("cd", 2);
    SYS("writev-empty-middle", SYS_writev, fd, v, 3);
    SYS("writev-count0", SYS_writev, fd, v, 0);
    SYS("writev-null-count0", SYS_writev, fd, NULL, 0);
    SYS("writev-1024", SYS_writev, fd, many, 1024);
    SYS("writev-1025", SYS_writev, fd, many, 1025);
    SYS("writev-count-neg", SYS_writev, fd, many, -1L);
    SYS("writev-count-2^32+1", SYS_writev, fd, many, (1L << 32) + 1);
    v[0] = IOV(buf, 1UL << 63);
    SYS("writev-2^63", SYS_writev, fd, v, 1);
    v[0] = IOV("a", 1); v[1] = IOV(buf, 1UL << 63);
    SYS("writev-a,2^63", SYS_writev, fd, v, 2);
    v[0] = IOV(buf, 1UL << 62); v[1] = IOV(buf, 1UL << 62);
    SYS("writev-2^62x2", SYS_writev, fd, v, 2);
    v[0] = IOV(buf, (1UL << 63) - 1); v[1] = IOV(buf, 1);
    SYS("writev-ssize-overflow", SYS_writev, fd, v, 2);
    v[0] = IOV(reg, (1UL << 63) - 1);
    SYS("writev-huge-into-hole", SYS_writev, fd, v, 1);
    v[0] = IOV("zz", 2); v[1] = IOV(reg + 2 * pg, 4);
    SYS("writev-2nd-in-hole", SYS_writev, fd, v, 2);
    v[0] = IOV(NULL, 5);
    SYS("writev-null-base", SYS_writev, fd, v, 1);
    SYS("writev-null-iov", SYS_writev, fd, NULL, 1);
    SYS("pwritev-off-1", SYS_pwritev, fd, many, 2, -1L, 0);
    SYS("pwritev-off-2", SYS_pwritev, fd, many, 2, -2L, 0);
    SYS("pwritev2-off-1", SYS_pwritev2, fd, many, 2, -1L, 0, 0);
    SYS("pwritev2-off-2", SYS_pwritev2, fd, many, 2, -2L, 0, 0);
    SYS("pwritev-at-3", SYS_pwritev, fd, many, 3, 3L, 0);
    SYS("pwritev-maxoff", SYS_pwritev, fd, many, 3, 0x7fffffffffffffffL, 0);
    SYS("pwrite64-off-1", SYS_pwrite64, fd, "q", 1, -1L);
    SYS("write-null-0", SYS_write, fd, NULL, 0);
    SYS("write-null-5", SYS_write, fd, NULL, 5);
    SYS("write-2^63", SYS_write, fd, buf, 1UL << 63);
    SYS("write-into-hole", SYS_write, fd, reg + 2 * pg - 3, 100);

    SYS("lseek0", SYS_lseek, fd, 0L, SEEK_SET);
    v[0] = IOV(buf, 0); v[1] = IOV(buf, 16);
    SYS("readv-0,16", SYS_readv, fd, v, 2);
    printf("data %.16s\n", buf);
    v[0] = IOV(buf, 0); v[1] = IOV(buf, 0);
    SYS("readv-0,0", SYS_readv, fd, v, 2);
    SYS("readv-count0", SYS_readv, fd, v, 0);
    SYS("readv-null-iov", SYS_readv, fd, NULL, 1);
    SYS("readv-1025", SYS_readv, fd, many, 1025);
    SYS("readv-count-2^32+2", SYS_readv, fd, many, (1L << 32) + 2);
    v[0] = IOV(buf, 1UL << 63);
    SYS("readv-2^63", SYS_readv, fd, v, 1);
    v[0] = IOV(buf, 4); v[1] = IOV(buf, 1UL << 62);
    SYS("readv-4,2^62", SYS_readv, fd, v, 2);
    v[0] = IOV(buf, 3); v[1] = IOV(reg + 2 * pg, 4);
    SYS("readv-2nd-in-hole", SYS_readv, fd, v, 2);
    v[0] = IOV(reg + 2 * pg - 2, 6);
    SYS("readv-straddle-hole", SYS_readv, fd, v, 1);
    v[0] = IOV(NULL, 4);
    SYS("readv-null-base", SYS_readv, fd, v, 1);
    v[0] = IOV(buf, 4); v[1] = IOV(buf2, 4);
    SYS("preadv-off-1", SYS_preadv, fd, v, 2, -1L, 0);
    SYS("preadv-off-2", SYS_preadv, fd, v, 2, -2L, 0);
    SYS("preadv-off-5", SYS_preadv, fd, v, 2, 5L, 0);
    SYS("preadv2-off-1", SYS_preadv2, fd, v, 2, -1L, 0, 0);
    printf("data %.4s %.4s\n", buf, buf2);
    SYS("preadv2-off-2", SYS_preadv2, fd, v, 2, -2L, 0, 0);
    SYS("preadv2-badflags", SYS_preadv2, fd, v, 2, 0L, 0, 0x40000000);
    SYS("preadv2-badflags-len0", SYS_preadv2, fd, v, 0, 0L, 0, 0x40000000);
    SYS("preadv2-off-1-hole", SYS_preadv2, fd, (struct iovec[]){IOV(reg + 2 * pg - 1, 9)}, 1,
        -1L, 0, 0);
    SYS("preadv-maxoff", SYS_preadv, fd, v, 2, 0x7ffffffffffffff0L, 0);
    SYS("preadv-overflow", SYS_preadv, fd, v, 2, 0x7ffffffffffffffcL, 0);
    SYS("pread64-off-1", SYS_pread64, fd, buf, 4, -1L);
    SYS("read-null-5", SYS_read, fd, NULL, 5);
    SYS("read-null-0", SYS_read, fd, NULL, 0);
    SYS("read-2^63", SYS_read, fd, buf, 1UL << 63);
    SYS("lseek0", SYS_lseek, fd, 0L, SEEK_SET);
    SYS("read-into-hole", SYS_read, fd, reg + 2 * pg - 3, 100);
    SYS("read-into-hole-at-once", SYS_read, fd, reg + 2 * pg, 100);

    int keep = fd;
    fd = open(path, O_RDONLY);
    SYS("rdonly-writev-1025", SYS_writev, fd, many, 1025);
    SYS("rdonly-writev-0", SYS_writev, fd, many, 0);
    SYS("rdonly-pwritev-off-1", SYS_pwritev, fd, many, 1, -1L, 0);
    close(fd);
    fd = open(argv[1], O_RDONLY | O_DIRECTORY);
    v[0] = IOV(buf, 0); v[1] = IOV(buf, 16);
    SYS("dir-readv-0,16", SYS_readv, fd, v, 2);
    v[1] = IOV(buf, 0);
    SYS("dir-readv-0,0", SYS_readv, fd, v, 2);
    SYS("dir-read-0", SYS_read, fd, buf, 0);
    SYS("dir-readv-1025", SYS_readv, fd, many, 1025);
    close(fd);
    fd = keep;

    /* large transfers: a program loops until everything moved; never stuck at 0 */
    for (size_t i = 0; i < BIG; i++) big[i] = (char)(i * 7 + i / 4096);
    snprintf(path, sizeof path, "%s/big", argv[1]);
    int bf = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    size_t done = 0;
    for (int round = 0; done < BIG && round < 1000; round++) {
        split(v, big + done, BIG - done);
        long r = syscall(SYS_writev, bf, v, 4);
        if (r <= 0) { printf("writev-loop stuck ret=%ld errno=%d\n", r, errno); break; }
        done += r;
    }
    printf("writev-loop done=%zu\n", done);
    lseek(bf, 0, SEEK_SET);
    done = 0;
    for (int round = 0; done < BIG && round < 1000; round++) {
        split(v, back + done, BIG - done);
        long r = syscall(SYS_readv, bf, v, 4);
        if (r <= 0) { printf("readv-loop stuck ret=%ld errno=%d\n", r, errno); break; }
        done += r;
    }
    printf("readv-loop done=%zu same=%d\n", done, memcmp(big, back, BIG) == 0);
    memset(back, 0, BIG);
    done = 0;
    for (int round = 0; done < BIG && round < 1000; round++) {
        split(v, back + done, BIG - done);
        long r = syscall(SYS_preadv, bf, v, 4, (long)done, 0);
        if (r <= 0) { printf("preadv-loop stuck ret=%ld errno=%d\n", r, errno); break; }
        done += r;
    }
    printf("preadv-loop done=%zu same=%d pos=%ld\n", done, memcmp(big, back, BIG) == 0,
           (long)lseek(bf, 0, SEEK_CUR));
    struct stat st;
    fstat(fd, &st);
    printf("size %ld\n", (long)st.st_size);
    return 0;
}
"""


@pytest.fixture(scope="module")
def edge_prog(tmp_path_factory) -> Path:
    return _gcc(EDGE_C, tmp_path_factory.mktemp("edge") / "edge")


def test_iovec_and_data_calls_match_the_kernel(tmp_path, edge_prog):
    native_dir, root, prefix = tmp_path / "native", tmp_path / "root", tmp_path / "mnt"
    for d in (native_dir, root / "e", prefix):
        d.mkdir(parents=True)
    native = subprocess.run([str(edge_prog), str(native_dir)], capture_output=True, timeout=120)
    assert native.returncode == 0, native.stderr.decode()
    with LocalDelegate(offload_root=root) as dlg:
        res = offload_run(dlg.endpoint, prefix, [str(edge_prog), str(prefix / "e")],
                          tmp_path / "run")  # fmt: skip
    lines = native.stdout.decode().splitlines()
    assert len(lines) > 60 and "stuck" not in native.stdout.decode()
    assert res.stdout.decode().splitlines() == lines
    assert res.returncode == 0, res.stderr.decode()
    assert tree_bytes(root / "e") == tree_bytes(native_dir)
    assert os.listdir(prefix) == []


# ---------------------------------------------------------------- 3. replies checked

MAL_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static unsigned char buf[256];
static int untouched(size_t from) {
    for (size_t i = from; i < sizeof buf; i++) if (buf[i] != 0xAA) return 0;
    return 1;
}
static void show(const char *label, long r, size_t used) {
    printf("%s ret=%ld errno=%d untouched=%d\n", label, r, r < 0 ? errno : 0, untouched(used));
    fflush(stdout);
}
#define DO(label, used, expr) do { memset(buf, 0xAA, sizeof buf); errno = 0; \
    long r_ = (expr); show(label, r_, used); } while (0)

int main(int argc, char **argv) {
    char p[4096], cwd[4096];
    snprintf(p, sizeof p, "%s/file", argv[1]);
    int fd = open(p, O_RDWR | O_CREAT, 0644);
    printf("open ok=%d\n", fd >= 0);
    DO("read-more-than-asked", 0, read(fd, buf, 10));
    DO("read-data-not-ret", 0, read(fd, buf, 11));
    DO("read-data-elsewhere", 0, read(fd, buf, 12));
    DO("read-good", 4, read(fd, buf, 13));
    printf("data %.4s\n", buf);
    DO("read-enoent", 0, read(fd, buf, 14));
    DO("read-errno-ret0", 0, read(fd, buf, 15));
    DO("read-ret-not-errno", 0, read(fd, buf, 16));
    DO("read-data-twice", 0, read(fd, buf, 17));
    DO("read-ret-no-data", 0, read(fd, buf, 18));
    DO("read-errno-4095", 0, read(fd, buf, 19));
    DO("readv-more-than-asked", 0, (readv(fd, (struct iovec[]){{buf, 4}, {buf + 8, 4}}, 2)));
    DO("pread-huge-ret", 0, pread(fd, buf, 20, 0));
    DO("lseek-minus1-no-errno", 0, lseek(fd, 5, SEEK_SET));
    DO("lseek-good", 0, lseek(fd, 6, SEEK_SET));
    DO("write-more-than-given", 0, write(fd, "abcd", 4));
    DO("write-good", 0, write(fd, "abc", 3));
    DO("fsync-ret1", 0, fsync(fd));
    struct stat st;
    memset(&st, 0x55, sizeof st);
    errno = 0;
    long r = fstat(fd, &st);
    printf("fstat-short ret=%ld errno=%d untouched=%d\n", r, r < 0 ? errno : 0,
           ((unsigned char *)&st)[0] == 0x55);
    r = fstat(fd, &st);
    printf("fstat-good ret=%ld size=%ld\n", r, (long)st.st_size);
    snprintf(p, sizeof p, "%s/other", argv[1]);
    errno = 0;
    r = open(p, O_RDONLY);
    printf("open-huge-handle ret=%ld errno=%d\n", r < 0 ? -1L : 0L, r < 0 ? errno : 0);
    snprintf(p, sizeof p, "%s/third", argv[1]);
    errno = 0;
    r = open(p, O_RDONLY);
    printf("open-minus1-no-errno ret=%ld errno=%d\n", r < 0 ? -1L : 0L, r < 0 ? errno : 0);
    snprintf(p, sizeof p, "%s/d", argv[1]);
    int dfd = open(p, O_RDONLY | O_DIRECTORY);
    DO("getdents-more-than-asked", 0, syscall(SYS_getdents64, dfd, buf, 64));
    if (!getcwd(cwd, sizeof cwd)) return 1;
    DO("fchdir-climbing-path", 0, fchdir(dfd));
    char now[4096];
    if (!getcwd(now, sizeof now)) return 1;
    printf("cwd-unchanged=%d\n", strcmp(cwd, now) == 0);
    close(fd);
    close(dfd);
    return 0;
}
"""

STAT_GOOD = struct.pack("<QQQIIIxxxxQqqq", 1, 2, 1, 0o100644, 0, 0, 0, 1234, 4096, 8) + bytes(72)


class FakeDelegate:
    """A delegate that lies: a pyzmq ROUTER answering each call with a scripted reply."""

    def __init__(self, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.stop = threading.Event()
        self.seen: list[tuple[str, tuple]] = []
        self.fstats = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def answer(self, call: wire.Call) -> tuple[int, int, tuple]:
        name, a, bufs = syscalls.NAME_BY_NR.get(call.nr, "?"), call.args, dict(call.bufs)
        self.seen.append((name, a))
        if name in ("open", "openat"):
            path = bufs.get(0 if name == "open" else 1)
            return {b"file": (7, 0, ()), b"other": (1 << 40, 0, ()), b"third": (-1, 0, ()),
                    b"d": (8, 0, ())}.get(path, (-2, 2, ()))  # fmt: skip
        if name in ("read", "readv", "pread64"):
            return {
                10: (5000, 0, ((1, b"Z" * 5000),)),
                11: (5, 0, ((1, b"Z" * 8),)),
                12: (3, 0, ((2, b"ZZZ"),)),
                13: (4, 0, ((1, b"good"),)),
                14: (-2, 2, ()),
                15: (0, 2, ()),
                16: (-3, 2, ()),
                17: (2, 0, ((1, b"ab"), (1, b"cd"))),
                18: (3, 0, ()),
                19: (-4095, 4095, ()),
                8: (9, 0, ((1, b"Z" * 9),)),  # readv of 4 + 4
                20: (1 << 40, 0, ((1, b"Z" * 20),)),
            }[a[2]]
        if name == "lseek":
            return (-1, 0, ()) if a[1] == 5 else (a[1], 0, ())
        if name == "write":
            return (100, 0, ()) if len(bufs.get(1, b"")) == 4 else (3, 0, ())
        if name == "fsync":
            return 1, 0, ()
        if name in ("fstat", "newfstatat"):  # glibc's fstat is newfstatat(fd, "", AT_EMPTY_PATH)
            self.fstats += 1
            return (
                0,
                0,
                ((1 if name == "fstat" else 2, bytes(10) if self.fstats == 1 else STAT_GOOD),),
            )
        if name == "getdents64":
            return 100, 0, ((1, b"Z" * 100),)
        if name == "fchdir":
            return 0, 0, ((0, b"../../etc"),)
        return 0, 0, ()  # close

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, frame = self.sock.recv_multipart()
            kind, msg = wire.decode(frame)
            if kind == wire.HELLO:
                reply = wire.encode_welcome({"mode": "cost+offload", "wire_version": 2})
            elif kind == wire.STATS:
                reply = wire.encode_error(wire.E_UNSUPPORTED, "no stats here")
            elif kind == wire.BYE:
                reply = wire.encode_bye({})
            else:
                ret, err, outs = self.answer(msg)
                reply = wire.encode_result(wire.Result(msg.call_id, ret, err, 1, 2, 3, 4, outs))
            self.sock.send_multipart([ident, reply])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sock.close(0)


def test_replies_are_checked_before_they_touch_the_program(tmp_path, ctx):
    prog = _gcc(MAL_C, tmp_path / "mal")
    prefix = tmp_path / "mnt"
    prefix.mkdir()
    fake = FakeDelegate(ctx)
    try:
        res = offload_run(fake.endpoint, prefix, [str(prog), str(prefix)], tmp_path / "run",
                          timeout=120)  # fmt: skip
    finally:
        fake.close()
    assert res.returncode == 0, res.stderr.decode()
    got = res.stdout.decode().splitlines()
    eio = "ret=-1 errno=5 untouched=1"
    assert got == [
        "open ok=1",
        f"read-more-than-asked {eio}",
        f"read-data-not-ret {eio}",
        f"read-data-elsewhere {eio}",
        "read-good ret=4 errno=0 untouched=1",
        "data good",
        "read-enoent ret=-1 errno=2 untouched=1",
        f"read-errno-ret0 {eio}",
        f"read-ret-not-errno {eio}",
        f"read-data-twice {eio}",
        f"read-ret-no-data {eio}",
        "read-errno-4095 ret=-1 errno=4095 untouched=1",
        f"readv-more-than-asked {eio}",
        f"pread-huge-ret {eio}",
        f"lseek-minus1-no-errno {eio}",
        "lseek-good ret=6 errno=0 untouched=1",
        f"write-more-than-given {eio}",
        "write-good ret=3 errno=0 untouched=1",
        f"fsync-ret1 {eio}",
        "fstat-short ret=-1 errno=5 untouched=1",
        "fstat-good ret=0 size=1234",
        "open-huge-handle ret=-1 errno=5",
        "open-minus1-no-errno ret=-1 errno=5",
        f"getdents-more-than-asked {eio}",
        f"fchdir-climbing-path {eio}",
        "cwd-unchanged=1",
    ]
    warnings = [ln for ln in res.stderr.decode().splitlines() if "invalid reply" in ln]
    assert len(warnings) == 1, res.stderr.decode()  # throttled: one line, not one per call
    assert "Traceback" not in res.stderr.decode()


# ---------------------------------------------------------------- 4/5. limits across clients


def _root_with_file(tmp_path: Path) -> Path:
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_bytes(b"x" * 100)
    return root


def _call(ex: Executor, client: bytes, name: str, *args: int, **bufs: bytes):
    full = tuple(a & U64 for a in args) + (0,) * (6 - len(args))
    bl = tuple((int(k[1:]), v) for k, v in bufs.items())
    return ex.execute(client, wire.Call(1, 1, NR[name], full, bl, "offload"))


def _open(ex: Executor, client: bytes, path: bytes = b"f") -> tuple[int, int]:
    ret, err, _ = _call(ex, client, "open", 0, os.O_RDONLY, b0=path)
    return ret, err


@pytest.mark.unit
def test_fd_caps_per_client_and_in_all(tmp_path):
    root = _root_with_file(tmp_path)
    # 300 in all: each client may hold min(1024, max(64, 300 // 4)) = 75
    ex = Executor(str(root), max_total_fds=300)
    try:
        assert ex.tables.max_total_fds == 300 and ex.tables.max_fds == 75
        clients = [b"c%d" % i for i in range(5)]
        for c in clients[:4]:
            assert [_open(ex, c)[1] for _ in range(75)] == [0] * 75
            assert _open(ex, c) == (-E.EMFILE, E.EMFILE)  # its own cap
        assert ex.tables.open_fds() == 300
        assert _open(ex, clients[4]) == (-E.EMFILE, E.EMFILE)  # everything is taken
        assert ex.tables.open_fds() == 300  # the refused fds were closed
        ex.forget(clients[0])
        assert ex.tables.open_fds() == 225
        assert _open(ex, clients[4])[1] == 0  # room again
    finally:
        ex.close()
    # a small total: the total binds before a client's share of 64
    ex = Executor(str(root), max_total_fds=10)
    try:
        assert [_open(ex, A)[1] for _ in range(10)] == [0] * 10
        assert _open(ex, A)[1] == E.EMFILE and _open(ex, B)[1] == E.EMFILE
    finally:
        ex.close()
    # --offload-max-fds still lowers a client's share
    ex = Executor(str(root), max_fds=2, max_total_fds=1000)
    try:
        assert ex.tables.max_fds == 2
    finally:
        ex.close()


@pytest.mark.unit
def test_the_total_defaults_to_half_of_what_the_fd_limit_leaves(tmp_path):
    root = _root_with_file(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        ex = Executor(str(root))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        total = (1024 - limits.RESERVED_FDS) // 2
        assert ex.tables.max_total_fds == total and ex.tables.max_fds == max(64, total // 4)
    finally:
        ex.close()


def _fd_target(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _wake(fifo: Path, reader: threading.Thread) -> None:
    """End a read waiting on ``fifo`` (a delegate fd holds it open for reading)."""
    if reader.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"wake")
        finally:
            os.close(fd)
        reader.join(30)


@pytest.mark.unit
def test_forget_during_a_running_call_closes_its_fds_when_the_call_ends(tmp_path):
    root = _root_with_file(tmp_path)
    fifo = root / "fifo"
    os.mkfifo(fifo)
    ex = Executor(str(root))
    results: list = []
    reader = threading.Thread(target=lambda: results.append(_call(ex, A, "read", fh, 0, 16)),
                              daemon=True)  # fmt: skip
    try:
        h, err = _open(ex, A, b"f")
        assert err == 0
        fh, err, _ = _call(ex, A, "open", 0, os.O_RDWR, b0=b"fifo")  # RDWR: no wait for a writer
        assert err == 0
        table = ex.tables._tables[A]
        real_f, real_fifo = table.fds[h], table.fds[fh]
        reader.start()
        deadline = time.monotonic() + 30
        while not table.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        assert table.busy == 1  # the read waits in the kernel on the FIFO
        ex.forget(A)  # from another thread, while that call runs
        # nothing was closed under the running call: both fds still name their files
        # (a closed number could be reused by another client's open meanwhile)
        assert _fd_target(real_fifo) == str(fifo)
        assert _fd_target(real_f) == str(root / "f")
        # a later call of the forgotten client starts a fresh table: old handles are EBADF
        assert _call(ex, A, "read", h, 0, 4)[1] == E.EBADF
        h2, err = _open(ex, A, b"f")
        assert err == 0 and h2 not in (h, fh)
        _wake(fifo, reader)  # let the running read end
        assert results == [(4, 0, ((1, b"wake"),))]
        # the call ended: the forgotten table's fds are closed now
        assert _fd_target(real_fifo) is None and _fd_target(real_f) is None
        assert ex.tables.open_fds() == 1  # only the fresh table's file
    finally:
        if reader.is_alive():
            _wake(fifo, reader)
        ex.close()


@pytest.mark.unit
def test_bytes_in_flight_are_bounded_across_clients(tmp_path):
    root = _root_with_file(tmp_path)
    fifo = root / "fifo"
    os.mkfifo(fifo)
    ex = Executor(str(root), max_total_fds=100, max_total_inflight=(1 << 20) + (1 << 19))
    results: list = []
    reader = threading.Thread(target=lambda: results.append(_call(ex, A, "read", fh, 0, 1 << 20)),
                              daemon=True)  # fmt: skip
    try:
        fh, err, _ = _call(ex, A, "open", 0, os.O_RDWR, b0=b"fifo")
        assert err == 0
        hb, err = _open(ex, B)
        assert err == 0
        reader.start()
        deadline = time.monotonic() + 30
        while not ex.tables.inflight and time.monotonic() < deadline:
            time.sleep(0.01)
        # A holds 1 MiB in a running call: B's 1 MiB read exceeds what all may hold
        assert _call(ex, B, "read", hb, 0, 1 << 20)[:2] == (-E.ENOBUFS, E.ENOBUFS)
        assert _call(ex, B, "read", hb, 0, 100)[:2] == (100, 0)  # a small one still fits
        _wake(fifo, reader)
        assert results and results[0][:2] == (4, 0)
        assert ex.tables.inflight == 0
        assert _call(ex, B, "pread64", hb, 0, 1 << 20, 0)[:2] == (100, 0)  # room again
    finally:
        if reader.is_alive():
            _wake(fifo, reader)
        ex.close()


HOLDER = r"""
import errno, os, sys, time
top, n, flag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.makedirs(top, exist_ok=True)
fds, err = [], 0
for i in range(n):
    try:
        fds.append(os.open(f"{top}/f{i}", os.O_WRONLY | os.O_CREAT, 0o644))
    except OSError as e:
        err = e.errno
        break
print(len(fds), errno.errorcode.get(err, err), flush=True)
for _ in range(600):  # hold them until the test says so (at most 60 s)
    if os.path.exists(flag):
        break
    time.sleep(0.1)
"""


def _first_line(proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    """The first line ``proc`` prints, split (waited for at most ``timeout`` s)."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the program printed nothing"
    return proc.stdout.readline().decode().split()


def test_one_client_cannot_take_every_fd_of_a_limited_delegate(tmp_path):
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit is not installed")
    root, prefix = tmp_path / "root", tmp_path / "mnt"
    root.mkdir()
    prefix.mkdir()
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    flag = tmp_path / "release"
    endpoint = f"tcp://127.0.0.1:{procs.free_port()}"
    delegate = subprocess.Popen(
        ["prlimit", "--nofile=1024:1024", sys.executable, "-m", "testbed", "delegate",
         "--quiet", "--listen", endpoint, "--offload-root", str(root)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=procs.testbed_env(),
    )  # fmt: skip
    try:
        wait_ready(delegate, endpoint)
        total = (1024 - limits.RESERVED_FDS) // 2
        share = max(64, total // 4)

        def holder(name: str, n: int) -> subprocess.Popen:
            argv = tb_argv("run", "--delegate", endpoint, "--mode", "offload", "--offload-path",
                           str(prefix), "--quiet", "-o", str(tmp_path / f"run-{name}"), "--",
                           sys.executable, str(script), str(prefix / name), str(n), str(flag))  # fmt: skip
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        first = holder("first", 1100)
        line1 = _first_line(first)
        second = holder("second", 50)  # while the first holds all it could get
        line2 = _first_line(second)
        flag.write_text("go")
        out1, err1 = first.communicate(timeout=120)
        out2, err2 = second.communicate(timeout=120)
        assert first.returncode == 0 and second.returncode == 0, (err1, err2)
        assert line1 == [str(share), "EMFILE"], err1.decode()
        assert line2 == ["50", "0"], err2.decode()
        assert len(os.listdir(root / "first")) == share
        assert delegate.poll() is None  # still serving
    finally:
        flag.write_text("go")
        delegate.terminate()
        delegate.wait(10)
