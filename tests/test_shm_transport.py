"""The shared-memory transport (``shm://PATH``, testbed.core.shmring): rings, delegate, relay.

Unit tests drive the ring layout in one process (threads, a memfd, eventfds);
the rest run real processes: a real ``testbed delegate
--listen shm://...`` and ``testbed run`` of real programs compared byte for
byte with native runs, a delegate killed mid-run, and fake peers that hand
over or write malformed rings.  No timing is asserted: the bounds only keep a
broken build from hanging the suite.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from testbed.compute import fastpath
from testbed.core import rundir, shmring, wire, zmtp
from testbed.core.errors import TestbedError as TbError
from testbed.core.shmring import HEADER, Mapping, ShmError
from tests.conftest import tb_argv, wait_until

SMALL = 64 << 10
V = shmring.VERSION


def _pair(ring: int = SMALL) -> tuple[int, Mapping, Mapping]:
    fd = Mapping.create(ring)
    return fd, Mapping(fd, delegate=True), Mapping(fd, delegate=False)


# ---------------------------------------------------------------- the ring (unit)


@pytest.mark.unit
def test_messages_cross_in_order_through_many_wraparounds():
    fd, dlg, rel = _pair()
    try:
        rng = random.Random(7)
        sent: list[bytes] = []
        for i in range(3000):
            m = bytes([i & 0xFF]) * rng.randint(0, 9000)
            while not rel.tx.put(m):  # full: the consumer takes the oldest first
                assert dlg.rx.get() == sent.pop(0)
            sent.append(m)
        while sent:
            assert dlg.rx.get() == sent.pop(0)
        assert dlg.rx.get() is None
        assert rel.tx._mine > 100 * SMALL  # (it wrapped many times)
        # the other direction too, with a record header split across the end
        for n in (SMALL - 4 - 3, 10, SMALL // 2, 0, SMALL - 4):
            assert dlg.tx.put(b"r" * n)
            assert rel.rx.get() == b"r" * n
    finally:
        dlg.close()
        rel.close()
        os.close(fd)


@pytest.mark.unit
def test_a_full_ring_refuses_and_a_too_large_message_is_an_error():
    fd, dlg, rel = _pair()
    try:
        assert rel.tx.put(b"x" * (SMALL - 4))  # exactly fills it
        assert not rel.tx.put(b"")  # no room for even a header
        with pytest.raises(ShmError, match="does not fit"):
            rel.tx.put(b"x" * (SMALL - 3))
        assert dlg.rx.get() == b"x" * (SMALL - 4)
        assert rel.tx.put(b"")
        assert dlg.rx.get() == b""
    finally:
        dlg.close()
        rel.close()
        os.close(fd)


def _q(mm: Mapping) -> memoryview:
    return mm._q


@pytest.mark.unit
@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda q: q.__setitem__(8, 1 << 40), "out of range"),  # request head far ahead
        (lambda q: q.__setitem__(8, (1 << 64) - 8), "out of range"),  # head behind the tail
        (lambda q: q.__setitem__(8, 2), "less than a record header"),
    ],
)
def test_malformed_peer_indices_are_errors_never_reads_outside(corrupt, match):
    fd, dlg, rel = _pair()
    try:
        corrupt(_q(rel))  # the relay lies about the request ring's head
        with pytest.raises(ShmError, match=match):
            dlg.rx.get()
    finally:
        dlg.close()
        rel.close()
        os.close(fd)


@pytest.mark.unit
def test_a_malformed_record_length_and_a_lying_tail_are_errors():
    fd, dlg, rel = _pair()
    try:
        assert rel.tx.put(b"abcd")
        rel._buf[HEADER : HEADER + 4] = struct.pack("<I", 0xFFFFFFF0)  # the length lies
        with pytest.raises(ShmError, match="record of"):
            dlg.rx.get()
        _q(dlg)[24] = 1 << 50  # the delegate lies about the request ring's tail
        with pytest.raises(ShmError, match="out of range"):
            rel.tx.put(b"x")
    finally:
        dlg.close()
        rel.close()
        os.close(fd)


def _raw_memfd(size: int, head: bytes, seal: bool = True) -> int:
    fd = os.memfd_create("t", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    os.pwrite(fd, head, 0)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)  # fmt: skip
    return fd


@pytest.mark.unit
@pytest.mark.parametrize(
    "size, head, seal, match",
    [
        (HEADER + 2 * SMALL, struct.pack("<8sIIQ", b"NOTMAGIC", V, HEADER, SMALL), True, "magic"),
        (HEADER + 2 * SMALL, struct.pack("<8sIIQ", b"TBSHMRG1", 9, HEADER, SMALL), True, "version"),
        (HEADER + 2 * SMALL, struct.pack("<8sIIQ", b"TBSHMRG1", V, HEADER, 1 << 40), True, "size"),
        (HEADER + SMALL, struct.pack("<8sIIQ", b"TBSHMRG1", V, HEADER, SMALL), True, "file of"),
        (100, b"TBSHMRG1", True, "less than a header"),
        (HEADER + 2 * SMALL, struct.pack("<8sIIQ", b"TBSHMRG1", V, HEADER, SMALL), False, "sealed"),
    ],
)
def test_a_malformed_header_is_refused_with_a_clear_error(size, head, seal, match):
    fd = _raw_memfd(size, head, seal)
    try:
        with pytest.raises(ShmError, match=match):
            Mapping(fd, delegate=False)
    finally:
        os.close(fd)


@pytest.mark.unit
def test_a_fresh_ring_with_nonzero_indices_is_refused_and_the_file_cannot_shrink():
    fd = Mapping.create(SMALL)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(fd, HEADER)  # sealed: a peer cannot make the other side fault
        os.pwrite(fd, struct.pack("<Q", 12), 320)  # the reply ring's head
        with pytest.raises(ShmError, match="must be 0"):
            Mapping(fd, delegate=False)
    finally:
        os.close(fd)


@pytest.mark.unit
def test_two_threads_with_doorbells_echo_every_message():
    fd = Mapping.create(SMALL)
    bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    dlg = shmring.Channel(fd, bells[0], bells[1], delegate=True)
    rel = shmring.Channel(fd, os.dup(bells[0]), os.dup(bells[1]), delegate=False)
    os.close(fd)
    n = 2000
    stop = threading.Event()

    def echo():
        p = select.poll()
        p.register(dlg.rx_bell, select.POLLIN)
        while not stop.is_set():
            if dlg.arm():  # (a bell is rung only for a consumer that said it sleeps)
                p.poll(1000)
                dlg.disarm()
                dlg.drain()
            while (m := dlg.recv()) is not None:
                while not dlg.send(m[::-1]):
                    time.sleep(0.0001)

    t = threading.Thread(target=echo)
    t.start()
    try:
        p = select.poll()
        p.register(rel.rx_bell, select.POLLIN)
        for i in range(n):
            msg = str(i).encode() * (i % 50 + 1)
            assert rel.send(msg)
            deadline = time.monotonic() + 10
            while (got := rel.recv()) is None:
                assert time.monotonic() < deadline, "no echo"
                if rel.arm():
                    assert p.poll(5000), "a lost wake-up"
                    rel.disarm()
                    rel.drain()
            assert got == msg[::-1]
    finally:
        stop.set()
        t.join(10)
        dlg.close()
        rel.close()


@pytest.mark.unit
def test_transport_choice_and_endpoints():
    from testbed.core.keys import EndpointError, is_loopback, parse_endpoint  # lazy: pyzmq

    assert zmtp.transport("shm:///tmp/d.sock") == "shm"
    assert zmtp.transport("shm:///tmp/d.sock", curve_keys="/k") == "shm"  # (refused at connect)
    assert zmtp.transport("shm://") == "libzmq"
    assert parse_endpoint("shm:///tmp/d.sock") == "shm:///tmp/d.sock"
    assert is_loopback("shm:///tmp/d.sock")
    with pytest.raises(EndpointError):
        parse_endpoint("shm://")
    with pytest.raises(TbError, match="not a shm://PATH"):
        shmring.path_of("ipc:///x")


# ---------------------------------------------------------------- a real delegate


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="tbshm", dir="/tmp")  # (a Unix socket path is short)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def _start(endpoint: str, *extra: str) -> subprocess.Popen:
    from testbed.jobs.localdelegate import wait_ready  # lazy: relay imports (zmq)

    proc = subprocess.Popen(tb_argv("delegate", "--listen", endpoint, *extra),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_ready(proc, endpoint, timeout_s=60)
    except BaseException:
        proc.kill()
        _out, err = proc.communicate()
        raise AssertionError(
            f"the delegate did not start: {err.decode(errors='replace')}"
        ) from None
    return proc


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.terminate()
    try:
        _out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    return err.decode(errors="replace")


@pytest.fixture
def shm_delegate(sockdir):
    procs: list[subprocess.Popen] = []

    def start(*extra: str, name: str = "d.sock") -> str:
        endpoint = f"shm://{sockdir / name}"
        procs.append(_start(endpoint, *extra))
        return endpoint

    start.procs = procs
    yield start
    for p in procs:
        _stop(p)


SCRIPT = (
    "set -e; cd {D}; seq 1 3000 > a; cat a a > b; wc -c b; head -c 1000 b | tail -c 100; "
    "mkdir -p sub; cp b sub/c; ls sub; cat sub/c | sort -n | uniq | wc -l; "
    "printf 'x%.0s' $(seq 1 500) > sub/x; od -c sub/x | tail -n 2; rm sub/c; ls sub; echo done"
)


def _tree(top: Path) -> dict[str, bytes]:
    return {str(p.relative_to(top)): p.read_bytes() for p in sorted(top.rglob("*")) if p.is_file()}


def test_cost_mode_output_matches_native_and_run_json_says_shm(shm_delegate, tmp_path):
    endpoint = shm_delegate()
    native_dir, run_dir = tmp_path / "native", tmp_path / "relayed"
    native_dir.mkdir()
    run_dir.mkdir()
    native = subprocess.run(["sh", "-c", SCRIPT.format(D=native_dir)], capture_output=True,
                            timeout=60)  # fmt: skip
    assert native.returncode == 0, native.stderr
    res = subprocess.run(
        tb_argv("run", "--delegate", endpoint, "--forward", "getppid,read,write,openat,close",
                "--quiet", "-o", str(tmp_path / "run"), "--", "sh", "-c",
                SCRIPT.format(D=run_dir)),
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == native.stdout
    assert _tree(run_dir) == _tree(native_dir)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["transport"] == "shm" and meta["delegate"]["transport"] == "shm"
    assert meta["calls"]["count"] > 50 and meta["calls"]["faults"] == 0
    calls = rundir.load(tmp_path / "run").calls()
    assert (calls["d_recv"] > 0).all()  # every call answered by the delegate
    if not isinstance(fastpath.load(), str):  # the relay's C path speaks the rings
        hot = meta["hot_path"]
        assert hot["c"] is True and hot["why_python"] is None, hot
        assert 0 < hot["c_calls"] <= meta["calls"]["count"]


@pytest.mark.parametrize("busy", [False, True])
def test_c_path_serves_shm_calls_with_identical_output(shm_delegate, tmp_path, busy):
    """The C path and the Python path over the same rings: the same bytes out, every
    call answered, and the C path served most of them (sleeping or spinning)."""
    if isinstance(fastpath.load(), str):
        pytest.skip("the C path is unavailable here")
    endpoint = shm_delegate()
    prog = ("import os, sys\nfor i in range(3000):\n    os.getppid()\n"
            "    if i % 100 == 0:\n        os.write(1, b'line %d\\n' % i)\nprint('done')\n")  # fmt: skip
    outs = {}
    for path, env in (("c", {}), ("python", {fastpath.ENV: "0"})):
        res = subprocess.run(
            tb_argv("run", "--delegate", endpoint, "--forward", "getppid,write", "--quiet",
                    *(["--busy-poll"] if busy else []), "-o", str(tmp_path / path), "--",
                    sys.executable, "-c", prog),
            capture_output=True, timeout=120, env={**os.environ, **env},
        )  # fmt: skip
        assert res.returncode == 0, res.stderr.decode()
        outs[path] = res.stdout
        meta = json.loads((tmp_path / path / "run.json").read_text())
        calls = rundir.load(tmp_path / path).calls()
        assert meta["calls"]["count"] >= 3031 and (calls["d_recv"] > 0).all()
        assert meta["calls"]["faults"] == 0
        if path == "c":
            assert meta["hot_path"]["c_calls"] > meta["calls"]["count"] // 2, meta["hot_path"]
        else:
            assert meta["hot_path"]["c_calls"] == 0
    assert outs["c"] == outs["python"] and outs["c"].endswith(b"done\n")


def test_offload_mode_matches_native_byte_for_byte(shm_delegate, tmp_path):
    root, prefix, native_dir = tmp_path / "root", tmp_path / "mnt", tmp_path / "native"
    for d in (root, prefix, native_dir):
        d.mkdir()
    endpoint = shm_delegate("--offload-root", str(root))
    native = subprocess.run(["sh", "-c", SCRIPT.format(D=native_dir)], capture_output=True,
                            timeout=60)  # fmt: skip
    res = subprocess.run(
        tb_argv("run", "--delegate", endpoint, "--mode", "offload", "--offload-path",
                str(prefix), "--quiet", "-o", str(tmp_path / "run"), "--", "sh", "-c",
                SCRIPT.format(D=prefix)),
        capture_output=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == native.stdout
    assert _tree(root) == _tree(native_dir)
    assert os.listdir(prefix) == []
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["transport"] == "shm"
    assert meta["offload"]["eio"] == 0 and meta["offload"]["remote_calls"] > 10


WRITER = """
import errno, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
written = 0
try:
    while written < (1 << 36):
        written += os.write(fd, b"x" * 65536)
