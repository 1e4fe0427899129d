"""CURVE keys (testbed.core.keys, ``testbed keys new``) and the delegate's privilege drop.

Modes on disk (even under umask 000), refusal of readable secrets with one
line, and the real thing: keys made by the command, a delegate in one network
namespace serving as ``nobody`` with CURVE, ``testbed run`` in another
namespace forwarding a real program through it, and relays with no keys or
the wrong keys refused.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import time
from pathlib import Path

import pytest

from testbed.cluster import netns
from testbed.core import keys, rundir
from tests.conftest import run_testbed, tb_argv


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _new(directory: Path, *relays: str, umask: int = 0o022) -> subprocess.CompletedProcess:
    argv = tb_argv("keys", "new", str(directory), *(f"--relay={r}" for r in relays))
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(umask)
    )


# ---------------------------------------------------------------- files


def test_keys_new_creates_private_files_even_under_umask_000(tmp_path):
    d = tmp_path / "keys"
    res = _new(d, "node1", "node2", umask=0)
    assert res.returncode == 0, res.stderr
    secrets = sorted(p for p in d.rglob("*") if p.name.endswith(".key_secret"))
    assert [str(p.relative_to(d)) for p in secrets] == [
        "relays/node1/client.key_secret",
        "relays/node2/client.key_secret",
        "server.key_secret",
    ]
    for p in secrets:
        assert _mode(p) == 0o600, p
    for p in [d, d / "authorized", d / "relays", d / "relays" / "node1", d / "relays" / "node2"]:
        assert _mode(p) == 0o700, p
    assert sorted(p.name for p in (d / "authorized").iterdir()) == ["node1.key", "node2.key"]
    # each relay directory is complete: the delegate's public key and its own pair
    server = keys.load_public(d / "server.key")
    for node in ("node1", "node2"):
        r = d / "relays" / node
        assert keys.load_public(r / "server.key") == server
        pub, sec = keys.load_secret(r / "client.key_secret")
        assert keys.load_public(d / "authorized" / f"{node}.key") == pub and len(sec) == 40
    assert len({keys.load_secret(p)[1] for p in secrets}) == 3  # three distinct secrets


def test_keys_new_is_idempotent_and_adds_relays_without_touching_keys(tmp_path):
    d = tmp_path / "keys"
    assert _new(d, "node1").returncode == 0
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    again = _new(d, "node1")
    assert again.returncode == 0 and again.stdout.strip().endswith(
        "every key exists, nothing to do"
    )
    more = _new(d, "node1", "node3")
    assert more.returncode == 0 and "relays/node3/client.key_secret" in more.stdout
    for p, data in before.items():
        assert p.read_bytes() == data, f"{p} was rewritten"
    assert (d / "authorized" / "node3.key").exists()


def test_keys_new_tightens_an_existing_open_directory(tmp_path):
    d = tmp_path / "keys"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    res = _new(d)
    assert res.returncode == 0 and f"tightened {d}/ to 0700" in res.stdout
    assert _mode(d) == 0o700 and _mode(d / "client.key_secret") == 0o600


@pytest.mark.parametrize("name", ["../up", "server", ".hidden", "a b"])
def test_bad_relay_names_are_one_line_errors(tmp_path, name):
    res = _new(tmp_path / "keys", name)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"testbed: error: relay name {name!r}: use letters, digits, '_', '.', '-' (not 'server')"
    ]
    assert not (tmp_path / "keys").exists()


def test_bad_directories_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path)
    for target, message in (
        (tmp_path / "file", f"{tmp_path}/file exists and is not a directory"),
        (tmp_path / "link", f"{tmp_path}/link is a symbolic link"),
        (
            Path("/proc/testbed-keys"),
            "keys directory /proc/testbed-keys: No such file or directory",
        ),
    ):
        res = _new(target)
        assert res.returncode == 2
        [line] = res.stderr.strip().splitlines()
        assert line.startswith("testbed: error: ") and message in line, line
    deep = tmp_path / "a" / "b" / "keys"  # missing parents are created
    assert _new(deep).returncode == 0 and _mode(deep) == 0o700


def test_readable_secrets_are_refused_with_one_line(tmp_path):
    d = tmp_path / "keys"
    keys.generate(d)
    os.chmod(d / "server.key_secret", 0o644)
    res = run_testbed(
        "delegate", "--listen", "tcp://127.0.0.1:*", "--curve-keys", str(d), text=True
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"testbed: error: CURVE secret key {d}/server.key_secret is accessible by group or "
        f"others (mode 0644); refusing it: chmod 600 {d}/server.key_secret (and make a new key "
        "if others may have read it)"
    ]
    os.chmod(d / "server.key_secret", 0o600)
    os.chmod(d / "client.key_secret", 0o640)
    res = run_testbed("run", "--delegate", "tcp://127.0.0.1:9", "--curve-keys", str(d),
                      "--forward", "write", "-o", str(tmp_path / "run"), "--", "true", text=True)  # fmt: skip
    assert res.returncode == 2
    [line] = res.stderr.strip().splitlines()
    assert line.startswith(f"testbed: error: CURVE secret key {d}/client.key_secret is accessible")
    assert "(mode 0640)" in line and not (tmp_path / "run").exists()
    # an authorized/ that others may write to lets anyone in: refused too
    os.chmod(d / "client.key_secret", 0o600)
    os.chmod(d / "authorized", 0o777)
    with pytest.raises(keys.KeyFileError, match="may be written by group or others"):
        keys.setup_server(None, None, d)  # checked before any socket is touched


@pytest.mark.unit
def test_exposure_warning_only_beyond_loopback():
    assert keys.is_loopback("tcp://127.0.0.1:5555") and keys.is_loopback("tcp://[::1]:5")
    assert keys.is_loopback("ipc:///tmp/x") and keys.is_loopback("tcp://localhost:1")
    assert not keys.is_loopback("tcp://0.0.0.0:5555") and not keys.is_loopback("tcp://*:5555")
    assert not keys.is_loopback("tcp://10.0.0.2:5555")
    assert keys.exposure_warning("tcp://127.0.0.1:5555", None) is None
    assert keys.exposure_warning("tcp://0.0.0.0:5555", "keys") is None
    assert "without authentication" in keys.exposure_warning("tcp://0.0.0.0:5555", None)


def test_user_option_errors_are_one_line():
    for user, why in (("root", "must be an unprivileged user, not root"),
                      ("no-such-user-tb", "no such user")):  # fmt: skip
        res = run_testbed("delegate", "--listen", "tcp://127.0.0.1:*", "--user", user, text=True)
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [f"testbed: error: --user {user}: {why}"]


# ---------------------------------------------------------------- two nodes

ok, why = netns.available()
needs_netns = pytest.mark.skipif(not ok, reason=f"needs network namespaces: {why}")


def _creds(pid: int) -> list[tuple[str, str, str]]:
    """(Uid, Gid, CapEff) lines of every thread of ``pid``."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = dict(
            line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line
        )
        out.append((fields["Uid"].split(), fields["Gid"].split(), fields["CapEff"].strip()))
    return out


