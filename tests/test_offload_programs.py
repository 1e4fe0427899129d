# ruff: noqa: F811  (the lab fixture of tests/test_offload.py is imported by name)
"""Programs that map the files they read, offloaded (docs/offload.md, "Mappings").

git (init, add, commit, gc, fsck) in an offloaded work tree, sqlite3 in WAL
mode, and the mmap edges themselves, each compared with a native run of the
same script, as in tests/test_offload.py.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from testbed.core import rundir
from tests.test_offload import Lab, lab, offload, snapshot  # noqa: F401 (fixture)

pytestmark = [pytest.mark.root, pytest.mark.netns]

GIT_ENV = ("export GIT_AUTHOR_DATE=@1700000000 GIT_COMMITTER_DATE=@1700000000 "
           "GIT_CONFIG_NOSYSTEM=1 HOME={home} && ")  # fmt: skip


def run_both(lab: Lab, tmp_path: Path, name: str, script: str, **fmt: str):
    here = tmp_path / "cwd"
    here.mkdir()
    native = subprocess.run(["sh", "-c", script.format(P=lab.native / name, **fmt)],
                            capture_output=True, timeout=300, cwd=here)  # fmt: skip
    assert native.returncode == 0, native.stderr.decode()
    res = offload(lab, tmp_path / "run", ["sh", "-c", script.format(P=lab.prefix / name, **fmt)],
                  cwd=here)  # fmt: skip
    assert b"Traceback" not in res.stderr, res.stderr.decode()
    return native, res, here


def meta(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "run.json").read_text())["offload"]


def test_git_in_an_offloaded_work_tree_matches_native(lab, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    script = GIT_ENV + (
        "mkdir -p {P} && cd {P} && git init -q -b main . && git config user.email t@example.org && "
        "git config user.name t && cp -r {src}/. . && git add -A && git commit -q -m one && "
        "echo more >> sub/text.txt && git rm -q f0.bin && git commit -q -am two && "
        "git gc -q && git fsck --full --strict && git log --format='%H %s' && "
        "git ls-tree -r HEAD && git status --porcelain && git cat-file -p HEAD:sub/deep/small && "
        "git count-objects -v | grep -v size"
    )
    native, res, here = run_both(lab, tmp_path, "git", script, src=str(lab.src), home=str(home))
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == native.stdout
    assert b"two" in res.stdout and b"packs: 1" in res.stdout
    work = {k: v for k, v in snapshot(lab.root / "git").items() if not k.startswith(".git")}
    assert work == {
        k: v for k, v in snapshot(lab.native / "git").items() if not k.startswith(".git")
    }
    assert list((lab.root / "git" / ".git" / "objects" / "pack").glob("*.pack"))
    assert list(here.iterdir()) == []
    m = meta(tmp_path)
    assert m["eio"] == 0 and "mmap" not in m["refused"]  # git mapped its files, privately


def test_sqlite_wal_with_exclusive_locking_matches_native(lab, tmp_path):
    sql = ("pragma locking_mode=exclusive; pragma journal_mode=wal; create table t(k, v); "
           "insert into t select value, hex(randomblob(32)) from generate_series(1, 3000); "
           "select count(*), sum(k) from t; pragma integrity_check;")  # fmt: skip
    again = "pragma locking_mode=exclusive; select count(*) from t;"  # a WAL db, reopened
    script = f"mkdir -p {{P}} && sqlite3 {{P}}/db \"{sql}\" && sqlite3 {{P}}/db '{again}'"
    native, res, _ = run_both(lab, tmp_path, "wal", script)
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == native.stdout and b"3000|4501500" in res.stdout


def test_sqlite_wal_shared_memory_is_refused_as_documented(lab, tmp_path):
    """WAL's -shm index is a writable shared mapping: it cannot stay coherent with the
    delegate's file, so mmap fails with ENODEV and sqlite reports an I/O error (as
    sqlite documents for WAL on network file systems)."""
    here = tmp_path / "cwd"
    here.mkdir()
    sql = "pragma journal_mode=wal; create table t(x); insert into t values (1);"
    res = offload(lab, tmp_path / "run", ["sh", "-c", f"mkdir -p {lab.prefix}/shm && "
                                          f"sqlite3 {lab.prefix}/shm/db '{sql}'"], cwd=here)  # fmt: skip
    assert res.returncode != 0 and b"disk I/O error" in res.stderr
    assert meta(tmp_path)["refused"].get("mmap", 0) >= 1


MMAP_SCRIPT = textwrap.dedent("""
    import mmap, os, sys
    p = sys.argv[1]
    with open(p, "wb") as f:
        f.write(bytes(range(256)) * 64 + b"tail")
    fd = os.open(p, os.O_RDWR)
    m = mmap.mmap(fd, 8192, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                  offset=4096)
    print(m[:4].hex(), m[-4:].hex(), len(m))
    m[0] = 0xFF                                    # private: the file does not change
    print(os.pread(fd, 4, 4096).hex(), m[:2].hex())
    print(os.read(fd, 3).hex(), os.lseek(fd, 0, os.SEEK_CUR))  # the fd is the file again
    ro = os.open(p, os.O_RDONLY)
    whole = mmap.mmap(ro, 0, prot=mmap.PROT_READ)  # the whole file (fstat for its size)
    os.close(ro)                                   # the mapping outlives its fd
    print(len(whole), whole[-6:].hex(), whole[16380:16384].hex())
    sh = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    print(sh[255:257].hex())
    wo = os.open(p, os.O_WRONLY)
    try:
        mmap.mmap(wo, 4096, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    except OSError as e:
        print("write-only fd:", e.errno)
    try:
        mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        print("shared writable: mapped")
    except OSError as e:
        print("shared writable:", e.errno)
""")


def test_mmap_edges_match_native_but_shared_writes(lab, tmp_path):
    (tmp_path / "m.py").write_text(MMAP_SCRIPT)
    script = f"mkdir -p {{P}} && python3 {tmp_path / 'm.py'} {{P}}/f"
    native, res, here = run_both(lab, tmp_path, "mmap", script)
    assert res.returncode == 0, res.stderr.decode()
    out, want = res.stdout.splitlines(), native.stdout.splitlines()
    assert out[:-1] == want[:-1]
    assert want[-1] == b"shared writable: mapped"
    assert out[-1] == f"shared writable: {errno.ENODEV}".encode()
    assert (lab.root / "mmap" / "f").read_bytes() == (lab.native / "mmap" / "f").read_bytes()
    assert b"write-only fd: 13" in res.stdout  # EACCES, as natively


def test_cp_and_install_inside_the_offloaded_tree_copy_at_the_delegate(lab, tmp_path):
    """Both fds offloaded: copy_file_range runs at the delegate, so ~9 MiB are copied
    while a few hundred bytes cross the wire; the trees match the native ones."""
    script = ("mkdir -p {P} && head -c 9437185 /dev/urandom > {P}/big.bin 2>/dev/null; "
              "cp {P}/big.bin {P}/copy.bin && cp -r {src} {P}/tree && cp -r {P}/tree {P}/tree2 && "
              "install -m 640 {P}/copy.bin {P}/installed.bin && cmp {P}/big.bin {P}/installed.bin "
              "&& echo same")  # fmt: skip
    native = subprocess.run(["sh", "-c", script.format(P=lab.native / "cfr", src=lab.src)],
                            capture_output=True, timeout=300)  # fmt: skip
    assert native.returncode == 0, native.stderr
    res = offload(lab, tmp_path / "run", ["sh", "-c", script.format(P=lab.prefix / "cfr",
                                                                    src=lab.src)])  # fmt: skip
    assert res.returncode == 0 and res.stdout == b"same\n", res.stderr.decode()
    root = lab.root / "cfr"
    assert (root / "copy.bin").read_bytes() == (root / "big.bin").read_bytes()

    def tree(top):
        return {k: v for k, v in snapshot(top).items() if "big" not in k and "copy" not in k
                and "installed" not in k}  # fmt: skip

    assert tree(root) == tree(lab.native / "cfr")
    assert snapshot(root / "tree2") == snapshot(root / "tree") == snapshot(lab.src)
    calls = rundir.load(tmp_path / "run").calls()
    cfr = calls[calls["nr"] == 326]  # copy_file_range
    assert len(cfr) >= 3 and int(cfr["ret"].clip(min=0).sum()) >= 2 * 9437185
    assert int(cfr["bytes_in"].sum() + cfr["bytes_out"].sum()) < 4096  # no data on the wire
    # from the local source tree into the offloaded one: EXDEV, and cp copies by read/write
    assert meta(tmp_path)["refused"]["copy_file_range"] == sum(
        1 for p in lab.src.rglob("*") if p.is_file() and p.stat().st_size
    )


@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_more_files_than_the_delegate_holds_fds_for(lab, tmp_path, fastpath):
    """1100 files opened and closed one after the other (the delegate holds at most 1024
    fds per client): the remote fd of each closed placeholder is closed before the next
    open, on the C path and on the Python path alike (the latter once ran out at 1024)."""
    script = (f"mkdir -p {lab.prefix}/many{fastpath} && cd {lab.prefix}/many{fastpath} && "
              "i=0; while [ $i -lt 1100 ]; do echo $i > f$i; i=$((i + 1)); done; "
              "cat f1099 f0")  # fmt: skip
    res = offload(lab, tmp_path / "run", ["sh", "-c", script],
                  env={**os.environ, "TESTBED_FASTPATH": fastpath})  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == b"1099\n0\n"
    assert len(list((lab.root / f"many{fastpath}").iterdir())) == 1100
    m = meta(tmp_path)
    assert m["remote_opens"] >= 1100 and m["remote_closes"] >= 1099