except OSError as e:
    print("write failed:", errno.errorcode[e.errno], file=sys.stderr)
    sys.exit(3)
"""


def test_delegate_killed_mid_run_offload_calls_fail_with_eio(shm_delegate, tmp_path):
    root, prefix = tmp_path / "root", tmp_path / "mnt"
    root.mkdir()
    prefix.mkdir()
    endpoint = shm_delegate("--offload-root", str(root))
    proc = shm_delegate.procs[-1]
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    run = subprocess.Popen(
        tb_argv("run", "--delegate", endpoint, "--mode", "offload", "--offload-path",
                str(prefix), "-o", str(tmp_path / "run"), "--", sys.executable, str(script),
                str(prefix / "big")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert wait_until(lambda: (root / "big").exists() and (root / "big").stat().st_size
                          > 4 << 20, 60, 0.01), "the offloaded write never got going"  # fmt: skip
        os.kill(proc.pid, signal.SIGKILL)
        _out, err = run.communicate(timeout=60)  # (a hang fails here)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 3, err.decode()
    assert b"write failed: EIO" in err and b"Traceback" not in err
    assert b"lost the delegate at shm://" in err
    assert b"no reply from the delegate within" not in err  # it is gone, not slow
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["offload"]["eio"] >= 1 and meta["offload"]["delegate_lost"]
    assert meta["complete"] is True


def test_delegate_killed_mid_run_cost_mode_program_finishes(shm_delegate, tmp_path):
    endpoint = shm_delegate()
    proc = shm_delegate.procs[-1]
    flag = tmp_path / "go"
    prog = (f"import os, time\nopen({str(flag)!r}, 'w').close()\n"
            "t = time.monotonic()\nn = 0\nwhile time.monotonic() - t < 3:\n"
            "    os.getppid(); n += 1\nprint('calls', n > 0)\n")  # fmt: skip
    run = subprocess.Popen(
        tb_argv("run", "--delegate", endpoint, "--forward", "getppid", "--quiet", "-o",
                str(tmp_path / "run"), "--", sys.executable, "-c", prog),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert wait_until(flag.exists, 60, 0.01)
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, err.decode()
    assert out == b"calls True\n" and b"Traceback" not in err
    assert b"no reply from the delegate within" not in err  # it is gone, not slow
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["transport"] == "shm" and meta["calls"]["count"] > 0


def _fake_delegate(path: str, memfd: int, n_fds: int = 3) -> threading.Thread:
    """A listener at ``path`` handing every connection ``memfd`` (and eventfds)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(8)
    srv.settimeout(0.2)
    bells = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    stop = threading.Event()

    def serve():
        conns = []
        try:
            while not stop.is_set():
                try:
                    c, _ = srv.accept()
                except TimeoutError:
                    continue
                socket.send_fds(c, [shmring.HELLO], [memfd, *bells][:n_fds])
                conns.append(c)
        finally:
            for c in conns:
                c.close()
            srv.close()
            for b in bells:
                os.close(b)

    t = threading.Thread(target=serve, daemon=True)
    t.stop = stop
    t.start()
    return t


