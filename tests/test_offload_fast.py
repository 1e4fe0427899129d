"""The offload data path (docs/offload.md, "The data fast path") against the Python path.

The relay's C path (testbed/compute/data/fastpath.c, offload part) and the
delegate's data path (testbed/delegate/router.py + execute.serve_data) must
behave exactly as the Python path: the same programs give the same output and
the same files natively, with both fast paths on (the default) and with both
off (``TESTBED_FASTPATH=0`` for the relay and the delegate); a lying delegate
gets the same EIO answers and never a write beyond what was asked; the
delegate's answers to the same frames are the same values and the same
accounting.  Real delegates, real sockets, real programs.
"""

from __future__ import annotations

import ctypes
import errno as E
import json
import os
import random
import struct
import subprocess
from pathlib import Path

import msgpack
import pytest

from testbed.compute import fastpath
from testbed.core import syscalls, wire, zmtp
from testbed.core.offload_calls import AT_EMPTY_PATH, AT_FDCWD
from testbed.core.procs import testbed_env as _tb_env
from testbed.jobs.localdelegate import LocalDelegate
from tests.conftest import tb_argv
from tests.test_offload_edges import EDGE_C, MAL_C, FakeDelegate, _gcc, tree_bytes

NR = syscalls.NR_BY_NAME
U64 = (1 << 64) - 1
MIB = 1 << 20
ON = {k: v for k, v in os.environ.items() if k != fastpath.ENV}
OFF = {**ON, fastpath.ENV: "0"}


@pytest.fixture(scope="module")
def lib():
    loaded = fastpath.load()
    if isinstance(loaded, str):
        pytest.skip(f"the C path is unavailable here: {loaded}")
    lib = loaded[0]
    lib.tb_new.restype = ctypes.c_void_p
    lib.tb_map_get.restype = ctypes.c_int64
    lib.tb_map_get.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    lib.tb_parse_oresult.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64,
                                     ctypes.c_void_p]  # fmt: skip
    return lib


def _delegate(root: Path, env: dict[str, str]) -> LocalDelegate:
    """A delegate whose data path is on or off as ``env`` says (it reads its environment)."""
    d = LocalDelegate(offload_root=root)
    keys = (fastpath.ENV, zmtp.ENV)
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update({k: v for k, v in env.items() if k in keys})
    try:
        d.__enter__()
    finally:
        for k in keys:
            os.environ.pop(k, None)
            if old[k] is not None:
                os.environ[k] = old[k]
    return d


def _run(endpoint: str, prefix: Path, argv: list[str], out: Path, env: dict[str, str]):
    cmd = tb_argv("run", "--delegate", endpoint, "--mode", "offload", "--offload-path",
                  str(prefix), "--quiet", "-o", str(out), "--", *argv)  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=300, env=_tb_env(env))


def _hot(run: Path) -> tuple[int, int]:
    meta = json.loads((run / "run.json").read_text())
    return meta["hot_path"]["c_calls"], meta["offload"]["remote_calls"]


# A program exercising the data calls the fast paths serve, with their edges: sizes
# around the 1 MiB cap and the big-frame threshold, EOF, holes and PROT_NONE pages,
# zero-length and bad iovecs, offsets, lseek, fstat/newfstatat, local fds in between.
DATA_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

static unsigned long sum(const unsigned char *p, size_t n) {
    unsigned long s = 0;
    for (size_t i = 0; i < n; i++) s = s * 31 + p[i];
    return s;
}
#define SHOW(label, expr) do { errno = 0; long r_ = (long)(expr); \
    printf("%s ret=%ld errno=%d\n", label, r_, r_ < 0 ? errno : 0); fflush(stdout); } while (0)

