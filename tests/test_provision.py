"""Ansible over real SSH: a 3-node namespace lab provisioned, used and torn down.

One lab (node1, node2 = compute_nodes; node3 = delegate_nodes) is shared by
the tests of this module, in file order:

  site.yml succeeds on all three and again with changed=0 (kmod: seccomp-only;
  CURVE keys made on the controller and distributed, secrets 0600; the
  delegate serves as the lab's unprivileged service user; its keys are
  root's) -> the delegate answers node1's distributed keys and refuses no
  keys and wrong keys -> the service user can neither read the delegate's
  secret nor admit a key, and site.yml removes a key planted there ->
  experiment.yml: node1 and node2 forward a real workload to node3 over CURVE
  and the run directories come back complete -> bad plans and hosts fail
  clearly -> teardown.yml (service user and relay keys gone) -> lab down
  leaves nothing.

The kmod role's real build-and-load runs against a QEMU guest (testbed.cluster.vm).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.cluster import lab, netns
from testbed.core import rundir
from testbed.core.errors import TestbedError as _TestbedError
from testbed.core.procs import free_port

SUBNET = "10.213.48.0/24"
NODE3 = "10.213.48.3"
PLAYBOOKS = Path(__file__).resolve().parent.parent / "playbooks"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "ssh", "ssh-keygen", "ansible-playbook"):
        if shutil.which(tool) is None and not (Path(sys.executable).parent / tool).exists():
            return f"{tool} missing"
    if not os.access(lab.SSHD, os.X_OK):
        return f"{lab.SSHD} missing"
    try:
        import ansible_runner  # noqa: F401
    except ImportError:
        return "ansible-runner missing"
    return None


WHY = _why_not()
if WHY:
    print(f"test_provision: skipped: {WHY}", file=sys.stderr)
needs_lab = pytest.mark.skipif(WHY is not None, reason=WHY or "")
pytestmark = [pytest.mark.root, pytest.mark.ansible]


def tb(*args: str, timeout: float = 600, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmpdir)) if tmpdir else None
    proc = subprocess.run(
        [sys.executable, "-m", "testbed", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    sys.stdout.write(proc.stdout[-3000:])  # shown by pytest on failure
    sys.stderr.write(proc.stderr[-2000:])
    return proc


def provision(inventory: Path | str, playbook: str, tmp: Path, *extra: str):
    summary = tmp / f"summary-{playbook}-{time.monotonic_ns()}.json"
    # ansible-runner's private data dir (kept after a failure) goes to the test's tmp
    proc = tb(
        "provision", "-i", str(inventory), playbook, "--json", str(summary), *extra, tmpdir=tmp
    )
    data = json.loads(summary.read_text()) if summary.exists() else None
    return proc, data


@pytest.fixture(scope="module")
def lab3(tmp_path_factory):
    if WHY:
        pytest.skip(WHY)
    d = Path(f"/run/tbtest-prov-{os.getpid()}")
    state = lab.lab_up(d, 3, SUBNET, 1)
    yield {
        "dir": d,
        "inventory": d / "inventory",
        "state": state,
        "tmp": tmp_path_factory.mktemp("prov"),
    }
    if lab.load_state(d) is not None:
        lab.lab_down(d)


def _delegate_child_pid(d: Path) -> int:
    return int((d / "state" / "node3" / "delegate" / "child.pid").read_text())


def _read_csv(p: Path):
    import pandas as pd  # lazy: the analysis test of this module only

    return pd.read_csv(p)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _owner_mode(p: Path) -> tuple[int, int, int]:
    st = p.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def _thread_creds(pid: int) -> set[tuple[str, str, str]]:
    """(Uid, Gid, CapEff) of every thread of ``pid``, as /proc shows them."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        f = dict(ln.split(":", 1) for ln in (task / "status").read_text().splitlines() if ":" in ln)
        out.add((f["Uid"].split()[0] + "/" + f["Uid"].split()[3], f["Gid"].split()[0],
                 f["CapEff"].strip()))  # fmt: skip
    return out


