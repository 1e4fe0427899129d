"""Delegate side of offload mode: confinement, per-client fd tables, limits.

The executor is driven with real wire.Call values (as the delegate decodes
them) against a real directory tree; every escape attempt is checked on disk.
"""

from __future__ import annotations

import errno as E
import hashlib
import os
import time

import pytest

from testbed.core import syscalls, wire
from testbed.core.offload_calls import AT_FDCWD, AT_SYMLINK_FOLLOW
from testbed.delegate.offload.execute import Executor

pytestmark = pytest.mark.unit

U64 = (1 << 64) - 1
CWD = AT_FDCWD & U64
A, B = b"client-a", b"client-b"


def call(ex: Executor, client: bytes, name: str, *args: int, **bufs: bytes):
    """Run one offload call; ``bufs`` keyed b0..b5 by argument index."""
    full = tuple(a & U64 for a in args) + (0,) * (6 - len(args))
    bl = tuple((int(k[1:]), v) for k, v in bufs.items())
    return ex.execute(client, wire.Call(1, 1, syscalls.NR_BY_NAME[name], full, bl, "offload"))


def snapshot(path) -> dict[str, str]:
    """Every file under ``path`` with a hash of its content (and link targets)."""
    out = {}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[p] = "->" + os.readlink(p)
            elif os.path.isfile(p):
                with open(p, "rb") as f:
                    out[p] = hashlib.sha256(f.read()).hexdigest()
            else:
                out[p] = "dir"
    return out


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not read me")
    (root / "sub").mkdir()
    (root / "sub" / "data").write_bytes(b"hello offload")
    os.symlink(str(outside), root / "abs_out")
    os.symlink("../outside", root / "rel_out")
    os.symlink("../../outside/secret", root / "sub" / "rel_secret")
    os.symlink("/proc/self/root" + str(outside), root / "proc_root")
    os.symlink("data", root / "sub" / "inside_link")
    ex = Executor(str(root))
    yield ex, root, outside
    ex.close()


O_RDONLY, O_CREAT_W = os.O_RDONLY, os.O_CREAT | os.O_WRONLY


def test_open_read_write_stat_inside_root(tree):
    ex, root, _ = tree
    h, err, _ = call(ex, A, "open", 0, O_RDONLY, b0=b"sub/data")
    assert err == 0 and h >= 3
    ret, err, outs = call(ex, A, "read", h, 0, 100)
    assert (ret, err, outs) == (13, 0, ((1, b"hello offload"),))
    w, err, _ = call(ex, A, "openat", CWD, 0, O_CREAT_W, 0o640, b1=b"sub/new")
    assert err == 0
    assert call(ex, A, "write", w, 0, 5, b1=b"abcde")[:2] == (5, 0)
    ret, err, outs = call(ex, A, "fstat", w, 0)
    assert err == 0 and len(outs[0][1]) == 144
    assert call(ex, A, "close", w) == (0, 0, ())
    assert (root / "sub" / "new").read_bytes() == b"abcde"
    assert (root / "sub" / "new").stat().st_mode & 0o777 == 0o640
    # a symlink that stays inside is followed
    h2, err, _ = call(ex, A, "open", 0, O_RDONLY, b0=b"sub/inside_link")
    assert err == 0 and call(ex, A, "read", h2, 0, 5)[2] == ((1, b"hello"),)


@pytest.mark.parametrize(
    "path",
    [b"../outside/secret", b"sub/../../outside/secret", b"abs_out/secret", b"rel_out/secret",
     b"proc_root/secret", b"/etc/passwd", str.encode("/proc/self/root/etc/passwd")],
)  # fmt: skip
def test_escapes_fail_and_touch_nothing(tree, path):
    ex, root, outside = tree
    before = snapshot(outside)
    for flags in (O_RDONLY, O_CREAT_W | os.O_TRUNC):
        ret, err, outs = call(ex, A, "open", 0, flags, 0o644, b0=path)
        assert ret < 0 and err in (E.EXDEV, E.ELOOP, E.ENOENT), (path, err)
    for name, bufs in [
        ("stat", {"b0": path}),
        ("unlink", {"b0": path}),
        ("truncate", {"b0": path}),
        ("chmod", {"b0": path}),
        ("mkdir", {"b0": path + b"_dir"}),
        ("rename", {"b0": b"sub/data", "b1": path}),
        ("link", {"b0": path, "b1": b"stolen"}),
        ("symlink", {"b0": b"x", "b1": path + b"_ln"}),
    ]:
        ret, err, _ = call(ex, A, name, 0, 0o777, **bufs)
        assert ret < 0 and err != 0, (name, path)
    assert snapshot(outside) == before
    assert (root / "sub" / "data").read_bytes() == b"hello offload"
    assert not (root / "stolen").exists()


@pytest.mark.parametrize("link", [b"sub/rel_secret", b"abs_out", b"proc_root"])
def test_calls_following_a_final_symlink_out_fail(tree, link):
    ex, _, outside = tree
    before = snapshot(outside)
    for name, args in [("open", (0, O_CREAT_W | os.O_TRUNC, 0o644)), ("stat", ()),
                       ("truncate", (0, 0)), ("chmod", (0, 0o777)), ("chdir", ()),
                       ("access", (0, 0))]:  # fmt: skip
        ret, err, _ = call(ex, A, name, *args, b0=link)
        assert ret < 0 and err in (E.EXDEV, E.ELOOP), (name, link, err)
    assert snapshot(outside) == before
    assert os.stat(outside / "secret").st_mode & 0o777 != 0o777