int main(int argc, char **argv) {
    char p[4096];
    size_t big = (3u << 20) / 2, pg = 4096;
    unsigned char *buf = malloc(big), *back = malloc(big);
    for (size_t i = 0; i < big; i++) buf[i] = (unsigned char)(i * 13 + 7);
    snprintf(p, sizeof p, "%s/data", argv[1]);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0644);
    printf("open ok=%d\n", fd >= 0);
    size_t sizes[] = {0, 1, 4095, 4096, 65535, 65536, 65537, 300000, 1 << 20};
    for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        char l[64];
        snprintf(l, sizeof l, "write %zu", sizes[i]);
        SHOW(l, write(fd, buf, sizes[i]));
    }
    SHOW("lseek set 0", lseek(fd, 0, SEEK_SET));
    for (unsigned i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        memset(back, 0, big);
        errno = 0;
        long r = read(fd, back, sizes[i]);
        printf("read %zu ret=%ld errno=%d sum=%lu\n", sizes[i], r, r < 0 ? errno : 0,
               sum(back, big));
    }
    SHOW("read at eof", read(fd, back, 100));
    SHOW("lseek end", lseek(fd, 0, SEEK_END));
    SHOW("lseek bad whence", lseek(fd, 0, 77));
    SHOW("lseek negative", lseek(fd, -5, SEEK_SET));
    SHOW("pwrite 10 at 3", pwrite(fd, "0123456789", 10, 3));
    memset(back, 0, 64);
    SHOW("pread 20 at 0", pread(fd, back, 20, 0));
    printf("pread data sum=%lu\n", sum(back, 64));
    SHOW("pread at -1", pread(fd, back, 20, -1));
    SHOW("pwrite at -1", pwrite(fd, back, 20, -1));
    SHOW("pread past the end", pread(fd, back, 20, 1 << 30));
    /* holes: a PROT_NONE page in the middle of the caller's buffer */
    unsigned char *m = mmap(NULL, 3 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(m, 0x41, 3 * pg);
    mprotect(m + pg, pg, PROT_NONE);
    SHOW("lseek 0", lseek(fd, 0, SEEK_SET));
    SHOW("write over a hole", write(fd, m, 3 * pg));
    SHOW("read into a hole", read(fd, m, 3 * pg));
    SHOW("offset after the short read", lseek(fd, 0, SEEK_CUR));
    SHOW("read into PROT_NONE", read(fd, m + pg, 10));
    SHOW("write from PROT_NONE", write(fd, m + pg, 10));
    SHOW("read NULL", syscall(SYS_read, fd, NULL, 10));
    SHOW("write bad address", syscall(SYS_write, fd, (void *)8, 10));
    /* vectors */
    struct iovec iv[4] = {{buf, 3}, {buf + 10, 0}, {buf + 20, 5000}, {buf + 9000, 70000}};
    SHOW("writev", writev(fd, iv, 4));
    SHOW("lseek 0 again", lseek(fd, 0, SEEK_SET));
    struct iovec rv[4] = {{back, 3}, {back + 10, 0}, {back + 20, 5000}, {back + 9000, 70000}};
    memset(back, 0, big);
    SHOW("readv", readv(fd, rv, 4));
    printf("readv sum=%lu\n", sum(back, 80000));
    SHOW("pwritev at 100", pwritev(fd, iv, 4, 100));
    memset(back, 0, big);
    SHOW("preadv at 100", preadv(fd, rv, 4, 100));
    printf("preadv sum=%lu\n", sum(back, 80000));
    SHOW("writev zero entries", writev(fd, iv, 0));
    SHOW("writev 1025 entries", syscall(SYS_writev, fd, iv, 1025));
    struct iovec neg[2] = {{buf, 3}, {buf, (size_t)-1}};
    SHOW("writev negative length", writev(fd, neg, 2));
    SHOW("readv bad array", syscall(SYS_readv, fd, (void *)8, 2));
    struct iovec only0[2] = {{buf, 0}, {buf, 0}};
    SHOW("readv only zero-length", readv(fd, only0, 2));
    SHOW("preadv at -1", preadv(fd, rv, 4, -1));
    /* metadata */
    struct stat st;
    memset(&st, 0, sizeof st);
    SHOW("fstat", fstat(fd, &st));
    printf("size=%ld mode=%o nlink=%ld\n", (long)st.st_size, st.st_mode, (long)st.st_nlink);
    memset(&st, 0, sizeof st);
    SHOW("newfstatat empty", syscall(SYS_newfstatat, fd, "", &st, AT_EMPTY_PATH));
    printf("size=%ld\n", (long)st.st_size);
    SHOW("fstat bad", syscall(SYS_fstat, fd, (void *)8));
    /* local fds between offloaded calls: run by the kernel */
    int pfd[2];
    if (pipe(pfd)) return 1;
    SHOW("local write", write(pfd[1], "xyz", 3));
    SHOW("local read", read(pfd[0], back, 3));
    SHOW("bad fd read", read(999, back, 3));
    /* a read-only fd: the delegate's checks come first */
    int ro = open(p, O_RDONLY);
    SHOW("write to read-only", write(ro, buf, 10));
    SHOW("write to read-only, bad buffer", syscall(SYS_write, ro, (void *)8, 10));
    /* dup shares the remote description and its offset */
    int d = dup(fd);
    SHOW("lseek via dup", lseek(d, 7, SEEK_SET));
    SHOW("offset seen by the original", lseek(fd, 0, SEEK_CUR));
    close(d);
    close(ro);
    SHOW("fsync", fsync(fd));
    close(fd);
    SHOW("read after close", read(fd, back, 3));
    return 0;
}
"""


@pytest.fixture(scope="module")
def data_prog(tmp_path_factory) -> Path:
    return _gcc(DATA_C, tmp_path_factory.mktemp("fast") / "data")


@pytest.fixture(scope="module")
def edge_prog(tmp_path_factory) -> Path:
    return _gcc(EDGE_C, tmp_path_factory.mktemp("fastedge") / "edge")


@pytest.mark.parametrize(("prog", "transport"), [("data", "zmtp"), ("edge", "zmtp"),
                                                  ("data", "libzmq")])  # fmt: skip
def test_both_paths_match_the_kernel_and_each_other(tmp_path, prog, transport, data_prog,
                                                    edge_prog):  # fmt: skip
    """The same program natively, with both fast paths and with neither: the same output
    line for line, the same files byte for byte; the C path served the data calls.
    ``libzmq``: relay and delegate on libzmq (``TESTBED_ZMTP=0``): the relay's C path
    sends and receives through libzmq, the delegate answers every call in general."""
    exe = data_prog if prog == "data" else edge_prog
    on, off = (ON, OFF) if transport == "zmtp" else ({**ON, "TESTBED_ZMTP": "0"},
                                                     {**OFF, "TESTBED_ZMTP": "0"})  # fmt: skip
    sub = "." if prog == "data" else "e"
    native_dir = tmp_path / "native"
    (native_dir / sub).mkdir(parents=True, exist_ok=True)
    native = subprocess.run([str(exe), str(native_dir / sub)], capture_output=True, timeout=120)
    assert native.returncode == 0, native.stderr.decode()
    outs, hots = {}, {}
    for name, env in (("on", on), ("off", off)):
        root, prefix = tmp_path / f"root-{name}", tmp_path / f"mnt-{name}"
        (root / sub).mkdir(parents=True, exist_ok=True)
        prefix.mkdir()
        dlg = _delegate(root, env)
        try:
            res = _run(dlg.endpoint, prefix, [str(exe), str(prefix / sub)], tmp_path / f"run-{name}",
                       env)  # fmt: skip
        finally:
            dlg.__exit__()
        assert res.returncode == 0, res.stderr.decode()
        assert "Traceback" not in res.stderr.decode()
        outs[name] = res.stdout.decode().splitlines()
        assert tree_bytes(root / sub) == tree_bytes(native_dir / sub), name
        assert os.listdir(prefix) == []
        hots[name] = _hot(tmp_path / f"run-{name}")
        meta = json.loads((tmp_path / f"run-{name}" / "run.json").read_text())
        assert meta["delegate"]["transport"] == transport
    lines = native.stdout.decode().splitlines()
    assert len(lines) > 40
    assert outs["on"] == lines
    assert outs["off"] == lines
    c_on, remote_on = hots["on"]
    assert c_on > 0.5 * remote_on, hots  # most offloaded calls went through C
    assert hots["off"][0] == 0


def test_a_lying_delegate_gets_eio_on_both_paths(tmp_path, ctx):
    """issue 19's lying replies, through the C path and through Python: identical answers
    (EIO, nothing written beyond what was asked), one warning line each."""
    prog = _gcc(MAL_C, tmp_path / "mal")
    got = {}
    for name, env in (("on", ON), ("off", OFF)):
        prefix = tmp_path / f"mnt-{name}"
        prefix.mkdir()
        fake = FakeDelegate(ctx)
        try:
            res = _run(fake.endpoint, prefix, [str(prog), str(prefix)], tmp_path / f"run-{name}",
                       env)  # fmt: skip
        finally:
            fake.close()
        assert res.returncode == 0, res.stderr.decode()
        err = res.stderr.decode()
        assert "Traceback" not in err
        assert len([ln for ln in err.splitlines() if "invalid reply" in ln]) == 1, err
        got[name] = res.stdout.decode().splitlines()
        meta = json.loads((tmp_path / f"run-{name}" / "run.json").read_text())
        got[name + "-bad"] = meta["offload"]["bad_replies"]
    assert got["on"] == got["off"]
    assert got["on-bad"] == got["off-bad"] > 10
    assert "read-good ret=4 errno=0 untouched=1" in got["on"]


# ---------------------------------------------------------------- a delegate that lies in C's terms

LIAR_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static unsigned char buf[1 << 21];
int main(int argc, char **argv) {
    char p[4096];
    snprintf(p, sizeof p, "%s/file", argv[1]);
    int fd = open(p, O_RDWR);
    for (int i = 1; i <= 9; i++) {
        memset(buf, 0xAA, sizeof buf);
        errno = 0;
        long r = read(fd, buf, 100 * i);
        size_t first = sizeof buf;
        for (size_t j = 0; j < sizeof buf; j++) if (buf[j] != 0xAA && buf[j] != 'Z') { first = j; break; }
        size_t last = 0;
        for (size_t j = 0; j < sizeof buf; j++) if (buf[j] != 0xAA) last = j + 1;
        printf("read%d ret=%ld errno=%d other=%zu touched=%zu\n", i, r, r < 0 ? errno : 0,
               first, last);
    }
    memset(buf, 0xAA, sizeof buf);
    long r = read(fd, buf, 1 << 21);
    size_t last = 0;
    for (size_t j = 0; j < sizeof buf; j++) if (buf[j] != 0xAA) last = j + 1;
    printf("big ret=%ld touched=%zu\n", r, last);
    struct stat st;
    memset(&st, 0xAA, sizeof st);
    errno = 0;
    r = fstat(fd, &st);
    printf("fstat ret=%ld errno=%d\n", r, r < 0 ? errno : 0);
    return 0;
}
"""


