"""testbed lab with VM nodes: QEMU guests (Debian's kernel, systemd, sshd) on the lab's bridge.

System tests (root, QEMU/TCG, real SSH, real Ansible):

* ``lab up --nodes 2 --vm-nodes 1``: node1 is a guest booted from the cached base
  image (built first if missing), node2 a namespace; the guest answers SSH over the
  bridge with the lab's keys, runs systemd as PID 1 (running or degraded), Debian's
  kernel and its own python3, has the lab address and no route beyond the lab;
  ``lab status`` shows it; a trivial playbook reaches both nodes through
  ``testbed provision``; ``lab down`` leaves no QEMU, no tap, no overlay;
* a guest that does not come up in time: ``lab_up`` fails and removes everything;
* end to end (issue 25): a VM compute node (also a delegate node, so that its delegate
  runs under systemd) and a namespace delegate node; ``site.yml`` twice (DKMS builds and
  loads mktrace in the guest; the second run changes nothing); ``experiment.yml`` runs
  the three mechanisms (kmod relay to node2, kmod kthread, seccomp to node2) in one
  Ansible run; outputs identical to the native run; ``testbed analyze`` puts them side
  by side; the systemd unit is restarted after ``kill -9`` of the delegate.

Unit tests: the config disk, MACs, the image key and the inventory of VM nodes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from testbed.cluster import lab
from testbed.cluster.vm import node as vmnode
from testbed.cluster.vm import nodeimage
from testbed.cluster.vm.kernel import Kernel

SUBNET = "10.213.61.0/24"
SUBNET_FAIL = "10.213.62.0/24"
SUBNET_E2E = "10.213.63.0/24"
REPO = Path(__file__).resolve().parent.parent
PLANS = REPO / "playbooks" / "plans"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "ssh", "ssh-keygen", "ansible-playbook"):
        if shutil.which(tool) is None and not (Path(sys.executable).parent / tool).exists():
            return f"{tool} missing"
    missing = nodeimage.missing_tools()
    if missing:
        return f"VM nodes need {' '.join(missing)}"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    try:
        import ansible_runner  # noqa: F401  # lazy: optional (the provision extra), only probed
    except ImportError:
        return "ansible-runner missing"
    return None


WHY = _why_not()
needs_vm_lab = pytest.mark.skipif(WHY is not None, reason=WHY or "")


def system(test):
    """The markers of this module's system tests (root, a namespace node, QEMU, long)."""
    for mark in (pytest.mark.root, pytest.mark.netns, pytest.mark.vm, pytest.mark.slow):
        test = mark(test)
    return test


def tb(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "testbed", *args], capture_output=True, text=True, timeout=timeout
    )
    sys.stdout.write(proc.stdout[-3000:])  # shown by pytest on failure
    sys.stderr.write(proc.stderr[-3000:])
    return proc