def _wait_listening(topo, endpoint: str, relay_keys: Path, proc) -> None:
    probe = ("from testbed.compute.relay import connect; "
             f"connect({endpoint!r}, timeout_s=1.0, curve_keys={str(relay_keys)!r})[1].close()")  # fmt: skip
    for _ in range(40):
        if topo.run("compute", tb_argv()[:1] + ["-c", probe], capture_output=True).returncode == 0:
            return
        if proc.poll() is not None:
            raise AssertionError(f"delegate exited: {proc.stderr.read()}")
        time.sleep(0.25)
    raise AssertionError("the CURVE delegate never answered its own relay key")


@pytest.mark.root
@pytest.mark.netns
@needs_netns
def test_curve_round_trip_across_namespaces_as_nobody(tmp_path, payload):
    d = tmp_path / "keys"
    assert _new(d, "compute").returncode == 0
    other = tmp_path / "other"  # keys of another cluster: wrong client and wrong server key
    assert _new(other, "compute").returncode == 0
    nobody = pwd.getpwnam("nobody")
    with netns.Topology(["compute", "delegate"]) as topo:
        endpoint = f"tcp://{topo.addr('delegate')}:5555"
        proc = topo.popen(
            "delegate",
            tb_argv("delegate", "--listen", endpoint, "--curve-keys", str(d), "--user", "nobody"),
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        relay_keys = d / "relays" / "compute"
        _wait_listening(topo, endpoint, relay_keys, proc)
        # every thread of the delegate (Python's and libzmq's) serves as nobody, without capabilities
        creds = _creds(proc.pid)
        assert len(creds) >= 3, creds  # main, serving thread, libzmq I/O and ZAP threads
        for uid, gid, cap in creds:
            assert uid == [str(nobody.pw_uid)] * 4 and gid == [str(nobody.pw_gid)] * 4
            assert int(cap, 16) == 0

        program = ["gzip", "-6", "-c", str(payload)]
        native = subprocess.run(program, capture_output=True, check=True).stdout
        out = tmp_path / "out.gz"
        argv = tb_argv("run", "--delegate", endpoint, "--curve-keys", str(relay_keys),
                       "--forward", "read,write", "-o", str(tmp_path / "run"), "--", *program)  # fmt: skip
        with open(out, "wb") as f:
            res = topo.run("compute", argv, stdout=f, stderr=subprocess.PIPE, timeout=300)
        assert res.returncode == 0, res.stderr
        assert out.read_bytes() == native
        run = rundir.load(tmp_path / "run")
        assert run.meta["curve"] is True and run.meta["delegate"]["curve"] is True
        assert run.meta["delegate"]["pid"] == proc.pid
        calls = run.calls()
        assert calls.size > 0 and (calls["d_recv"] > 0).all() and (calls["t_reply"] > 0).all()

        # no keys, an unauthorized client key, the wrong server key: all refused
        wrong_server = tmp_path / "wrong-server"  # our client pair, another delegate's key
        wrong_server.mkdir(mode=0o700)
        (wrong_server / "server.key").write_bytes((other / "server.key").read_bytes())
        secret = wrong_server / "client.key_secret"
        secret.write_bytes((relay_keys / "client.key_secret").read_bytes())
        os.chmod(secret, 0o600)
        for label, extra in (
            ("none", []),
            ("unauthorized", ["--curve-keys", str(other / "relays" / "compute")]),
            ("wrong-server", ["--curve-keys", str(wrong_server)]),
        ):
            argv = tb_argv("run", "--delegate", endpoint, "--connect-timeout", "2", *extra,
                           "--forward", "write", "-o", str(tmp_path / f"run-{label}"), "--", "echo", "x")  # fmt: skip
            res = topo.run("compute", argv, capture_output=True, text=True, timeout=60)
            assert res.returncode == 2, (label, res.stderr)
            [line] = res.stderr.strip().splitlines()
            assert line.startswith(f"testbed: error: no delegate answering at {endpoint}"), line
            assert not (tmp_path / f"run-{label}").exists()

        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    # only the two authenticated relays (the probe and the run) ever reached the delegate
    clients = [line for line in err.splitlines() if line.startswith("testbed delegate: client ")]
    assert len(clients) == 2, err
    assert "CURVE" in err and "warning" not in err


@pytest.mark.root
@pytest.mark.netns
@needs_netns
def test_plain_delegate_beyond_loopback_warns():
    with netns.Topology(["compute", "delegate"]) as topo:
        endpoint = f"tcp://{topo.addr('delegate')}:5556"
        proc = topo.popen("delegate", tb_argv("delegate", "--listen", endpoint),
                          stderr=subprocess.PIPE, text=True)  # fmt: skip
        first = proc.stderr.readline()
        second = proc.stderr.readline()
        proc.terminate()
        proc.communicate(timeout=15)
    assert first.startswith(f"testbed delegate: listening on {endpoint}")
    assert second.startswith(f"testbed delegate: warning: {endpoint} is reachable beyond loopback")