def _result_frames(call: wire.Call):
    """Replies to read(…, 100·i): widths and shapes the C parser must get right or refuse."""
    i, cid = call.args[2] // 100, call.call_id
    z = lambda n: b"Z" * n  # noqa: E731
    st = lambda: [1, 2, 3, 4]  # noqa: E731
    return {
        # good, general encoding, minimal widths
        1: msgpack.packb([2, "result", cid, 100, 0, st(), [[1, z(100)]]]),
        # good, every integer full width, bin32
        2: b"\x97\x02\xa6result\xcf"
        + cid.to_bytes(8, "big")
        + b"\xd3"
        + (200).to_bytes(8, "big")
        + b"\xcd\x00\x00\x94"
        + b"".join(b"\xcf" + t.to_bytes(8, "big") for t in (1, 2, 3, 4))
        + b"\x91\x92\x01\xc6"
        + (200).to_bytes(4, "big")
        + z(200),
        # more data than ret
        3: msgpack.packb([2, "result", cid, 10, 0, st(), [[1, z(300)]]]),
        # ret above what was asked
        4: msgpack.packb([2, "result", cid, 500, 0, st(), [[1, z(500)]]]),
        # a negative ret without an errno (a trailing byte, which ``wire`` refuses
        # without the call's id, would leave the call to its timeout: the parser test)
        5: msgpack.packb([2, "result", cid, -5, 0, st(), []]),
        # a negative stamp
        6: msgpack.packb([2, "result", cid, 6, 0, [1, -2, 3, 4], [[1, z(6)]]]),
        # ret 0 with data
        7: msgpack.packb([2, "result", cid, 0, 0, st(), [[1, z(7)]]]),
        # bool where an int is due
        8: msgpack.packb([2, "result", cid, 8, False, st(), [[1, z(8)]]]),
        # good, short read
        9: msgpack.packb([2, "result", cid, 3, 0, st(), [[1, b"abc"]]]),
    }[i]


