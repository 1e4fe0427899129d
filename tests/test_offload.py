"""Offload mode end to end: real programs on the compute node, file I/O executed by
the delegate in another network namespace (real TCP), compared byte for byte
with native runs of the same programs on a local directory.

The compute node's view of the offloaded tree is ``PREFIX`` (an empty local
directory standing for a mount point: it must stay empty); the delegate
executes beneath ``ROOT``.  Each test works in its own subdirectory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from testbed.cluster import netns
from testbed.core import rundir
from tests.conftest import tb_argv
from tests.test_two_node import _start_delegate

pytestmark = [pytest.mark.root, pytest.mark.netns]

ok, why = netns.available()
if not ok:
    pytest.skip(f"offload tests need network namespaces: {why}", allow_module_level=True)


@dataclass
class Lab:
    topo: netns.Topology
    endpoint: str
    proc: subprocess.Popen
    base: Path
    root: Path
    prefix: Path
    native: Path
    src: Path


def _make_tree(src: Path) -> None:
    """A deterministic source tree: sizes around page and buffer edges, a symlink."""
    rng = np.random.default_rng(10)
    (src / "sub" / "deep").mkdir(parents=True)
    for i, size in enumerate((0, 1, 4095, 4096, 65537, 300_000, 1_100_000)):
        (src / f"f{i}.bin").write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    (src / "sub" / "text.txt").write_text("".join(f"line {i}\n" for i in range(20000)))
    (src / "sub" / "deep" / "small").write_text("small\n")
    os.symlink("../f3.bin", src / "sub" / "link")
    os.chmod(src / "sub" / "deep", 0o750)
    for p in sorted(src.rglob("*"), reverse=True):
        os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    base = tmp_path_factory.mktemp("offload")
    root, prefix, native, src = (base / n for n in ("root", "mnt", "native", "src"))
    for d in (root, prefix, native):
        d.mkdir()
    _make_tree(src)
    subprocess.run(["tar", "cf", str(base / "src.tar"), "-C", str(base), "src"], check=True)
    with netns.Topology(["compute", "delegate"]) as topo:
        endpoint, proc = _start_delegate(topo, 5601, "--offload-root", str(root), "--insecure")
        yield Lab(topo, endpoint, proc, base, root, prefix, native, src)
        proc.terminate()
        proc.wait(10)
    assert os.listdir(prefix) == [], "something was written to the local mount point"


def offload(lab: Lab, out: Path, argv: list[str], endpoint: str | None = None,
            prefix: Path | None = None, extra: tuple[str, ...] = (), timeout: float = 300,
            **kwargs):  # fmt: skip
    cmd = tb_argv("run", "--delegate", endpoint or lab.endpoint, "--mode", "offload",
                  "--offload-path", str(prefix or lab.prefix), "--quiet", "-o", str(out),
                  *extra, "--", *argv)  # fmt: skip
    return lab.topo.run("compute", cmd, capture_output=True, timeout=timeout, **kwargs)


def both(lab: Lab, tmp_path: Path, name: str, script: str, **fmt: str):
    """Run ``sh -c script`` natively (P = a local dir) and offloaded (P = PREFIX/name)."""
    native = subprocess.run(
        ["sh", "-c", script.format(P=lab.native / name, **fmt)],
        capture_output=True, timeout=300,
    )  # fmt: skip
    assert native.returncode == 0, native.stderr.decode()
    res = offload(lab, tmp_path / "run", ["sh", "-c", script.format(P=lab.prefix / name, **fmt)])
    assert res.returncode == 0, res.stderr.decode()
    assert b"Traceback" not in res.stderr
    return native, res


def snapshot(top: Path) -> dict[str, tuple]:
    """Relative path -> (type, mode, size, content hash or link target) of a tree."""
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = ""
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            out[str(p.relative_to(top))] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                size,
                what,
            )
    return out


def assert_same_tree(lab: Lab, name: str) -> None:
    remote, native = snapshot(lab.root / name), snapshot(lab.native / name)
    assert remote, "nothing was written at the delegate"
    assert remote == native


def calls_by_name(run: Path) -> dict[str, int]:
    return {r["name"]: int(r["n"]) for r in rundir.load(run).syscalls}


# ---------------------------------------------------------------- real programs


def test_tar_extract_then_archive_is_byte_identical(lab, tmp_path):
    script = "mkdir -p {P} && tar xf {tar} -C {P} && tar cf - --sort=name -C {P} src"
    native, res = both(lab, tmp_path, "tar", script, tar=str(lab.base / "src.tar"))
    assert res.stdout == native.stdout and len(res.stdout) > 1_500_000
    assert_same_tree(lab, "tar")
    counts = calls_by_name(tmp_path / "run")
    assert counts["write"] > 0 and counts["read"] > 0
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["mode"] == "offload" and meta["offload"]["eio"] == 0
    calls = rundir.load(tmp_path / "run").calls()
    writes = calls[calls["nr"] == 1]
    assert int(writes["bytes_in"].sum()) > 1_500_000  # the data crossed the wire
    reads = calls[calls["nr"] == 0]
    assert int(reads["bytes_out"].sum()) > 1_500_000
    assert (calls["d_exec_end"] >= calls["d_exec_start"]).all()


def test_gzip_gunzip_between_local_and_offloaded_files(lab, tmp_path, payload):
    script = "mkdir -p {P} && gzip -c {src} > {P}/p.gz && gunzip -c {P}/p.gz"
    native, res = both(lab, tmp_path, "gzip", script, src=str(payload))
    assert res.stdout == native.stdout == payload.read_bytes()
    assert_same_tree(lab, "gzip")


def test_sqlite3_with_record_locks(lab, tmp_path):
    sql = ("create table t(k integer primary key, v text); "
           "insert into t(v) select hex(randomblob(64)) from generate_series(1, 2000); "
           "create index iv on t(v);")  # fmt: skip
    writers = " ".join(
        f"sqlite3 -cmd '.timeout 20000' {{P}}/db "
        f"\"begin immediate; insert into t(v) values ('w{i}'); commit;\" &"
        for i in range(6)
    )
    script = (f"mkdir -p {{P}} && sqlite3 {{P}}/db \"{sql}\" && {{{{ {writers} wait; }}}} && "
              "sqlite3 {P}/db \"select count(*), count(distinct v) from t; "
              "select v from t where v like 'w%' order by v; pragma integrity_check;\"")  # fmt: skip
    native, res = both(lab, tmp_path, "sqlite", script)
    assert res.stdout == native.stdout
    assert res.stdout.splitlines()[0] == b"2006|2006"
    assert res.stdout.splitlines()[-1] == b"ok"
    counts = calls_by_name(tmp_path / "run")
    assert counts.get("fcntl", 0) > 10  # the record locks went to the delegate
    assert sorted(os.listdir(lab.root / "sqlite")) == ["db"]


def test_cp_r_find_du_and_chdir(lab, tmp_path):
    back = tmp_path / "back"
    script = ("mkdir -p {P} && cp -r {src} {P}/copy && cd {P} && find . | sort && "
              "du -ab copy | sort -k2 && ls -ln --time-style=+ copy/sub | tail -n +2 && "
              "cp -r copy {back}")  # fmt: skip
    native = subprocess.run(
        ["sh", "-c", script.format(P=lab.native / "cp", src=lab.src, back=tmp_path / "native-back")],
        capture_output=True, timeout=300, check=True,
    )  # fmt: skip
    res = offload(
        lab,
        tmp_path / "run",
        ["sh", "-c", script.format(P=lab.prefix / "cp", src=lab.src, back=back)],
    )
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == native.stdout
    assert_same_tree(lab, "cp")
    assert snapshot(back) == snapshot(tmp_path / "native-back") == snapshot(lab.src) | {}
    assert calls_by_name(tmp_path / "run")["getdents64"] > 0


THREADS = textwrap.dedent(
    """
    import fcntl, os, sys, threading
    top = sys.argv[1]
    threading.excepthook = lambda a: (print("THREAD FAILED", a.exc_value, flush=True), os._exit(1))
    os.makedirs(top, exist_ok=True)
    def work(i):
        d = os.path.join(top, f"t{i}")
        os.mkdir(d)
        fd = os.open(os.path.join(d, "data"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for k in range(200):
            os.write(fd, (f"thread {i} line {k} " * 7 + "\\n").encode())
        keep = os.open(os.path.join(d, "inherited"), os.O_WRONLY | os.O_CREAT, 0o600)
        gone = os.open(os.path.join(d, "cloexec"), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(keep, 100 + i)
        pid = os.fork()
        if pid == 0:
            with open(os.path.join(d, "child"), "w") as f:
                f.write(f"child of {i}\\n" * 100)
            os.write(fd, b"child appended\\n")  # the shared description: same offset
            code = (f"import os, fcntl\\n"
                    f"os.write({100 + i}, b'after exec {i}\\\\n')\\n"
                    f"try:\\n    fcntl.fcntl({gone}, fcntl.F_GETFD)\\n    print('LEAKED')\\n"
                    f"except OSError:\\n    pass\\n")
            os.execv(sys.executable, [sys.executable, "-c", code])
        os.waitpid(pid, 0)
        os.write(fd, b"parent after child\\n")
        os.close(fd)
        os.close(keep)
        os.close(100 + i)
        os.close(gone)
        os.rename(os.path.join(d, "child"), os.path.join(d, "child.txt"))
        os.unlink(os.path.join(d, "cloexec"))
    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts: t.start()
    for t in ts: t.join()
    for i in range(4):
        with open(os.path.join(top, f"t{i}", "data"), "rb") as f:
            sys.stdout.write(f"{i} {len(f.read())}\\n")
    """
)


def test_python_threads_and_forks(lab, tmp_path):
    script = tmp_path / "threads.py"
    script.write_text(THREADS)
    native, res = both(lab, tmp_path, "py", f"{sys.executable} {script} {{P}}")
    assert res.stdout == native.stdout and b"LEAKED" not in res.stdout + res.stderr
    assert_same_tree(lab, "py")
    assert (lab.root / "py" / "t2" / "inherited").read_bytes() == b"after exec 2\n"


# ---------------------------------------------------------------- confinement

ESCAPES = textwrap.dedent(
    """
    import errno, os, sys
    P, base = sys.argv[1], sys.argv[2]
    def attempt(label, fn):
        try:
            fn()
            print(label, "OK")
        except OSError as e:
            print(label, errno.errorcode[e.errno])
    W = os.O_WRONLY | os.O_CREAT
    attempt("abs-read", lambda: os.open(P + "/abs/secret", os.O_RDONLY))
    attempt("abs-write", lambda: os.open(P + "/abs/new", W, 0o644))
    attempt("rel-read", lambda: os.open(P + "/rel/secret", os.O_RDONLY))
    attempt("rel-write", lambda: os.open(P + "/rel/new", W, 0o644))
    attempt("proc-root", lambda: os.open(P + "/proc/secret", os.O_RDONLY))
    attempt("final-link", lambda: os.open(P + "/link_to_secret", W | os.O_TRUNC, 0o644))
    d = os.open(P, os.O_RDONLY | os.O_DIRECTORY)
    attempt("dirfd-dotdot", lambda: os.open("../../outside/new", W, 0o644, dir_fd=d))
    attempt("dirfd-dotdot-read", lambda: os.open("../../outside/secret", os.O_RDONLY, dir_fd=d))
    early = os.open(base, os.O_RDONLY | os.O_DIRECTORY)  # opened before the prefix
    attempt("early-dirfd", lambda: os.open("mnt/esc/abs/secret", os.O_RDONLY, dir_fd=early))
    attempt("hardlink", lambda: os.link(P + "/link_to_secret", "stolen", dst_dir_fd=d,
                                        follow_symlinks=True))  # linkat(AT_SYMLINK_FOLLOW)
    attempt("rename-out", lambda: os.rename(P + "/inside", P + "/abs/moved"))
    attempt("mkdir-out", lambda: os.mkdir(P + "/rel/newdir"))
    attempt("symlink-then-use", lambda: (os.symlink(base + "/outside", P + "/mine"),
                                         os.open(P + "/mine/secret", os.O_RDONLY)))
    attempt("inside", lambda: os.open(P + "/inside", os.O_RDONLY))
    """
)


def test_escapes_fail_and_nothing_outside_the_root_is_touched(lab, tmp_path):
    outside = lab.base / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret").write_bytes(b"secret")
    esc = lab.root / "esc"
    esc.mkdir()
    os.symlink(str(outside), esc / "abs")
    os.symlink("../../outside", esc / "rel")
    os.symlink(f"/proc/self/root{outside}", esc / "proc")
    os.symlink("abs/secret", esc / "link_to_secret")
    (esc / "inside").write_bytes(b"in")
    before_out = snapshot(outside)
    before_base = sorted(os.listdir(lab.base))
    script = tmp_path / "esc.py"
    script.write_text(ESCAPES)
    res = offload(
        lab, tmp_path / "run", [sys.executable, str(script), str(lab.prefix / "esc"), str(lab.base)]
    )
    assert res.returncode == 0, res.stderr.decode()
    got = dict(line.split() for line in res.stdout.decode().splitlines())
    assert got.pop("inside") == "OK"
    assert got.pop("symlink-then-use") == "EXDEV"  # creating the link is allowed, using it is not
    for label, outcome in got.items():
        assert outcome in ("EXDEV", "ELOOP"), (label, outcome)
    assert snapshot(outside) == before_out
    assert sorted(os.listdir(lab.base)) == before_base
    assert not os.path.lexists(esc / "stolen") and (esc / "inside").exists()


# ---------------------------------------------------------------- lifetimes and faults


def _delegate_fds_into(pid: int, root: Path) -> int:
    n = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        n += target.startswith(str(root) + "/")
    return n


def test_exit_with_open_remote_fds_leaves_none_at_the_delegate(lab, tmp_path):
    code = ("import os, sys\n"
            "os.makedirs(sys.argv[1], exist_ok=True)\n"
            "fds = [os.open(f'{sys.argv[1]}/f{i}', os.O_WRONLY | os.O_CREAT, 0o644) for i in range(40)]\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    os.write(fds[0], b'child')\n    os._exit(0)\n"
            "os.waitpid(pid, 0)\nprint(len(os.listdir(sys.argv[1])))\n")  # fmt: skip
    assert "delegate" in Path(f"/proc/{lab.proc.pid}/cmdline").read_text()
    res = offload(lab, tmp_path / "run", [sys.executable, "-c", code, str(lab.prefix / "fds")])
    assert res.returncode == 0 and res.stdout == b"40\n", res.stderr.decode()
    deadline = time.monotonic() + 5
    while _delegate_fds_into(lab.proc.pid, lab.root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _delegate_fds_into(lab.proc.pid, lab.root) == 0
    assert (lab.root / "fds" / "f0").read_bytes() == b"child"


HOLDER = textwrap.dedent(
    """
    import os, sys, time
    os.makedirs(sys.argv[1], exist_ok=True)
    fds = [os.open(f"{sys.argv[1]}/h{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(12)]
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_relay_sigkilled_leaves_no_remote_fds_after_the_idle_timeout(lab, tmp_path):
    # A relay killed without BYE cannot tell the delegate; ZeroMQ's ROUTER does
    # not report the peer's disconnect here.  The delegate's idle reaper closes
    # its fds within --offload-idle-timeout plus one reaper period, with no other
    # client calling (nothing else wakes the delegate).
    root = tmp_path / "root3"
    root.mkdir()
    endpoint, proc = _start_delegate(lab.topo, 5603, "--offload-root", str(root), "--insecure",
                                     "--offload-idle-timeout", "4")  # fmt: skip
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    prefix = lab.prefix / "held"
    run = lab.topo.popen("compute", tb_argv(
        "run", "--delegate", endpoint, "--mode", "offload", "--offload-path", str(lab.prefix),
        "--quiet", "-o", str(tmp_path / "run"), "--", sys.executable, str(script), str(prefix),
    ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert run.stdout.readline() == b"ready\n"
        assert "testbed" in Path(f"/proc/{run.pid}/cmdline").read_text()  # the relay itself
        open_at_ready = _delegate_fds_into(proc.pid, root)
        os.kill(run.pid, signal.SIGKILL)  # the relay: no BYE is ever sent
        t_kill = time.monotonic()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)  # and the program it traced
        run.communicate(timeout=30)
    assert open_at_ready == 12
    deadline = t_kill + 60
    while _delegate_fds_into(proc.pid, root) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _delegate_fds_into(proc.pid, root) == 0, "the killed relay's fds stayed open"
    assert sorted(os.listdir(root / "held")) == sorted(f"h{i}" for i in range(12))
    # the delegate lives on and serves the next client
    res = offload(lab, tmp_path / "run2", ["sh", "-c", f"echo after > {prefix}/after"],
                  endpoint=endpoint)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    assert (root / "held" / "after").read_bytes() == b"after\n"
    proc.terminate()
    assert proc.wait(10) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--offload-idle-timeout", "0"), "must be > 0"),
        (("--offload-idle-timeout", "nan"), "finite"),
    ],
)
def test_idle_timeout_bad_values_are_one_line_errors(tmp_path, extra, message):
    argv = tb_argv("delegate", "--listen", "tcp://127.0.0.1:*", "--offload-root", str(tmp_path),
                   *extra)  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert message in res.stderr.strip().splitlines()[-1]


def test_idle_timeout_without_offload_root_is_refused():
    argv = tb_argv("delegate", "--listen", "tcp://127.0.0.1:*", "--offload-idle-timeout", "5")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        "testbed: error: --offload-idle-timeout is only used with --offload-root"
    ]


WRITER = textwrap.dedent(
    """
    import errno, os, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    chunk = b"x" * (1 << 20)
    written = 0
    try:
        for _ in range(4000):
            written += os.write(fd, chunk)
        print("finished without error", written)
        sys.exit(0)
    except OSError as e:
        print("write failed:", errno.errorcode[e.errno], "after", written, file=sys.stderr)
        sys.exit(3)
    """
)


def test_delegate_killed_mid_write_fails_loudly_with_eio(lab, tmp_path):
    root = tmp_path / "root2"
    root.mkdir()
    endpoint, proc = _start_delegate(lab.topo, 5602, "--offload-root", str(root), "--insecure")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    argv = tb_argv("run", "--delegate", endpoint, "--mode", "offload", "--offload-path",
                   str(lab.prefix), "--timeout", "1", "-o", str(tmp_path / "run"), "--",
                   sys.executable, str(script), str(lab.prefix / "big"))  # fmt: skip
    run = lab.topo.popen("compute", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (root / "big").exists() and (root / "big").stat().st_size > 8 << 20:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("the offloaded write never got going")
    os.kill(proc.pid, signal.SIGKILL)
    out, err = run.communicate(timeout=60)
    proc.wait(10)
    assert run.returncode == 3, err.decode()
    assert b"write failed: EIO" in err
    assert b"Traceback" not in err
    assert b"finished without error" not in out
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["offload"]["eio"] >= 1 and meta["offload"]["delegate_lost"]
    assert meta["calls"]["timeouts"] >= 1
    calls = rundir.load(tmp_path / "run").calls()
    assert calls.size == meta["calls"]["count"] > 8
    failed = calls[calls["flags"] & rundir.F_FAULT_MASK != 0]
    assert failed.size >= 1 and (failed["ret"] == -5).all()
    assert (tmp_path / "run" / rundir.SYSCALLS_CSV).exists()
    # every write the program saw succeed is on disk at the delegate; beyond
    # that, at most the writes that failed with EIO (sent, executed, but the
    # delegate died before its reply reached the relay: unconfirmed, not lost)
    writes = calls[calls["nr"] == 1]
    ok_bytes = int(writes[writes["ret"] > 0]["ret"].sum())
    unconfirmed = int(writes[writes["ret"] == -5]["bytes_in"].astype(np.int64).sum())
    size = (root / "big").stat().st_size
    assert ok_bytes <= size <= ok_bytes + unconfirmed, (size, ok_bytes, unconfirmed)


REFUSALS = textwrap.dedent(
    """
    import ctypes, errno, fcntl, mmap, os, sys, termios
    P = sys.argv[1]
    os.makedirs(P, exist_ok=True)
    def attempt(label, fn):
        try:
            fn()
            print(label, "OK")
        except OSError as e:
            print(label, errno.errorcode[e.errno])
    fd = os.open(P + "/data", os.O_RDWR | os.O_CREAT, 0o644)
    os.write(fd, b"z" * 8192)
    local = os.open(sys.argv[2], os.O_RDWR | os.O_CREAT, 0o644)
    attempt("mmap", lambda: mmap.mmap(fd, 4096))
    class Iov(ctypes.Structure):
        _fields_ = [("base", ctypes.c_char_p), ("len", ctypes.c_size_t)]
    libc = ctypes.CDLL(None, use_errno=True)
    rc = libc.vmsplice(fd, ctypes.byref(Iov(b"local?", 6)), 1, 0)  # refused like any non-pipe fd
    print("vmsplice", errno.errorcode[ctypes.get_errno()] if rc < 0 else "OK")
    attempt("sendfile", lambda: os.sendfile(local, fd, 0, 100))
    attempt("copy_file_range", lambda: os.copy_file_range(fd, local, 100, 0, 0))
    attempt("ioctl", lambda: fcntl.ioctl(fd, termios.TCGETS, bytes(64)))
    params = ctypes.create_string_buffer(120)
    rc = libc.syscall(425, 8, params)
    print("io_uring_setup", errno.errorcode[ctypes.get_errno()] if rc < 0 else "OK")
    print("isatty", os.isatty(fd))
    d = os.open(P, os.O_RDONLY | os.O_DIRECTORY)
    os.mkdir(P + "/sub")
    os.chdir(P + "/sub")
    print("cwd-after-chdir", os.getcwd() == P + "/sub")
    os.fchdir(d)
    print("cwd-after-fchdir", os.getcwd() == P)
    print("relative-read", open("data", "rb").read(3))
    d2 = os.dup(fd)
    d3 = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 200)
    os.dup2(fd, 300, inheritable=False)  # dup3
    os.lseek(fd, 0, os.SEEK_SET)
    got = os.read(d2, 2) + os.read(d3, 2) + os.read(300, 2)
    print("dups-share-the-offset", got == b"zzzzzz" and os.lseek(fd, 0, os.SEEK_CUR) == 6)
    for x in (d2, d3, 300):
        os.close(x)
    many = [os.open(P + f"/m{i}", os.O_WRONLY | os.O_CREAT, 0o644) for i in range(20)]
    os.closerange(min(many), max(many) + 1)
    os.dup2(local, fd)  # dup2 over a placeholder drops the remote fd
    import time; time.sleep(0.3)
    print("done", "yes")
    """
)


def test_unsupported_calls_get_fallback_errnos_and_fd_ops_behave(lab, tmp_path):
    script = tmp_path / "ref.py"
    script.write_text(REFUSALS)
    res = offload(lab, tmp_path / "run",
                  [sys.executable, str(script), str(lab.prefix / "ref"), str(tmp_path / "local")])  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    got = dict(line.split(" ", 1) for line in res.stdout.decode().splitlines())
    assert got == {
        "mmap": "ENODEV", "sendfile": "EINVAL", "copy_file_range": "EXDEV", "ioctl": "ENOTTY",
        "io_uring_setup": "ENOSYS", "isatty": "False", "cwd-after-chdir": "True",
        "cwd-after-fchdir": "True", "relative-read": "b'zzz'", "done": "yes",
        "dups-share-the-offset": "True", "vmsplice": "EBADF",
    }  # fmt: skip
    meta = json.loads((tmp_path / "run" / "run.json").read_text())["offload"]
    for name in ("mmap", "sendfile", "copy_file_range", "ioctl", "io_uring_setup", "vmsplice"):
        assert meta["refused"].get(name, 0) >= 1, name
    # close_range over 20 placeholders and dup2 over one: the relay closed them remotely
    assert meta["remote_closes"] >= 21
    assert (tmp_path / "local").read_bytes() == b""  # nothing leaked into the local file


# ---------------------------------------------------------------- delegate options


@pytest.mark.parametrize(
    "listen, extra, ok",
    [
        ("tcp://10.231.0.2:5603", (), False),
        ("tcp://0.0.0.0:5603", (), False),
        ("tcp://*:5603", (), False),
        ("tcp://127.0.0.1:*", (), True),
        ("ipc://{tmp}/offload.sock", (), True),
    ],
)
def test_offload_beyond_loopback_needs_curve_or_insecure(tmp_path, listen, extra, ok):
    listen = listen.format(tmp=tmp_path)  # an IPC path of this test's own
    argv = tb_argv("delegate", "--listen", listen, "--offload-root", str(tmp_path),
                   "--max-calls", "1", *extra)  # fmt: skip
    if ok:
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        try:
            # serving: its status line says so (waited for, however loaded the machine)
            ready, _, _ = select.select([proc.stderr], [], [], 60)
            line = proc.stderr.readline() if ready else ""
            assert "listening on" in line, line
            assert proc.poll() is None
        finally:
            proc.terminate()
        assert proc.wait(10) == 0
        return
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: error: offload mode listening on")
    assert "--curve-keys" in lines[0] and "--insecure" in lines[0]


def test_offload_with_curve_and_an_unprivileged_user(lab, tmp_path, payload):
    try:
        from testbed.core.keys import make_curve_keys  # the keys module, once merged
    except ImportError:
        from testbed.delegate.daemon import make_curve_keys

    keys = tmp_path / "keys"
    make_curve_keys(str(keys))
    root = tmp_path / "root3"
    root.mkdir()
    os.chown(root, 65534, 65534)
    endpoint = f"tcp://{lab.topo.addr('delegate')}:5604"
    proc = lab.topo.popen("delegate", tb_argv("delegate", "--listen", endpoint, "--quiet",
                                              "--offload-root", str(root), "--curve-keys", str(keys),
                                              "--offload-user", "nobody"))  # fmt: skip
    try:
        script = "mkdir -p {P} && gzip -c {src} > {P}/p.gz && gunzip -c {P}/p.gz"
        argv = ["sh", "-c", script.format(P=lab.prefix / "curve", src=payload)]
        res = None
        for _ in range(20):  # the delegate may still be starting
            res = offload(lab, tmp_path / "run", argv, endpoint=endpoint,
                          extra=("--curve-keys", str(keys), "--connect-timeout", "1"))  # fmt: skip
            if res.returncode == 0 or b"no delegate answering" not in res.stderr:
                break
        assert res.returncode == 0, res.stderr.decode()
        assert res.stdout == payload.read_bytes()
        made = root / "curve" / "p.gz"
        assert made.stat().st_uid == 65534  # created by the dropped user
        meta = json.loads((tmp_path / "run" / "run.json").read_text())
        assert meta["curve"] and meta["delegate"]["curve"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_offload_run_against_a_cost_only_delegate_is_one_clear_error(lab, tmp_path):
    endpoint, proc = _start_delegate(lab.topo, 5605)
    try:
        res = offload(lab, tmp_path / "run", ["true"], endpoint=endpoint)
    finally:
        proc.terminate()
        proc.wait(10)
    assert res.returncode != 0
    lines = res.stderr.decode().strip().splitlines()
    assert lines == [f"testbed: error: the delegate at {endpoint} does not offload "
                     "(start it with --offload-root DIR)"]  # fmt: skip