def test_hard_link_tricks_fail(tree):
    ex, root, outside = tree
    before = snapshot(outside)
    # linkat(AT_SYMLINK_FOLLOW) of a symlink pointing out must not link the outside file
    ret, err, _ = call(ex, A, "linkat", CWD, 0, CWD, 0, AT_SYMLINK_FOLLOW,
                       b1=b"sub/rel_secret", b3=b"grab")  # fmt: skip
    assert ret < 0 and err in (E.EXDEV, E.ELOOP)
    # without follow it links the symlink itself, whose use stays confined
    assert call(ex, A, "linkat", CWD, 0, CWD, 0, 0, b1=b"abs_out", b3=b"alias")[:2] == (0, 0)
    assert os.path.islink(root / "alias")
    assert call(ex, A, "open", 0, O_RDONLY, b0=b"alias/secret")[1] == E.EXDEV
    assert snapshot(outside) == before
    assert not (root / "grab").exists()


def test_dirfd_handles_resolve_beneath_root(tree):
    ex, root, _ = tree
    d, err, _ = call(ex, A, "open", 0, os.O_RDONLY | os.O_DIRECTORY, b0=b"sub")
    assert err == 0
    # relative to a directory handle, ".." may climb to the root but not above
    h, err, _ = call(ex, A, "openat", d, 0, O_RDONLY, b1=b"../sub/data")
    assert err == 0
    assert call(ex, A, "openat", d, 0, O_RDONLY, b1=b"../../outside/secret")[1] == E.EXDEV
    ret, err, outs = call(ex, A, "getdents64", d, 0, 4096)
    assert err == 0 and b"data" in outs[0][1] and b"inside_link" in outs[0][1]
    assert call(ex, A, "fchdir", d)[2] == ((0, b"sub"),)


def test_clients_are_isolated(tree):
    ex, _, _ = tree
    h, err, _ = call(ex, A, "open", 0, O_RDONLY, b0=b"sub/data")
    assert err == 0
    assert call(ex, B, "read", h, 0, 10)[1] == E.EBADF
    assert call(ex, B, "close", h)[1] == E.EBADF
    assert call(ex, A, "read", h, 0, 5)[:2] == (5, 0)


def test_forget_and_idle_reap_close_remote_fds(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    ex = Executor(str(root), idle_s=60.0)
    try:
        call(ex, A, "open", 0, O_RDONLY, b0=b"f")
        real = next(iter(ex.tables._tables[A].fds.values()))
        assert ex.tables.open_fds(A) == 1
        ex.forget(A)
        assert ex.tables.open_fds() == 0
        with pytest.raises(OSError):
            os.fstat(real)  # closed at the delegate
        call(ex, B, "open", 0, O_RDONLY, b0=b"f")
        assert ex.tables.reap() == 0  # B is not idle yet
        assert ex.tables.reap(time.monotonic_ns() + 61_000_000_000) == 1
        assert ex.tables.open_fds() == 0
    finally:
        ex.close()


def test_per_client_limits(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "f").write_bytes(b"x" * 100)
    ex = Executor(str(root), max_fds=2, max_inflight=4096 + 64)
    try:
        assert call(ex, A, "open", 0, O_RDONLY, b0=b"f")[1] == 0
        h, err, _ = call(ex, A, "open", 0, O_RDONLY, b0=b"f")
        assert err == 0
        assert call(ex, A, "open", 0, O_RDONLY, b0=b"f")[1] == E.EMFILE
        assert call(ex, B, "open", 0, O_RDONLY, b0=b"f")[1] == 0  # B has its own limit
        assert call(ex, A, "read", h, 0, 4096)[:2] == (100, 0)
        assert call(ex, A, "read", h, 0, 1 << 20)[1] == E.ENOBUFS  # too many bytes in flight
        assert len(os.listdir(root)) == 1
    finally:
        ex.close()


def test_record_locks_conflict_between_descriptions(tree):
    import struct

    ex, _, _ = tree
    flock = struct.pack("<hhxxxxqqixxxx", 1, 0, 0, 10, 0)  # F_WRLCK, SEEK_SET, 0..10
    h1 = call(ex, A, "open", 0, os.O_RDWR, b0=b"sub/data")[0]
    h2 = call(ex, B, "open", 0, os.O_RDWR, b0=b"sub/data")[0]
    assert call(ex, A, "fcntl", h1, 6, 0, b2=flock)[:2] == (0, 0)  # F_SETLK
    assert call(ex, B, "fcntl", h2, 6, 0, b2=flock)[1] in (E.EAGAIN, E.EACCES)
    unlock = struct.pack("<hhxxxxqqixxxx", 2, 0, 0, 10, 0)
    assert call(ex, A, "fcntl", h1, 6, 0, b2=unlock)[:2] == (0, 0)
    assert call(ex, B, "fcntl", h2, 6, 0, b2=flock)[:2] == (0, 0)


def test_unknown_call_is_enosys(tree):
    ex, _, _ = tree
    assert call(ex, A, "mmap", 0)[1] == E.ENOSYS