class LiarDelegate(FakeDelegate):
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
                name = syscalls.NAME_BY_NR.get(msg.nr)
                if name == "openat":
                    reply = wire.encode_result(wire.Result(msg.call_id, 7, 0, 1, 2, 3, 4, ()))
                elif name == "read" and msg.args[2] == 2 * MIB:  # 1 MiB + 1 given for 1 MiB
                    out = ((1, b"Z" * (MIB + 1)),)
                    reply = wire.encode_result(
                        wire.Result(msg.call_id, MIB + 1, 0, 1, 2, 3, 4, out)
                    )
                elif name == "read":
                    reply = _result_frames(msg)
                elif name in ("fstat", "newfstatat"):  # a stat of 200 bytes
                    out = ((1 if name == "fstat" else 2, b"S" * 200),)
                    reply = wire.encode_result(wire.Result(msg.call_id, 0, 0, 1, 2, 3, 4, out))
                else:
                    reply = wire.encode_result(wire.Result(msg.call_id, 0, 0, 1, 2, 3, 4, ()))
            self.sock.send_multipart([ident, reply])


def test_replies_in_any_width_and_lies_the_c_parser_meets(tmp_path, ctx):
    prog = _gcc(LIAR_C, tmp_path / "liar")
    got = {}
    for name, env in (("on", ON), ("off", OFF)):
        prefix = tmp_path / f"mnt-{name}"
        prefix.mkdir()
        fake = LiarDelegate(ctx)
        try:
            res = _run(fake.endpoint, prefix, [str(prog), str(prefix)], tmp_path / f"run-{name}",
                       env)  # fmt: skip
        finally:
            fake.close()
        assert res.returncode == 0, res.stderr.decode()
        assert "Traceback" not in res.stderr.decode()
        got[name] = res.stdout.decode().splitlines()
    eio = "ret=-1 errno=5 other=2097152 touched=0"
    assert (
        got["on"]
        == got["off"]
        == [
            "read1 ret=100 errno=0 other=2097152 touched=100",
            "read2 ret=200 errno=0 other=2097152 touched=200",
            f"read3 {eio}",
            f"read4 {eio}",
            f"read5 {eio}",
            f"read6 {eio}",
            f"read7 {eio}",
            f"read8 {eio}",
            "read9 ret=3 errno=0 other=0 touched=3",
            "big ret=-1 touched=0",
            "fstat ret=-1 errno=5",
        ]
    )