def _qemu_running(path: str) -> bool:
    """Whether any process has ``path`` on its command line (a node's overlay)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if path.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


@pytest.fixture
def vmlabdir():
    d = Path(f"/run/tbtest-vmlab-{os.getpid()}")
    yield d
    if lab.load_state(d) is not None:
        lab.lab_down(d)
    shutil.rmtree(d, ignore_errors=True)


def _ssh(d: Path, node: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-F", str(d / "ssh_config"), node, command],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@needs_vm_lab
@system
@pytest.mark.ansible
@pytest.mark.timeout(1500)
def test_vm_node_up_provision_down(vmlabdir, tmp_path):
    up = tb("lab", "up", "--nodes", "2", "--vm-nodes", "1", "--subnet", SUBNET,
            "--dir", str(vmlabdir))  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert "node image: " in up.stderr  # built or cached, said either way
    assert "node1: ssh up after" in up.stderr
    state = json.loads((vmlabdir / "state.json").read_text())
    vm, ns = state["nodes"]
    assert vm["kind"] == "vm" and ns["kind"] == "netns"
    assert vm["address"] == "10.213.61.1" and vm["boot_seconds"] > 0
    assert Path(f"/sys/class/net/{vm['tap']}").exists()
    assert Path(vm["overlay"]).is_file() and _qemu_running(vm["overlay"])

    # a real guest: systemd as PID 1, Debian's kernel, its own Python, the lab address only
    probe = _ssh(vmlabdir, "node1", "systemctl is-system-running --wait; cat /proc/1/comm; "
                 "uname -r; hostname; /usr/bin/python3 -c pass && echo python-ok; "
                 "ip -4 -o addr show dev eth0; ip route show default | wc -l")  # fmt: skip
    assert probe.returncode in (0, 1), probe.stderr  # is-system-running: 1 when degraded
    lines = probe.stdout.split("\n")
    assert lines[0] in ("running", "degraded"), probe.stdout
    assert lines[1] == "systemd"
    assert lines[2] != os.uname().release  # the guest kernel, not this host's
    assert lines[3] == "node1" and "python-ok" in lines
    assert "10.213.61.1/24" in probe.stdout
    assert lines[-2] == "0", "the guest has no route beyond the lab"
    # the guest and the namespace node reach each other over the bridge
    ping = _ssh(vmlabdir, "node1", f"ping -c 1 -W 5 {ns['address']}")
    assert ping.returncode == 0, ping.stdout + ping.stderr

    st = tb("lab", "status", "--json", "--dir", str(vmlabdir))
    status = json.loads(st.stdout)
    assert status["nodes"][0]["present"] and status["nodes"][0]["ssh_port_open"]
    text = tb("lab", "status", "--dir", str(vmlabdir)).stdout
    assert "node1" in text and " vm " in text and "alive" in text

    # the same inventory: both nodes in the usual groups, the guest also in vm_nodes
    inv = vmlabdir / "inventory"
    hosts = (inv / "hosts.ini").read_text()
    assert "[compute_nodes]\nnode1 ansible_host=10.213.61.1" in hosts
    assert "[vm_nodes]\nnode1" in hosts
    assert "/usr/bin/python3" in (inv / "group_vars" / "vm_nodes" / "lab.yml").read_text()

    # Ansible over real SSH reaches both, the guest with its own Python
    book = tmp_path / "ping.yml"
    book.write_text(
        "- hosts: lab_nodes\n  gather_facts: true\n  tasks:\n"
        "    - ansible.builtin.ping:\n"
        '    - ansible.builtin.copy:\n        content: "{{ ansible_facts.kernel }}\\n"\n'
        "        dest: /tmp/testbed-kernel-{{ inventory_hostname }}\n"
    )
    summary = tmp_path / "summary.json"
    prov = tb("provision", "-i", str(inv), str(book), "--json", str(summary))
    assert prov.returncode == 0, prov.stdout + prov.stderr
    hosts_sum = json.loads(summary.read_text())["hosts"]
    assert set(hosts_sum) == {"node1", "node2"}
    assert all(h["failed"] == 0 and h["unreachable"] == 0 for h in hosts_sum.values())
    seen = _ssh(vmlabdir, "node1", "cat /tmp/testbed-kernel-node1")
    assert seen.stdout.strip() == lines[2]  # written on the guest, by the guest's facts

    down = tb("lab", "down", "--dir", str(vmlabdir))
    assert down.returncode == 0, down.stderr
    assert f"stopped QEMU {vm['qemu_pid']} of node1" in down.stdout
    assert f"deleted tap {vm['tap']}" in down.stdout
    assert not _qemu_running(vm["overlay"])
    assert not Path(f"/sys/class/net/{vm['tap']}").exists()
    assert not Path(vm["overlay"]).exists() and not vmlabdir.exists()
    assert not Path(f"/sys/class/net/{state['bridge']}").exists()


@needs_vm_lab
@system
@pytest.mark.timeout(600)
def test_vm_node_that_does_not_boot_in_time_leaves_nothing(vmlabdir, monkeypatch):
    monkeypatch.setattr(lab, "VM_BOOT_WAIT_S", 2.0)  # no guest is up this soon under TCG
    lines: list[str] = []
    with pytest.raises(lab.LabError, match="not reachable over SSH within 2 s"):
        lab.lab_up(vmlabdir, 1, SUBNET_FAIL, 1, vm_nodes=1, progress=lines.append)
    booting = next(ln for ln in lines if ln.startswith("node1: booting (QEMU pid "))
    pid = int(booting.split("QEMU pid ")[1].split(",")[0])
    tap = booting.split("tap ")[1].rstrip(")")
    deadline = time.monotonic() + 10
    while vmnode.node_alive(pid, str(vmlabdir / "nodes" / "node1" / "disk.qcow2")):
        assert time.monotonic() < deadline, "QEMU still running after a failed lab up"
        time.sleep(0.1)
    assert not vmlabdir.exists()
    assert not Path(f"/sys/class/net/{tap}").exists()


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())["hosts"]


@needs_vm_lab
@system
@pytest.mark.ansible
@pytest.mark.timeout(1800)
def test_vm_lab_site_experiment_three_mechanisms(vmlabdir, tmp_path):
    up = tb("lab", "up", "--nodes", "2", "--vm-nodes", "1", "--subnet", SUBNET_E2E,
            "--dir", str(vmlabdir))  # fmt: skip
    assert up.returncode == 0, up.stderr
    inv = vmlabdir / "inventory"
    # node1 (the guest) also serves as a delegate node: its delegate runs under systemd
    (inv / "vm-delegate.ini").write_text("[delegate_nodes]\nnode1\n")
    # the guest installs a snapshot of this checkout (what the common role packs from it),
    # so that edits made to the checkout while the test runs do not count as changes
    snapshot = tmp_path / "checkout"
    for item in ("pyproject.toml", "README.md", "testbed", "analysis", "kmod"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, snapshot / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            snapshot.mkdir(exist_ok=True)
            shutil.copy2(src, snapshot / item)
    (inv / "group_vars" / "vm_nodes" / "snapshot.yml").write_text(
        f"common_source_dir: {json.dumps(str(snapshot))}\n"
    )

    # site.yml as for real hosts: the testbed from this checkout, mktrace with DKMS
    first = tb("provision", "-i", str(inv), "site.yml", "--json", str(tmp_path / "s1.json"),
               timeout=1200)  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr
    assert "loaded mktrace (" in first.stdout and "/dev/mktrace ready on node1" in first.stdout
    assert "Add, build and install the module with DKMS" in first.stdout
    assert "delegate on node1 (systemd, user testbed-delegate, CURVE)" in first.stdout
    assert "delegate on node2 (supervised," in first.stdout
    assert all(h["failed"] == 0 for h in _summary(tmp_path / "s1.json").values())
    second = tb("provision", "-i", str(inv), "site.yml", "--json", str(tmp_path / "s2.json"),
                timeout=1200)  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr
    hosts = _summary(tmp_path / "s2.json")
    assert set(hosts) == {"node1", "node2"}
    assert all(h["changed"] == 0 and h["failed"] == 0 for h in hosts.values()), hosts
    probe = _ssh(vmlabdir, "node1", "lsmod | grep -c '^mktrace '; test -c /dev/mktrace && "
                 "echo dev-ok; dkms status mktrace; /opt/testbed/venv/bin/python -c "
                 "'import testbed; print(testbed.__file__)'")  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.startswith("1\ndev-ok\n") and "installed" in probe.stdout
    assert "/opt/testbed/venv/" in probe.stdout  # installed from the controller's checkout

    # the three mechanisms of the comparison in one Ansible run, forwarding to node2
    results = tmp_path / "results"
    plans = [str(PLANS / "lab-kmod.yml"), str(PLANS / "lab-seccomp.yml")]
    extra = json.dumps({"experiment_plans": plans, "experiment_results_root": str(results),
                        "experiment_delegate_hosts": ["node2"]})  # fmt: skip
    exp = tb("provision", "-i", str(inv), "experiment.yml", "-e", extra, timeout=1200)
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr
    expected = {
        "lab-kmod": {("node2", "kmod", "cost"), ("kthread", "kmod", "kthread")},
        "lab-seccomp": {("node2", "seccomp", "cost")},
    }
    for plan, mechanisms in expected.items():
        runs = sorted((results / plan / "node1").glob("gzip.read+write.*.r*"))
        assert len(runs) == 3 * len(mechanisms), runs
        seen = set()
        for run in runs:
            meta = json.loads((run / "run.json").read_text())
            cell = json.loads((run / "experiment.json").read_text())
            seen.add((run.name.split(".")[2], meta["backend"], meta["mode"]))
            assert cell["output_matches_native"], run
            assert cell["output_sha256"] == cell["native_output_sha256"]
            assert meta["host"]["hostname"] == "node1"
        assert seen == mechanisms
    report = tmp_path / "report"
    ana = tb("analyze", str(results / "lab-kmod"), str(results / "lab-seccomp"), "-o", str(report))
    assert ana.returncode == 0, ana.stderr
    text = (report / "report.md").read_text()
    for label in ("kmod-kthread/same-node", "kmod/libzmq-curve-tcp/remote",
                  "seccomp/libzmq-curve-tcp/remote"):  # fmt: skip
        assert f"| node1 | {label} | 3 |" in text, label

    # the systemd unit: active, and restarted by systemd after kill -9 of the delegate
    def unit() -> tuple[str, int, int]:
        out = _ssh(vmlabdir, "node1", "systemctl is-active testbed-delegate; systemctl show "
                   "-p MainPID -p NRestarts --value testbed-delegate").stdout.split()  # fmt: skip
        if len(out) != 3:
            return "unknown", 0, 0
        return out[0], int(out[1]), int(out[2])

    state, pid, restarts = unit()
    assert state == "active" and pid > 0, (state, pid)
    owner = _ssh(vmlabdir, "node1", f"ps -o user= -p {pid}").stdout.strip()
    assert owner.startswith("testbed"), owner  # serving as the unprivileged user
    assert _ssh(vmlabdir, "node1", f"kill -9 {pid}").returncode == 0
    deadline = time.monotonic() + 60
    while True:
        state, new_pid, new_restarts = unit()
        if state == "active" and new_pid not in (0, pid) and new_restarts > restarts:
            break
        assert time.monotonic() < deadline, (state, new_pid, new_restarts)
        time.sleep(1)

    down = tb("lab", "down", "--dir", str(vmlabdir))
    assert down.returncode == 0, down.stderr
    assert not vmlabdir.exists()


# ---------------------------------------------------------------- unit


@pytest.mark.unit
def test_config_disk_carries_the_node_identity(tmp_path):
    path = tmp_path / "config.tar"
    nodeimage.config_disk(
        path, hostname="node3", machine_id="ab" * 16, mac="52:54:12:34:00:03",
        address="10.213.61.3/24", host_key=b"PRIVATE\n", host_key_pub=b"ssh-ed25519 AAAA x\n",
        authorized_keys=b"ssh-ed25519 BBBB lab\n",
    )  # fmt: skip
    data = path.read_bytes()
    assert len(data) % 512 == 0  # a block device QEMU accepts
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        read = {n: tar.extractfile(m).read().decode() for n, m in members.items() if m.isfile()}
    assert read["etc/hostname"] == "node3\n"
    assert members["etc/ssh/ssh_host_ed25519_key"].mode == 0o600
    assert members["root/.ssh"].isdir() and members["root/.ssh"].mode == 0o700
    assert read["root/.ssh/authorized_keys"] == "ssh-ed25519 BBBB lab\n"
    net = read["etc/systemd/network/10-lab.network"]
    assert "MACAddress=52:54:12:34:00:03" in net and "Address=10.213.61.3/24" in net
    assert "Gateway" not in net  # nothing routed beyond the lab
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())


@pytest.mark.unit
def test_node_macs_are_local_and_distinct():
    macs = {vmnode.node_mac("ab12", i) for i in range(1, 300)}
    assert len(macs) == 299
    assert all(m.startswith("52:54:ab:12:") for m in macs)
    assert vmnode.node_mac("ab12", 1) != vmnode.node_mac("ab13", 1)


@pytest.mark.unit
def test_image_key_follows_the_package_set():
    kernel = Kernel("6.1.0-99-amd64", Path("/nonexistent"), Path("/nonexistent"))
    key = nodeimage.image_key(kernel)
    assert key == nodeimage.image_key(kernel, reversed(nodeimage.NODE_PACKAGES))
    assert key != nodeimage.image_key(kernel, (*nodeimage.NODE_PACKAGES, "dkms"))
    other = Kernel("6.1.0-98-amd64", Path("/nonexistent"), Path("/nonexistent"))
    assert key != nodeimage.image_key(other)


@pytest.mark.unit
def test_inventory_puts_vm_nodes_in_the_usual_groups(tmp_path):
    state = {
        "id": "ab12", "delegates": 1,
        "nodes": [
            {"name": "node1", "kind": "vm", "address": "10.0.0.1"},
            {"name": "node2", "kind": "netns", "address": "10.0.0.2"},
            {"name": "node3", "kind": "netns", "address": "10.0.0.3"},
        ],
    }  # fmt: skip
    inv = lab._write_inventory(tmp_path, state)
    hosts = (inv / "hosts.ini").read_text()
    assert "[compute_nodes]\nnode1 ansible_host=10.0.0.1\nnode2 ansible_host=10.0.0.2" in hosts
    assert "[delegate_nodes]\nnode3 ansible_host=10.0.0.3" in hosts
    assert "[vm_nodes]\nnode1\n" in hosts
    vm_vars = (inv / "group_vars" / "vm_nodes" / "lab.yml").read_text()
    assert 'ansible_python_interpreter: "/usr/bin/python3"' in vm_vars
    assert 'testbed_node_kind: "vm"' in vm_vars
    # a lab without VM nodes has no vm_nodes group
    state["nodes"] = state["nodes"][1:]
    inv2 = lab._write_inventory(tmp_path / "b", state)
    assert "vm_nodes" not in (inv2 / "hosts.ini").read_text()


@pytest.mark.unit
def test_vm_nodes_are_provisioned_offline_like_real_hosts(tmp_path):
    kernel = Kernel("6.1.0-99-amd64", Path("/nonexistent"), Path("/nonexistent"))
    packages = nodeimage.lab_packages(kernel, ("strace",))
    assert "linux-headers-6.1.0-99-amd64" in packages and "dkms" in packages
    assert {"python3-zmq", "python3-msgpack", "python3-numpy", "python3-yaml"} <= set(packages)
    assert set(nodeimage.NODE_PACKAGES) <= set(packages) and "strace" in packages
    assert not {"python3-pandas", "python3-scipy", "python3-matplotlib"} & set(packages)
    state = {"id": "ab12", "delegates": 1, "nodes": [
        {"name": "node1", "kind": "vm", "address": "10.0.0.1"},
        {"name": "node2", "kind": "netns", "address": "10.0.0.2"},
    ]}  # fmt: skip
    inv = lab._write_inventory(tmp_path, state)
    vm_vars = yaml.safe_load((inv / "group_vars" / "vm_nodes" / "lab.yml").read_text())
    all_vars = yaml.safe_load((inv / "group_vars" / "all" / "lab.yml").read_text())
    assert all_vars["common_install_method"] == "shared"  # namespace nodes: unchanged
    assert vm_vars["common_install_method"] == "venv" and vm_vars["common_packages_debian"] == []
    assert "--no-index" in vm_vars["common_pip_extra_args"]
    # the guest has its own file system and users: the roles' defaults, not the lab dir's
    for key in ("delegate_state_dir", "delegate_relay_keys_dir", "experiment_remote_dir"):
        assert not vm_vars[key].startswith(str(tmp_path)), key
    assert vm_vars["delegate_user"] == "testbed-delegate"


@pytest.mark.unit
def test_more_vm_nodes_than_nodes_is_refused(tmp_path):
    with pytest.raises(lab.LabError, match="--vm-nodes 3"):
        lab.lab_up(tmp_path / "lab", 2, SUBNET, 1, vm_nodes=3)
    assert not (tmp_path / "lab").exists()


@pytest.mark.unit
def test_experiment_plans_and_results_root_become_absolute(tmp_path, monkeypatch):
    from testbed.cluster.provision import parse_extra_vars  # lazy: the provision CLI, only here

    monkeypatch.chdir(tmp_path)
    out = parse_extra_vars(["experiment_plans=a.yml,sub/b.yml", "experiment_results_root=res"])
    assert out["experiment_plans"] == [str(tmp_path / "a.yml"), str(tmp_path / "sub" / "b.yml")]
    assert out["experiment_results_root"] == str(tmp_path / "res")
    listed = parse_extra_vars(['{"experiment_plans": ["c.yml", "/abs/d.yml"]}'])
    assert listed["experiment_plans"] == [str(tmp_path / "c.yml"), "/abs/d.yml"]
