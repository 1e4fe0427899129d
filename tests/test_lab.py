"""testbed lab: namespace nodes with sshd, created and removed for real (as root).

The full 3-node lab with Ansible is exercised in test_provision.py; here are
the lab's own promises on 1-node labs: up/status/down, nothing left behind,
down safe twice, refusal of a busy subnet, of a second lab in the same
directory and of namespaces the lab did not create.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.cluster import lab, netns

pytestmark = [pytest.mark.root, pytest.mark.netns]

SUBNET = "10.213.49.0/24"


def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} missing"
    if not os.access(lab.SSHD, os.X_OK):
        return f"{lab.SSHD} missing"
    return None


_WHY = _can_netns()
if _WHY:
    print(f"test_lab: skipped: {_WHY}", file=sys.stderr)
skip = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def tb(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "testbed", *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def labdir():
    d = Path(f"/run/tbtest-lab-{os.getpid()}")
    yield d
    if lab.load_state(d) is not None:
        lab.lab_down(d)
    shutil.rmtree(d, ignore_errors=True)


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@skip
def test_up_status_down_leaves_nothing(labdir):
    up = tb("lab", "up", "--nodes", "1", "--delegates", "1", "--subnet", SUBNET, "--dir",
            str(labdir), "--link-rate", "50mbit")  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert "testbed provision -i" in up.stdout
    state = json.loads((labdir / "state.json").read_text())
    node = state["nodes"][0]
    assert node["address"] == "10.213.49.1" and node["netns"] in _netns()
    pids = netns.namespace_pids(node["netns"])
    assert node["sshd_pid"] in pids

    # the node is reachable over SSH with the lab's key and really is another netns
    ssh = subprocess.run(
        ["ssh", "-F", str(labdir / "ssh_config"), "node1", "ip -4 -o addr show dev eth0"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ssh.returncode == 0, ssh.stderr
    assert "10.213.49.1/24" in ssh.stdout

    # the node runs this checkout (sshd sets PYTHONPATH), whatever the Python has installed
    which = subprocess.run(
        ["ssh", "-F", str(labdir / "ssh_config"), "node1",
         f"{sys.executable} -c 'import testbed; print(testbed.__file__)'"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert which.stdout.strip() == str(lab.PROJECT_DIR / "testbed" / "__init__.py"), which.stderr

    # the inventory names it, as the single (delegate) node
    hosts = (labdir / "inventory" / "hosts.ini").read_text()
    assert "[delegate_nodes]\nnode1 ansible_host=10.213.49.1" in hosts

    st = tb("lab", "status", "--json", "--dir", str(labdir), check=True)
    status = json.loads(st.stdout)
    assert status["nodes"][0]["present"] and status["nodes"][0]["ssh_port_open"]
    # its link is capped as asked (tc tbf on the node's eth0), and status says so
    assert status["link_rate"] == "50mbit"
    qdisc = subprocess.run(["ip", "netns", "exec", node["netns"], "tc", "qdisc", "show", "dev",
                            "eth0"], capture_output=True, text=True).stdout  # fmt: skip
    assert "tbf" in qdisc and "50Mbit" in qdisc
    assert "links capped at 50mbit" in tb("lab", "status", "--dir", str(labdir)).stdout

    # a second lab in the same directory is refused, the first one untouched
    again = tb("lab", "up", "--nodes", "1", "--subnet", "10.213.50.0/24", "--dir", str(labdir))
    assert again.returncode == 2 and "already up" in again.stderr
    assert node["netns"] in _netns()

    # the lab's delegate service user (as site.yml would create it) is the lab's to remove
    user = lab.service_user(state)
    assert (
        "delegate_user: " + json.dumps(user)
        in (labdir / "inventory" / "group_vars" / "all" / "lab.yml").read_text()
    )
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", user], check=True)  # fmt: skip

    down = tb("lab", "down", "--dir", str(labdir), check=True)
    assert f"deleted namespace {node['netns']}" in down.stdout
    assert f"removed user {user}" in down.stdout
    assert subprocess.run(["getent", "passwd", user]).returncode == 2
    assert subprocess.run(["getent", "group", user]).returncode == 2
    assert node["netns"] not in _netns()
    assert not Path(f"/sys/class/net/{state['bridge']}").exists()
    assert not labdir.exists()
    assert not any(netns.pid_alive(p) for p in pids)
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    assert "10.213.49." not in listening

    # safe twice
    down2 = tb("lab", "down", "--dir", str(labdir), check=True)
    assert "nothing to do" in down2.stdout
    assert tb("lab", "status", "--dir", str(labdir)).returncode == 1


@skip
def test_a_bad_link_rate_is_refused_before_anything_is_made(labdir):
    proc = tb("lab", "up", "--nodes", "2", "--subnet", SUBNET, "--dir", str(labdir),
              "--link-rate", "fast")  # fmt: skip
    assert proc.returncode == 2 and "--link-rate" in proc.stderr and "100mbit" in proc.stderr
    assert "Traceback" not in proc.stderr and not (labdir / "state.json").exists()


@skip
def test_busy_subnet_is_refused(labdir):
    # 127.0.0.1 lives on lo: the loopback /24 is in use on every machine
    proc = tb("lab", "up", "--nodes", "2", "--subnet", "127.0.0.0/24", "--dir", str(labdir))
    assert proc.returncode == 2
    assert proc.stderr.startswith("testbed: error: subnet 127.0.0.0/24 is already in use")
    assert "Traceback" not in proc.stderr
    assert not labdir.exists()


@skip
def test_down_refuses_a_namespace_it_did_not_create(labdir):
    state = lab.lab_up(labdir, 1, SUBNET, 1)
    ns = state["nodes"][0]["netns"]
    # someone else's namespace now carries the lab's name
    netns.kill_namespace_pids(ns)
    subprocess.run(["ip", "netns", "del", ns], check=True)
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with pytest.raises(lab.LabError, match="not created by this lab"):
            lab.lab_down(labdir)
        assert ns in _netns(), "the foreign namespace must be left alone"
        assert not Path(f"/sys/class/net/{state['bridge']}").exists()
        assert labdir.exists(), "the state is kept for the user to look at"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(labdir, ignore_errors=True)