# ---------------------------------------------------------------- the delegate's data path


def _call(conn, call_id: int, name: str, args: tuple, data: bytes | None = None):
    bufs = ((1, data),) if data is not None else ()
    frame = wire.encode_call(wire.Call(call_id, 4242, NR[name], tuple(a & U64 for a in args),
                                       bufs, "offload"))  # fmt: skip
    conn.sendall(zmtp.frame(frame))
    (reply,) = zmtp.read_message(conn)
    kind, res = wire.decode(reply)
    assert kind == wire.RESULT and res.call_id == call_id
    return res.ret, res.errno, res.outbufs


def _session(endpoint: str) -> list:
    """One client's calls against ``endpoint``: open, the data calls and their edges."""
    conn = zmtp.connect(endpoint)
    try:
        conn.sendall(zmtp.frame(wire.encode_hello({"host": "t", "pid": 1})))
        zmtp.read_message(conn)
        rng = random.Random(21)
        blob = rng.randbytes(3 * MIB)
        out = []
        ids = iter(range(1, 10_000))
        op = lambda *a, **k: out.append(_call(conn, next(ids), *a, **k))  # noqa: E731
        ofl = os.O_RDWR | os.O_CREAT
        op("openat", (AT_FDCWD, 0, ofl, 0o644, 0, 0))  # (no path: EFAULT)
        conn.sendall(zmtp.frame(wire.encode_call(wire.Call(
            next(ids), 1, NR["openat"], (AT_FDCWD & U64, 0, ofl, 0o644, 0, 0), ((1, b"f"),),
            "offload"))))  # fmt: skip
        _k, res = wire.decode(zmtp.read_message(conn)[0])
        h = res.ret
        out.append(h)
        for size in (0, 1, 4096, 65535, 65536, 70000, 300000, MIB, MIB + 1):
            op("write", (h, 0, size, 0, 0, 0), blob[:size])
        op("write", (h, E.EFAULT, 10, 0, 0, 0), b"")  # the relay's verdict
        op("write", (h, 0, 10, 0, 0, 0))  # no buffer at all
        op("lseek", (h, 0, 0, 0, 0, 0))
        for size in (0, 1, 4096, 70000, MIB, 3 * MIB):
            op("read", (h, 0, size, 0, 0, 0))
        op("read", (h, E.EFAULT, 10, 0, 0, 0))
        op("pread64", (h, 0, 100, 5, 0, 0))
        op("pread64", (h, 0, 100, -1, 0, 0))
        op("pread64", (h, 0, (1 << 63) - 10, 100, 0, 0))  # offset + count overflow
        op("pwrite64", (h, 0, 10, 7, 0, 0), b"0123456789")
        op("pwrite64", (h, 0, 10, -3, 0, 0), b"0123456789")
        op("readv", (h, 0, 5000, 0, 0, 0))
        op("preadv", (h, 0, 5000, 11, 0, 0))
        op("preadv", (h, 0, 5000, -1, 0, 0))
        op("writev", (h, 0, 3, 0, 0, 0), b"abc")
        op("pwritev", (h, 0, 3, 1 << 20, 0, 0), b"xyz")
        op("lseek", (h, 12, 0, 0, 0, 0))
        op("lseek", (h, 0, 9, 0, 0, 0))
        op("lseek", (h, -1, 0, 0, 0, 0))
        op("fstat", (h, 0, 0, 0, 0, 0))
        op("newfstatat", (h, 0, 0, AT_EMPTY_PATH, 0, 0), b"")
        op("newfstatat", (h, 0, 0, 0, 0, 0), b"")
        op("read", (h + 100, 0, 10, 0, 0, 0))  # a handle that is not ours
        op("write", (h + 100, 0, 3, 0, 0, 0), b"abc")
        op("fstat", (h + 100, 0, 0, 0, 0, 0))
        conn.sendall(zmtp.frame(wire.encode_bye({})))
        _k, bye = wire.decode(zmtp.read_message(conn)[0])
        out.append((bye["calls"], bye["errors"], bye["bytes_in"]))
        return out
    finally:
        conn.close()