@pytest.mark.parametrize("kind", ["magic", "unsealed", "fds"])
def test_relay_refuses_a_malformed_ring_from_a_fake_delegate(sockdir, tmp_path, kind):
    head = struct.pack("<8sIIQ", b"NOTMAGIC" if kind == "magic" else b"TBSHMRG1", V, HEADER,
                       SMALL)  # fmt: skip
    memfd = _raw_memfd(HEADER + 2 * SMALL, head, seal=kind != "unsealed")
    path = str(sockdir / "fake.sock")
    t = _fake_delegate(path, memfd, n_fds=1 if kind == "fds" else 3)
    try:
        res = subprocess.run(
            tb_argv("run", "--delegate", f"shm://{path}", "--forward", "getppid",
                    "--connect-timeout", "2", "-o", str(tmp_path / "run"), "--", "true"),
            capture_output=True, timeout=60,
        )  # fmt: skip
    finally:
        t.stop.set()
        t.join(5)
        os.close(memfd)
    err = res.stderr.decode()
    assert res.returncode != 0 and "Traceback" not in err
    want = {
        "magic": "malformed ring header",
        "unsealed": "not sealed",
        "fds": "malformed shm hello",
    }
    assert want[kind] in err, err


def _answering_fake_delegate(path: str, good: int, corrupt: str) -> threading.Thread:
    """A delegate at ``path`` speaking the rings (HELLO, STATS, CALL) that answers
    ``good`` calls, then corrupts its reply ring (``corrupt``: "head" far beyond the
    ring, or "length" a record longer than published) and rings the relay's bell."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(60)
    stop = threading.Event()

    def serve():
        conn = ch = None
        try:
            conn, _ = srv.accept()
            ch = shmring.offer(conn)
            calls = 0
            while not stop.is_set():
                body = ch.recv()
                if body is None:
                    if ch.arm():
                        select.select([ch.rx_bell, conn], [], [], 0.05)
                        ch.disarm()
                        ch.drain()
                    continue
                kind, msg = wire.decode(body)
                if kind == wire.HELLO:
                    ch.send(wire.encode_welcome({"transport": "shm"}))
                elif kind == wire.STATS:
                    ch.send(wire.encode_error("unsupported", "no stats here"))
                elif kind == wire.CALL and calls < good:
                    calls += 1
                    ch.send(wire.encode_result(wire.Result(msg.call_id, 0, 0, 1, 2, 2, 3, ())))
                elif kind == wire.CALL:
                    q = ch.map._q
                    if corrupt == "head":
                        q[320 // 8] = 1 << 60  # the reply ring's head, far beyond the ring
                    else:
                        pos = ch.tx._mine % ch.tx.size
                        ch.map._buf[HEADER + ch.map.size + pos : HEADER + ch.map.size + pos + 4] = (
                            struct.pack("<I", 1 << 20))  # fmt: skip
                        q[320 // 8] = ch.tx._mine + 8  # a 1 MiB record in 8 published bytes
                    os.eventfd_write(ch.tx_bell, 1)
                    stop.wait(30)
        finally:
            if ch is not None:
                ch.close()
            if conn is not None:
                conn.close()
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.stop = stop
    t.start()
    return t


@pytest.mark.parametrize("busy", [False, True])
@pytest.mark.parametrize("corrupt", ["head", "length"])
def test_relay_c_path_meets_a_reply_ring_corrupted_mid_run(sockdir, tmp_path, corrupt, busy):
    """The relay's C path waiting on a reply ring the peer corrupts: one clear error line,
    the connection dropped, the program finishes (cost mode: calls released locally);
    no crash, no hang, no read outside the mapping."""
    if isinstance(fastpath.load(), str):
        pytest.skip("the C path is unavailable here")
    path = str(sockdir / "bad.sock")
    t = _answering_fake_delegate(path, 200, corrupt)
    prog = "import os\nfor _ in range(400):\n    os.getppid()\nprint('finished')\n"
    try:
        res = subprocess.run(
            tb_argv("run", "--delegate", f"shm://{path}", "--forward", "getppid", "--quiet",
                    "--timeout", "2", *(["--busy-poll"] if busy else []),
                    "-o", str(tmp_path / "run"), "--", sys.executable, "-c", prog),
            capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        t.stop.set()
        t.join(10)
    err = res.stderr.decode()
    assert res.returncode == 0 and res.stdout == b"finished\n", err
    assert "Traceback" not in err and res.returncode >= 0
    errors = [ln for ln in err.splitlines() if ln.startswith("testbed: error:")]
    assert len(errors) == 1 and "shared-memory ring is malformed" in errors[0], err
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["hot_path"]["c_calls"] >= 150, meta["hot_path"]  # C served the good ones
    calls = rundir.load(tmp_path / "run").calls()
    assert len(calls) == 400 and int((calls["d_recv"] > 0).sum()) == 200


def test_delegate_drops_a_relay_that_corrupts_its_ring_and_serves_others(shm_delegate, sockdir):
    from testbed.compute.relay import connect  # lazy: zmq

    endpoint = shm_delegate()
    proc = shm_delegate.procs[-1]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(endpoint[len("shm://") :])
    s.settimeout(10)
    data, fds, _f, _a = socket.recv_fds(s, 64, 4)
    assert data == shmring.HELLO and len(fds) == 3
    mm = Mapping(fds[0], delegate=False)
    mm._q[8] = 1 << 60  # the request ring's head: far beyond the ring
    os.eventfd_write(fds[1], 1)
    assert s.recv(16) == b""  # the delegate closed the connection
    mm.close()
    for fd in fds:
        os.close(fd)
    s.close()
    _ctx, sock, welcome = connect(endpoint, timeout_s=10)  # and still serves a good client
    try:
        assert welcome["transport"] == "shm"
        sock.send(wire.encode_call_fields(1, 1, 110, (0,) * 6, (), "cost"))
        assert sock.poll(10_000)
        kind, result = wire.decode(sock.recv())
        assert kind == wire.RESULT and result.call_id == 1
    finally:
        sock.close()
    err = _stop(proc)
    assert "corrupted its shared-memory ring" in err


def test_libzmq_and_curve_cannot_serve_shm(sockdir, tmp_path):
    for extra, why in ((("--transport", "libzmq"), "libzmq has no shared-memory transport"),
                       (("--workers", "2"), "--workers > 1")):  # fmt: skip
        res = subprocess.run(tb_argv("delegate", "--listen", f"shm://{sockdir}/x.sock", *extra),
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert res.returncode != 0
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("testbed: error:") and why in lines[0]