def _ssh(d: Path, node: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-F", str(d / "ssh_config"), node, command],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


@needs_lab
@pytest.mark.netns
@pytest.mark.slow
def test_site_succeeds_then_changes_nothing(lab3):
    proc, summary = provision(lab3["inventory"], "site.yml", lab3["tmp"])
    assert proc.returncode == 0, proc.stderr
    hosts = summary["hosts"]
    assert sorted(hosts) == ["node1", "node2", "node3"]
    for h in hosts.values():
        assert h["failed"] == 0 and h["unreachable"] == 0 and h["ok"] > 0
    assert hosts["node3"]["changed"] > 0  # the delegate was installed and started
    # the namespace nodes cannot load modules: reported, and the play went on
    for node in ("node1", "node2"):
        assert f"mktrace is not built on {node} and runs there use --backend seccomp" in proc.stdout
    assert "seccomp-only: kernel" in proc.stdout

    # CURVE keys: made on the controller, private, one relay pair per node
    d = lab3["dir"]
    user = lab.service_user(lab3["state"])
    assert f"(supervised, user {user}, CURVE) answers at tcp://{NODE3}:5555" in proc.stdout
    keys_dir = d / "curve-keys"
    assert _mode(keys_dir) == 0o700
    assert sorted(p.name for p in (keys_dir / "relays").iterdir()) == ["node1", "node2", "node3"]
    for p in keys_dir.rglob("*.key_secret"):
        assert _mode(p) == 0o600, p
    # node3: the delegate's keys belong to root (it reads them before dropping
    # to the service user, who owns nothing there), secrets 0600
    pw = pwd.getpwnam(user)
    curve = d / "state" / "node3" / "delegate" / "curve"
    assert _owner_mode(curve.parent) == (0, 0, 0o755)
    assert _owner_mode(curve) == (0, 0, 0o700)
    assert sorted(p.name for p in curve.iterdir()) == [
        "authorized", "client.key", "client.key_secret", "server.key", "server.key_secret"
    ]  # fmt: skip
    for name in ("server.key_secret", "client.key_secret"):
        assert _owner_mode(curve / name) == (0, 0, 0o600)
    for name in ("server.key", "client.key"):
        assert _owner_mode(curve / name) == (0, 0, 0o644)
    assert _owner_mode(curve / "authorized") == (0, 0, 0o700)
    assert sorted(p.name for p in (curve / "authorized").iterdir()) == [
        "node1.key", "node2.key", "node3.key"
    ]  # fmt: skip
    for p in (curve / "authorized").iterdir():
        assert _owner_mode(p) == (0, 0, 0o644), p
    # compute nodes: the delegate's public key and their own pair, nothing else
    for node in ("node1", "node2"):
        rk = d / "state" / node / "curve"
        assert _mode(rk) == 0o700
        assert sorted(p.name for p in rk.iterdir()) == [
            "client.key",
            "client.key_secret",
            "server.key",
        ]
        assert _mode(rk / "client.key_secret") == 0o600
        assert (rk / "client.key_secret").read_bytes() == (
            keys_dir / "relays" / node / "client.key_secret"
        ).read_bytes()
    # the delegate serves as the service user: every thread, no capabilities
    child = _delegate_child_pid(d)
    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
    assert b"--user" in argv and b"--curve-keys" in argv
    assert _thread_creds(child) == {
        (f"{pw.pw_uid}/{pw.pw_uid}", str(pw.pw_gid), "0000000000000000")
    }

    again, summary2 = provision(lab3["inventory"], "site.yml", lab3["tmp"])
    assert again.returncode == 0, again.stderr
    assert {h: c["changed"] for h, c in summary2["hosts"].items()} == {
        "node1": 0,
        "node2": 0,
        "node3": 0,
    }


@needs_lab
@pytest.mark.netns
def test_delegate_answers_distributed_keys_and_refuses_others(lab3, tmp_path):
    from testbed.core.keys import generate
    from testbed.jobs.experiment import ping

    d = lab3["dir"]
    endpoint = f"tcp://{NODE3}:5555"
    welcome = ping(endpoint, timeout_s=10, curve_keys=str(d / "state" / "node1" / "curve"))
    child = _delegate_child_pid(d)
    assert welcome["pid"] == child and welcome["curve"] is True
    node3 = next(n for n in lab3["state"]["nodes"] if n["name"] == "node3")
    assert child in netns.namespace_pids(node3["netns"]), (
        "the delegate must live in node3's namespace"
    )

    # from compute node node1, over SSH: its distributed keys work, no keys are refused
    run = (
        f"{sys.executable} -m testbed run --delegate {endpoint} --forward write --connect-timeout 2"
    )
    ok = _ssh(d, "node1", f"{run} --curve-keys {d}/state/node1/curve -o {tmp_path}/ok -- echo hi")
    assert ok.returncode == 0 and ok.stdout == "hi\n", ok.stderr
    assert rundir.load(tmp_path / "ok").meta["delegate"]["pid"] == child
    plain = _ssh(d, "node1", f"{run} -o {tmp_path}/plain -- echo hi")
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == [
        f"testbed: error: no delegate answering at {endpoint} within 2 s "
        "(does it need --curve-keys?)"
    ]
    assert not (tmp_path / "plain").exists()
    # a relay with keys of its own making is refused too
    generate(tmp_path / "mine")
    (tmp_path / "mine" / "server.key").unlink()
    shutil.copy(d / "curve-keys" / "server.key", tmp_path / "mine" / "server.key")
    with pytest.raises(_TestbedError, match="no delegate answering"):
        ping(endpoint, timeout_s=2, curve_keys=str(tmp_path / "mine"))


@needs_lab
@pytest.mark.netns
@pytest.mark.slow
def test_service_user_can_neither_read_the_secret_nor_admit_a_key(lab3, tmp_path):
    """Issue 19, item 8: code that takes over the dropped delegate (it runs as
    the service user) can neither read the server's secret nor add a key to
    authorized/ that would admit it after a restart; a key that got there
    anyway (an older role let the service user write there) is removed by the
    next site.yml, which restarts the delegate: started as root with --user,
    it reads its keys again and answers an authorized relay."""
    from testbed.core.keys import generate
    from testbed.jobs.experiment import ping

    d, state = lab3["dir"], lab3["state"]
    user = lab.service_user(state)
    pw = pwd.getpwnam(user)
    sdir = d / "state" / "node3" / "delegate"
    curve = sdir / "curve"
    endpoint = f"tcp://{NODE3}:5555"
    node1_keys = str(d / "state" / "node1" / "curve")

    def as_user(command: str) -> subprocess.CompletedProcess:
        return _ssh(d, "node3", f"runuser -u {user} -- {command}")

    # The lab directory is 0700; a real delegate_state_dir sits beneath
    # /var/lib (0755).  Let others search the lab's own directories above
    # delegate_state_dir for this check, so that only the role's modes decide.
    opened = [d, d / "state", d / "state" / "node3"]
    before = {p: _mode(p) for p in opened}
    try:
        for p in opened:
            os.chmod(p, before[p] | 0o001)
        reach = as_user(f"ls {sdir}")
        assert reach.returncode == 0 and "curve" in reach.stdout.split(), reach.stderr
        for name in ("server.key_secret", "client.key_secret"):
            read = as_user(f"cat {curve / name}")
            assert read.returncode != 0 and "ecret" not in read.stdout, f"{user} read {name}"
            assert "Permission denied" in read.stderr, read.stderr
        listing = as_user(f"ls {curve}")
        assert listing.returncode != 0 and "Permission denied" in listing.stderr
        for target in ("authorized/evil.key", "evil", "authorized"):
            add = as_user(f"touch {curve / target}")
            assert add.returncode != 0, f"{user} could create or touch curve/{target}"
        rename = as_user(f"mv {curve} {sdir / 'curve.old'}")
        assert rename.returncode != 0 and curve.is_dir()
    finally:
        for p in opened:
            os.chmod(p, before[p])
    assert not (curve / "authorized" / "evil.key").exists()
    assert not (curve / "evil").exists()

    # A key planted by someone else (here: root, as an old role's service user
    # could have) admits its holder once the delegate restarts...
    generate(tmp_path / "evil")
    (tmp_path / "evil" / "server.key").unlink()
    shutil.copy(d / "curve-keys" / "server.key", tmp_path / "evil" / "server.key")
    planted = curve / "authorized" / "evil.key"
    shutil.copy(tmp_path / "evil" / "client.key", planted)
    supervise = f"{sys.executable} {sdir}/testbed-supervise.py"
    restart = _ssh(d, "node3", f"{supervise} stop {sdir} && {supervise} ensure {sdir}")
    assert restart.returncode == 0, restart.stderr
    assert ping(endpoint, timeout_s=10, curve_keys=str(tmp_path / "evil"))["curve"] is True
    # ... so the role removes what the controller does not admit, and restarts it
    proc, summary = provision(lab3["inventory"], "site.yml", lab3["tmp"], "--limit", "node3")
    assert proc.returncode == 0, proc.stderr
    assert summary["hosts"]["node3"]["changed"] > 0
    assert not planted.exists()
    assert sorted(p.name for p in (curve / "authorized").iterdir()) == [
        "node1.key", "node2.key", "node3.key"
    ]  # fmt: skip
    with pytest.raises(_TestbedError, match="no delegate answering"):
        ping(endpoint, timeout_s=2, curve_keys=str(tmp_path / "evil"))
    child = _delegate_child_pid(d)
    welcome = ping(endpoint, timeout_s=10, curve_keys=node1_keys)
    assert welcome["pid"] == child and welcome["curve"] is True
    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
    assert b"--user" in argv and b"--curve-keys" in argv
    assert _thread_creds(child) == {
        (f"{pw.pw_uid}/{pw.pw_uid}", str(pw.pw_gid), "0000000000000000")
    }


@needs_lab
@pytest.mark.netns
@pytest.mark.slow
def test_experiment_yml_brings_back_complete_runs(lab3):
    tmp = lab3["tmp"]
    plan = tmp / "plan.yml"
    plan.write_text(
        "name: lab-gzip\nrepetitions: 1\n"
        "workloads:\n  - {name: gzip, size_mb: 1}\n"
        "forward:\n  - read,write\n  - {policy: 'max-freq:50%'}\npredictor: size\n"
        "delegates: [local, kthread, {name: near, local: tcp}]\n"
        "# local: replaced by the inventory's delegate nodes; kthread and near (same-node) stay\n"
        "replay: {from: near}\n"
    )
    results = tmp / "results"
    proc, summary = provision(
        lab3["inventory"], "experiment.yml", tmp,
        "-e", f"experiment_plan={plan}", "-e", f"experiment_results_dir={results}",
        "-e", "experiment_serial=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(summary["hosts"]) == ["node1", "node2", "node3"]
    # experiment_serial=1: every run of one node (natives included) ends before
    # the other node's first run starts (started_at has a 1 s resolution)
    spans = {}
    for node in ("node1", "node2"):
        metas = [json.loads(f.read_text()) for f in (results / node).rglob("run.json")]
        starts = [time.mktime(time.strptime(m["started_at"], "%Y-%m-%dT%H:%M:%S%z")) for m in metas]
        ends = [t + m["wall_s"] for t, m in zip(starts, metas, strict=True)]
        spans[node] = (min(starts), max(ends))
        assert len(metas) >= 2, f"{node}: its native and forwarded runs"
    first, second = sorted(spans.values())
    assert first[1] <= second[0] + 1.0, spans
    assert summary["hosts"]["node3"]["changed"] == 0  # only its settings were read
    for node in ("node1", "node2"):  # the kthread delegate stays, and is skipped: no module here
        assert f"skipping delegate(s) kthread on {node} (2 runs): mktrace module not loaded" in (
            proc.stdout
        )
        assert not (results / node / "gzip.read+write.kthread.r1").exists()
    # the policy was resolved once, on the controller: both nodes forward its set
    pol = json.loads((results / "policies.json").read_text())
    assert pol["resolved_on"] == "controller"
    assert (results / "controller" / "profile-gzip" / "run.json").exists()
    want = pol["sets"]["gzip"]["max-freq:50%"]
    for node in ("node1", "node2"):
        d = results / node / "gzip.max-freq-50pct.node3.r1"
        cell = json.loads((d / "experiment.json").read_text())
        assert sorted(rundir.load(d).meta["forwarded"]) == want
        assert cell["resolution"]["on"] == "controller" and cell["predictor"] == "size"
        assert not (results / node / "profile-gzip").exists()
    child = _delegate_child_pid(lab3["dir"])
    for node in ("node1", "node2"):
        d = results / node / "gzip.read+write.node3.r1"
        run = rundir.load(d)
        cell = json.loads((d / "experiment.json").read_text())
        calls = run.calls()
        assert run.meta["exit_status"] == 0
        assert run.meta["endpoint"] == f"tcp://{NODE3}:5555"
        assert run.meta["curve"] is True, "forwarded over CURVE with the node's relay keys"
        assert run.meta["delegate"]["pid"] == child, "answered by node3's delegate service"
        assert sorted(run.meta["forwarded"]) == ["read", "write"]
        assert len(calls) > 0 and (calls["d_recv"] > 0).all() and (calls["t_reply"] > 0).all()
        assert cell["host"] == node and cell["output_matches_native"] is True
        assert (d / "syscalls.csv").stat().st_size > 0
    # replay: each node's recordings on its own loopback ("near") re-issued against node3
    for node in ("node1", "node2"):
        for fwd in ("read+write", "max-freq-50pct"):
            d = results / node / f"gzip.{fwd}.node3.r1.replayed-from-near"
            run = rundir.load(d)
            assert run.complete and run.meta["mode"] == "replay"
            assert run.meta["endpoint"] == f"tcp://{NODE3}:5555" and run.meta["curve"] is True
            assert run.meta["replay"]["source_mechanism"] == "seccomp/tcp/loopback"
            assert run.meta["delegate"]["pid"] == child
            assert run.meta["calls"]["faults"] == 0 and len(run.calls()) > 0
            assert "not measured" in run.meta["replay"]["client_overhead_how"]  # CURVE
    assert json.loads((results / "plan.json").read_text())["name"] == "lab-gzip"
    assert not (results / ".incoming").exists()

    report = tmp / "report"
    analyzed = tb("analyze", str(results), "-o", str(report))
    assert analyzed.returncode == 0, analyzed.stderr
    md = (report / "report.md").read_text()
    assert "declared before the analysis in the plan (lab-gzip)" in md  # the plan's predictor
    assert "once on controller" in md  # policies as resolved
    # each replay scored against the real run on node3 of the same node, cell and set
    table = _read_csv(report / "tables" / "replay_vs_measured.csv")
    assert len(table) == 4 and set(table["measured_from"]) == {"other runs"}
    assert set(table["target_mechanism"]) == {"seccomp/libzmq-curve-tcp/remote"}
    assert (table["measured_runs"] == 1).all() and table["replay_error"].notna().all()
    assert "## Replay-predicted vs measured" in md


@needs_lab
@pytest.mark.netns
def test_bad_plan_stops_experiment_yml_before_the_nodes(lab3):
    tmp = lab3["tmp"]
    for body, message in (
        ("workloads: [gzipp]\nforward: [read]\ndelegates: [local]\n", "unknown workload 'gzipp'"),
        ("workloads: [gzip]\nforward: ['read,wriet']\ndelegates: [local]\n", "wriet"),
    ):
        plan = tmp / "bad.yml"
        plan.write_text(body)
        remote = f"{lab3['dir']}/state/{{{{ inventory_hostname }}}}/bad-experiment"
        proc, _ = provision(
            lab3["inventory"], "experiment.yml", tmp,
            "-e", f"experiment_plan={plan}", "-e", f"experiment_remote_dir={remote}",
            "-e", f"experiment_results_dir={tmp / 'bad-results'}",
        )  # fmt: skip
        assert proc.returncode == 2
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("testbed: error: ") and message in last, last
        for node in ("node1", "node2"):
            assert not (lab3["dir"] / "state" / node / "bad-experiment").exists()
        assert not (tmp / "bad-results").exists()


@needs_lab
@pytest.mark.netns
def test_experiment_yml_without_the_nodes_relay_keys_says_so_before_running(lab3):
    """CURVE delegates, and no relay keys where experiment.yml is told to look (as when
    site.yml ran with other delegate_* settings): one clear line, no run started."""
    tmp = lab3["tmp"]
    plan = tmp / "keys.yml"
    plan.write_text("workloads: [{name: gzip, size_mb: 1}]\nforward: [read]\ndelegates: [local]\n")
    proc, _ = provision(
        lab3["inventory"], "experiment.yml", tmp, "--limit", "node1,node3",
        "-e", f"experiment_plan={plan}", "-e", "delegate_relay_keys_dir=/nonexistent-relay-keys",
        "-e", f"experiment_results_dir={tmp / 'keys-results'}",
    )  # fmt: skip
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "this node has no relay keys at /nonexistent-relay-keys" in last, last
    assert "run site.yml first" in last
    assert not list((tmp / "keys-results").rglob("run.json"))


@pytest.mark.skipif(WHY is not None, reason=WHY or "")
def test_unreachable_host_is_named_and_nothing_is_left(tmp_path):
    inv = tmp_path / "hosts.ini"
    port = free_port()  # nothing listens there
    inv.write_text(
        f"[compute_nodes]\nghost ansible_host=127.0.0.1 ansible_port={port} ansible_user=root\n"
        "[all:vars]\nansible_ssh_common_args='-o StrictHostKeyChecking=no "
        f"-o UserKnownHostsFile={tmp_path}/kh -o ControlMaster=no'\n"
    )
    proc, summary = provision(inv, "site.yml", tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("testbed: error: ghost unreachable:"), last
    assert "Connection refused" in last or "connect" in last
    assert summary["hosts"]["ghost"]["unreachable"] == 1
    assert "Traceback" not in proc.stderr
    leftovers = subprocess.run(["pgrep", "-f", f"Port={port}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_wrong_inventory_path_is_one_clear_error(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = tb("provision", "-i", str(tmp_path / "no-such-inventory"), "site.yml", tmpdir=scratch)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"testbed: error: inventory {tmp_path / 'no-such-inventory'}: no such file or directory"
    )
    assert not any(scratch.iterdir()), "nothing may be created for a wrong inventory"
    (tmp_path / "hosts.ini").write_text("[compute_nodes]\n")
    (tmp_path / "empty-inventory").mkdir()
    empty = tb("provision", "-i", str(tmp_path / "empty-inventory"), "site.yml")
    assert empty.returncode == 2 and "empty directory" in empty.stderr
    unknown = tb("provision", "-i", str(tmp_path), "nosuch.yml")
    assert unknown.returncode == 2 and "playbook 'nosuch.yml' not found" in unknown.stderr


@needs_lab
@pytest.mark.netns
@pytest.mark.slow
def test_teardown_then_lab_down_leaves_nothing(lab3):
    d, state = lab3["dir"], lab3["state"]
    proc, _ = provision(lab3["inventory"], "teardown.yml", lab3["tmp"])
    assert proc.returncode == 0, proc.stderr
    assert not (d / "state" / "node3" / "delegate").exists()
    assert not (d / "state" / "node1" / "experiment").exists()
    assert not (d / "state" / "node1" / "curve").exists(), "relay keys removed"
    with pytest.raises(KeyError):
        pwd.getpwnam(lab.service_user(state))  # the service user is gone
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((NODE3, 5555)) != 0, "the delegate must be stopped"

    pids = [p for n in state["nodes"] for p in netns.namespace_pids(n["netns"])]
    assert pids, "the sshds are still there before lab down"
    down = tb("lab", "down", "--dir", str(d))
    assert down.returncode == 0, down.stderr
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for n in state["nodes"]:
        assert n["netns"] not in names
    assert not Path(f"/sys/class/net/{state['bridge']}").exists()
    assert not d.exists()
    assert not any(netns.pid_alive(p) for p in pids)
    for proc_dir in Path("/proc").iterdir():  # no ssh control master, no node process
        if proc_dir.name.isdigit():
            try:
                cmd = (proc_dir / "cmdline").read_bytes()
            except OSError:
                continue
            assert str(d).encode() not in cmd, cmd
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    assert "10.213.48." not in listening


def _ansible_lint() -> str | None:
    beside = Path(sys.executable).parent / "ansible-lint"
    return str(beside) if beside.exists() else shutil.which("ansible-lint")


@pytest.mark.skipif(_ansible_lint() is None, reason="ansible-lint not installed")
def test_playbooks_are_ansible_lint_clean():
    proc = subprocess.run(
        [_ansible_lint(), "--offline", "--profile", "production", "-q",
         "site.yml", "kmod.yml", "experiment.yml", "teardown.yml", "roles"],
        capture_output=True, text=True, cwd=PLAYBOOKS, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- kmod in a VM


def _vm_missing() -> str | None:
    if WHY:
        return WHY
    try:
        from testbed.cluster import vm
    except ImportError as exc:
        return f"testbed.cluster.vm unavailable ({exc})"
    missing = vm.missing_packages()
    if missing:
        return "missing " + ", ".join(missing)
    if not (PLAYBOOKS.parent / "kmod" / "Makefile").exists():
        return "kmod/ not in the tree"
    return None


@pytest.mark.vm
@pytest.mark.slow
def test_kmod_role_builds_and_loads_mktrace_in_a_guest(tmp_path, monkeypatch):
    why = _vm_missing()
    if why:
        print(
            f"test_kmod_role_builds_and_loads_mktrace_in_a_guest: skipped: {why}", file=sys.stderr
        )
        pytest.skip(why)
    from testbed.cluster import vm

    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    python = os.path.realpath(sys.executable)
    with vm.Guest(authorized_key=(tmp_path / "id_ed25519.pub").read_text()) as guest:
        inv = tmp_path / "inventory"
        (inv / "group_vars" / "all").mkdir(parents=True)
        (inv / "hosts.ini").write_text(
            f"[compute_nodes]\nguest ansible_host=127.0.0.1 ansible_port={guest.ssh_port}\n"
        )
        (inv / "group_vars" / "all" / "vm.yml").write_text(
            "ansible_user: root\n"
            f"ansible_ssh_private_key_file: {key}\n"
            f'ansible_ssh_common_args: "-o UserKnownHostsFile={guest.known_hosts} '
            f'-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes"\n'
            f"ansible_python_interpreter: {python}\n"
            # the module is built in the guest (DKMS, else Kbuild) against the guest
            # kernel's headers (about 2-3 minutes under TCG), then loaded there
            "kmod_build_on_controller: false\n"
            f"kmod_source_dir: {PLAYBOOKS.parent / 'kmod'}\n"
        )
        proc, summary = provision(inv, "kmod.yml", tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert summary["hosts"]["guest"]["failed"] == 0
        assert "loaded mktrace (" in proc.stdout and "/dev/mktrace ready on guest" in proc.stdout
        check = subprocess.run(
            ["ssh", "-i", str(key), "-o", f"UserKnownHostsFile={guest.known_hosts}",
             "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-p", str(guest.ssh_port),
             "root@127.0.0.1", "test -c /dev/mktrace && test -d /sys/module/mktrace && echo present"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert check.stdout.strip() == "present", check.stderr

        again, summary2 = provision(inv, "kmod.yml", tmp_path)
        assert again.returncode == 0, again.stderr
        assert summary2["hosts"]["guest"]["changed"] == 0
        assert "already loaded mktrace" in again.stdout

        # experiment.yml runs the kthread mechanism where the kmod role loaded the module
        _kthread_experiment_in_guest(inv, tmp_path, python, monkeypatch)


def _kthread_experiment_in_guest(inv: Path, tmp: Path, python: str, monkeypatch) -> None:
    repo = PLAYBOOKS.parent
    monkeypatch.setenv("PYTHONPATH", str(repo))  # the controller's --check: this checkout
    wrapper = tmp / "py"  # the node's Python, on this checkout (the guest shares our root)
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={repo} exec {python} "$@"\n')
    wrapper.chmod(0o755)
    plan = tmp / "kthread-plan.yml"
    plan.write_text(
        "name: guest-kthread\nworkloads:\n  - {name: cat, size_mb: 0.2}\nforward: [read]\n"
        "delegates: [{name: kt20, kthread: {delay_us: 20}}]\n"
    )
    results = tmp / "kthread-results"
    proc, summary = provision(
        inv, "experiment.yml", tmp, "-e", f"experiment_plan={plan}",
        "-e", f"experiment_results_dir={results}", "-e", f"experiment_python={wrapper}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert summary["hosts"]["guest"]["failed"] == 0
    d = results / "guest" / "cat.read.kt20.r1"
    run = rundir.load(d)
    cell = json.loads((d / "experiment.json").read_text())
    assert run.meta["mode"] == "kthread" and run.meta["mechanism"] == "kmod-kthread/same-node"
    assert run.meta["delegate"]["delay_us"] == 20.0 and run.meta["kmod"]["version"]
    calls = run.calls()
    assert len(calls) > 0 and ((calls["t_reply"] - calls["d_send"]) >= 20_000).all()
    assert cell["output_matches_native"] is True


def _headers_6_1() -> Path | None:
    builds = sorted(Path("/lib/modules").glob("6.1.*/build/Makefile"))
    return builds[-1].parent if builds else None


@pytest.mark.skipif(
    _headers_6_1() is None or shutil.which("make") is None or shutil.which("gcc") is None,
    reason="needs Debian's 6.1 kernel headers, make and gcc",
)
def test_kmod_role_scripts_probe_and_build_on_this_machine(tmp_path):
    """The role's node-side scripts, run here: probe JSON, Kbuild of only the sources."""
    files = PLAYBOOKS / "roles" / "kmod" / "files"
    src = PLAYBOOKS.parent / "kmod"
    probe = subprocess.run(
        ["sh", str(files / "kmod-probe.sh"), str(src), "mktrace", str(tmp_path / "marker")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    facts = json.loads(probe.stdout)
    assert facts["release"] == os.uname().release
    assert facts["modules"] == Path("/proc/modules").exists()
    assert facts["source"] is True and len(facts["fingerprint"]) == 12
    assert facts["loaded"] is False and facts["loaded_version"] == ""

    kdir = _headers_6_1()
    build = tmp_path / "build"
    argv = ["sh", str(files / "kmod-build.sh"), str(src), str(build), str(kdir), "mktrace"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"built {build}/mktrace.ko"
    info = subprocess.run(["modinfo", "-F", "vermagic", str(build / "mktrace.ko")],
                          capture_output=True, text=True)  # fmt: skip
    assert info.stdout.startswith(kdir.parent.name + " ")
    copied = {p.name for p in build.iterdir()}
    assert "main.c" in copied and not (build / "vm").exists()
    second = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert second.stdout.startswith("up to date")

    missing = subprocess.run(
        ["sh", str(files / "kmod-build.sh"), str(src), str(tmp_path / "b2"), str(tmp_path), "mktrace"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert missing.returncode == 1 and "no kernel headers at" in missing.stderr