def _mask_stat(results: list) -> list:
    """st_atime etc. differ between two files: keep size, mode, nlink of a stat."""
    out = []
    for r in results:
        if isinstance(r, tuple) and len(r) == 3 and isinstance(r[2], tuple) and r[2] \
                and len(r[2][0][1]) == 144:  # fmt: skip
            ((arg, st),) = r[2]
            nlink, mode = struct.unpack_from("<QI", st, 16)
            r = (r[0], r[1], ((arg, (struct.unpack_from("<q", st, 48)[0], mode, nlink)),))
        out.append(r)
    return out


def test_the_delegate_answers_the_same_with_and_without_its_data_path(tmp_path):
    answers = {}
    for name, env in (("on", ON), ("off", OFF)):
        root = tmp_path / f"root-{name}"
        dlg = _delegate(root, env)
        try:
            answers[name] = _session(dlg.endpoint)
        finally:
            dlg.__exit__()
        answers[name + "-file"] = (root / "f").read_bytes()
    assert _mask_stat(answers["on"]) == _mask_stat(answers["off"])
    assert answers["on-file"] == answers["off-file"]
    assert len(answers["on-file"]) > MIB


# ---------------------------------------------------------------- C parts on their own


def test_the_placeholder_table_in_c_follows_the_relays_dict(lib):
    """tb_map_set/del under many random inserts and removals (linear probing with
    backward-shift deletion) agree with a dict; past half full it gives up for good."""
    ptr = lib.tb_new()
    try:
        fp = type("F", (), {})()
        fp._ptr = ptr
        fp.lib = lib
        fp.map_set = lambda ino, h: lib.tb_map_set(ptr, ino, h)
        fp.map_del = lambda ino: lib.tb_map_del(ptr, ino)
        mirror = fastpath._Placeholders({5: 1}, fp)
        rng = random.Random(7)
        model = {5: 1}
        for step in range(40_000):
            ino = rng.randrange(1, 12_000) * 7919
            if rng.random() < 0.55 and len(model) < 6000:
                model[ino] = step
                mirror[ino] = step
            else:
                model.pop(ino, None)
                mirror.pop(ino, None)
            if step % 997 == 0:
                for k in rng.sample(sorted(model), min(50, len(model))):
                    assert lib.tb_map_get(ptr, k) == model[k]
                assert lib.tb_map_get(ptr, 3) == -1
        assert dict(mirror) == model
        assert all(lib.tb_map_get(ptr, k) == v for k, v in model.items())
        mirror.clear()
        assert lib.tb_map_get(ptr, 5) == -1
        for i in range(1, 9000):  # more than half the table: C hands fd calls to Python
            mirror[i] = i
        assert lib.tb_map_get(ptr, 1) == -2
    finally:
        lib.tb_free(ctypes.c_void_p(ptr))


class _OReply(ctypes.Structure):
    _fields_ = [("ret", ctypes.c_int64), ("err", ctypes.c_int64), ("stamps", ctypes.c_int64 * 4),
                ("nouts", ctypes.c_int), ("out_arg", ctypes.c_int64 * 6),
                ("out", ctypes.c_void_p * 6), ("out_len", ctypes.c_size_t * 6)]  # fmt: skip


def test_the_c_result_parser_accepts_only_what_wire_decodes_to_the_same(lib):
    rng = random.Random(22)
    for _ in range(3000):
        cid = rng.getrandbits(rng.choice((7, 16, 32, 63, 64)))
        ret = rng.choice((0, 1, 100, -5, 1 << 40, -(1 << 63), (1 << 63) - 1))
        err = rng.choice((0, 0, 5, 4095, 4096))
        stamps = [rng.choice((0, 1, 1 << 62, (1 << 63) - 1, 1 << 63, -1)) for _ in range(4)]
        outs = [[rng.choice((0, 1, 2, 6)), rng.randbytes(rng.choice((0, 3, 300, 70000)))]
                for _ in range(rng.choice((0, 1, 1, 2, 7)))]  # fmt: skip
        msg = [2, "result", cid, ret, err, stamps, outs]
        if rng.random() < 0.1:
            msg[rng.randrange(7)] = rng.choice((True, None, "x", 2.5, [1]))
        frame = msgpack.packb(msg, use_bin_type=True)
        if rng.random() < 0.05:
            frame += b"\x00"
        want_id = cid if rng.random() < 0.9 else cid ^ 1
        r = _OReply()
        ok = lib.tb_parse_oresult(frame, len(frame), want_id & U64, ctypes.byref(r))
        try:
            kind, res = wire.decode(frame)
        except wire.WireError:
            assert not ok, msg
            continue
        if not ok:
            continue  # Python decides what C leaves to it
        assert kind == wire.RESULT and res.call_id == want_id
        got_outs = tuple((r.out_arg[i], ctypes.string_at(r.out[i], r.out_len[i]))
                         for i in range(r.nouts))  # fmt: skip
        assert (r.ret, r.err, tuple(r.stamps), got_outs) == (
            res.ret, res.errno, (res.t_recv, res.t_exec_start, res.t_exec_end, res.t_send),
            res.outbufs)  # fmt: skip


# ---------------------------------------------------------------- threads: calls handed back

THREADS_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static char dir[4096];
static int shared;

static void *worker(void *arg) {
    long id = (long)arg;
    char p[4200];
    size_t size = id % 2 ? (1 << 20) : 4096;
    unsigned char *buf = malloc(size), *back = malloc(size);
    unsigned long sum = 0;
    snprintf(p, sizeof p, "%s/t%ld", dir, id);
    int fd = open(p, O_RDWR | O_CREAT | O_TRUNC, 0644);
    for (int round = 0; round < 40; round++) {
        for (size_t i = 0; i < size; i++) buf[i] = (unsigned char)(i * 7 + round + id);
        if (pwrite(fd, buf, size, (off_t)round * size) != (ssize_t)size) return (void *)1;
        struct iovec v[2] = {{back, size / 2}, {back + size / 2, size - size / 2}};
        if (preadv(fd, v, 2, (off_t)round * size) != (ssize_t)size) return (void *)2;
        if (memcmp(buf, back, size)) return (void *)3;
        char rec[64];
        int n = snprintf(rec, sizeof rec, "%ld:%d\n", id, round);
        if (write(shared, rec, n) != n) return (void *)4;  /* O_APPEND, shared */
        for (size_t i = 0; i < size; i += 4096) sum += back[i];
        usleep(300 * (id + 1));  /* now alone, now together: both cases */
    }
    close(fd);
    free(buf);
    free(back);
    return (void *)(sum & 0xffff ? 0 : 0);
}

int main(int argc, char **argv) {
    snprintf(dir, sizeof dir, "%s", argv[1]);
    char p[4200];
    snprintf(p, sizeof p, "%s/shared", dir);
    shared = open(p, O_WRONLY | O_CREAT | O_APPEND, 0644);
    pthread_t t[6];
    for (long i = 0; i < 6; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    int bad = 0;
    for (int i = 0; i < 6; i++) {
        void *r;
        pthread_join(t[i], &r);
        if (r) { printf("thread %d failed %ld\n", i, (long)r); bad = 1; }
    }
    printf("done bad=%d\n", bad);
    return bad;
}
"""


def test_threads_in_flight_together_are_handed_back_whole(tmp_path):
    """Six threads, 4 KiB and 1 MiB calls, now alone, now together: while C waits for one
    reply another thread's call arrives, and the call in flight goes to Python with its
    Pending (C serves only while nothing else is in flight); the files come out as
    natively with both paths."""
    src = tmp_path / "threads.c"
    src.write_text(THREADS_C)
    exe = tmp_path / "threads"
    subprocess.run(["gcc", "-O1", "-pthread", "-o", str(exe), str(src)], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    native = tmp_path / "native"
    native.mkdir()
    nat = subprocess.run([str(exe), str(native)], capture_output=True, timeout=120)
    assert nat.returncode == 0, nat.stdout
    want = {f"t{i}": (native / f"t{i}").read_bytes() for i in range(6)}
    lines = sorted((native / "shared").read_text().splitlines())
    for name, env in (("on", ON), ("off", OFF)):
        root, prefix = tmp_path / f"root-{name}", tmp_path / f"mnt-{name}"
        root.mkdir()
        prefix.mkdir()
        dlg = _delegate(root, env)
        try:
            res = _run(dlg.endpoint, prefix, [str(exe), str(prefix)], tmp_path / f"run-{name}", env)
        finally:
            dlg.__exit__()
        assert res.returncode == 0, (res.stdout, res.stderr.decode())
        assert res.stdout.decode().strip() == "done bad=0"
        assert {f"t{i}": (root / f"t{i}").read_bytes() for i in range(6)} == want, name
        assert sorted((root / "shared").read_text().splitlines()) == lines
        c_calls, remote = _hot(tmp_path / f"run-{name}")
        assert (c_calls > 0) if name == "on" else c_calls == 0, (c_calls, remote)


def test_a_large_frame_cut_off_midway_leaves_the_delegate_serving(tmp_path):
    """A client announces a 1 MiB write, sends 300 KiB of it and vanishes; another
    client's large and small calls are answered as before (the reused buffer is back)."""
    root = tmp_path / "root"
    dlg = _delegate(root, ON)
    try:
        cut = zmtp.connect(dlg.endpoint)
        frame = wire.encode_call(wire.Call(1, 1, NR["write"], (3, 0, MIB, 0, 0, 0),
                                           ((1, bytes(MIB)),), "offload"))  # fmt: skip
        cut.sendall(zmtp.frame(frame)[: 300 << 10])
        cut.close()
        for _ in range(2):
            answers = _session(dlg.endpoint)
            assert answers[-1][0] >= 40  # the BYE's count of calls
        assert dlg.proc.poll() is None
    finally:
        dlg.__exit__()
    assert len((root / "f").read_bytes()) > MIB
