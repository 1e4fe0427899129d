"""A local lab: N network-namespace "nodes" on one machine, reached over real SSH.

``testbed lab up --nodes N`` creates, on a private /24 (default 10.213.47.0/24):

* a Linux bridge ``tblab<ID>`` in the root namespace holding ``.254`` (the
  controller's address on the lab network);
* N network namespaces ``tblab-<ID>-node<i>``, each with a veth ``eth0`` on the
  bridge and the address ``.i``;
* an ``sshd`` in each namespace with lab-generated host keys and its own
  config, listening only on that node's address, accepting root with the lab's
  client key, in a UTS namespace of its own whose host name is the node's name
  (so runs made there are stamped ``node1``, ``node2``, not the machine's name);
* an Ansible inventory (``node1..N``; the last ``--delegates`` nodes in
  ``delegate_nodes``, the others in ``compute_nodes``) and an ``ssh_config``.

With ``--vm-nodes K`` the first K nodes are QEMU/TCG guests instead of namespaces
(:mod:`testbed.cluster.vm.node`): Debian's kernel, a Debian userland with systemd
as PID 1 from a cached base image (:mod:`testbed.cluster.vm.nodeimage`), a
copy-on-write overlay per node, a tap device ``tbl<ID>t<i>`` on the bridge and the
same static address, host key and authorized key a namespace node would get.  They
are ordinary hosts of the same inventory (also in the group ``vm_nodes``, whose
variables point Ansible at the guest's own ``/usr/bin/python3``).  They share
nothing with the host: no file system, no users.

Everything it creates is recorded in ``state.json`` in the lab directory
(``/run/testbed-lab`` by default, ``--dir`` or ``$TESTBED_LAB_DIR`` otherwise),
so ``status`` and ``down`` find it.  ``down`` kills every process living in the
lab's namespaces (sshd, delegates started by Ansible, ...), deletes the
namespaces and the bridge, closes the SSH control masters the controller kept
towards the nodes and removes the lab directory.  It only deletes a namespace
whose identity (nsfs inode) matches the one recorded when the lab created it.

The nodes share the host's file system and users (only the network is
separate): the same Python and the same testbed checkout (each sshd sets
``PYTHONPATH`` to it).  Per-node state therefore lives under
``<lab dir>/state/<node>``; the delegate's service user is the lab's own
(``testbed-lab-<ID>``, removed by ``down`` if teardown.yml did not).
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from testbed.cluster.netns import (
    NetnsError,
    add_namespace,
    add_veth,
    kill_namespace_pids,
    namespace_inode,
    namespace_pids,
    parse_rate,
    pid_alive,
    shape_link,
)
from testbed.cluster.vm import node as vmnode
from testbed.cluster.vm.kernel import Kernel, find_kernel
from testbed.cluster.vm.nodeimage import base_image, config_disk, lab_packages, missing_tools
from testbed.core.errors import TestbedError

LAB_STATE_VERSION = 1
DEFAULT_DIR = "/run/testbed-lab"
DEFAULT_SUBNET = "10.213.47.0/24"
SSHD = "/usr/sbin/sshd"
SSH_WAIT_S = 15.0
#: How long a VM node may take from QEMU start to SSH (TCG, several booting at once).
VM_BOOT_WAIT_S = 420.0
PROJECT_DIR = Path(__file__).resolve().parents[2]


class LabError(TestbedError):
    """The lab cannot be created, inspected or removed."""


# ---------------------------------------------------------------- helpers


def lab_dir(path: str | os.PathLike | None = None) -> Path:
    """The lab directory: ``path``, else ``$TESTBED_LAB_DIR``, else /run/testbed-lab."""
    return Path(path or os.environ.get("TESTBED_LAB_DIR") or DEFAULT_DIR).absolute()


def _run(cmd: list[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(cmd)}: timed out after {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"{' '.join(cmd)}: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return proc


def _port_open(addr: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def load_state(directory: Path) -> dict[str, Any] | None:
    """The lab's state (``state.json``) or None when no lab lives in ``directory``."""
    try:
        with open(directory / "state.json") as f:
            state = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"{directory}/state.json: unreadable ({exc})") from None
    if state.get("version") != LAB_STATE_VERSION:
        raise LabError(
            f"{directory}/state.json: lab state version {state.get('version')!r} unknown"
        )
    return state


def _save_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / "state.json.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
        f.write("\n")
    os.replace(tmp, directory / "state.json")


# ---------------------------------------------------------------- checks


def _check_subnet_free(net: ipaddress.IPv4Network) -> None:
    """Refuse a subnet that already has an address or route on this machine."""
    addrs = json.loads(_run(["ip", "-j", "-4", "addr", "show"]).stdout or "[]")
    for link in addrs:
        for info in link.get("addr_info", []):
            if ipaddress.ip_address(info["local"]) in net:
                raise LabError(
                    f"subnet {net} is already in use ({info['local']} on {link['ifname']}); "
                    "choose another with --subnet or bring the other lab down"
                )
    routes = json.loads(_run(["ip", "-j", "-4", "route", "show"]).stdout or "[]")
    for r in routes:
        dst = r.get("dst", "")
        if dst and dst != "default":
            other = ipaddress.ip_network(dst if "/" in dst else dst + "/32", strict=False)
            if other.overlaps(net):
                raise LabError(
                    f"subnet {net} overlaps the route to {dst}; choose another with --subnet"
                )


def _preflight(nodes: int, net: ipaddress.IPv4Network, vm_nodes: int = 0) -> None:
    if os.geteuid() != 0:
        raise LabError("testbed lab needs root (network namespaces, bridge, sshd)")
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found (install iproute2 and openssh-client)")
    if not os.access(SSHD, os.X_OK):
        raise LabError(f"{SSHD} not found (install openssh-server)")
    if net.prefixlen > 29 or nodes > net.num_addresses - 3:
        raise LabError(f"subnet {net} is too small for {nodes} nodes")
    if vm_nodes:
        missing = missing_tools()
        if missing:
            raise LabError(f"VM nodes need {' '.join(missing)} (apt-get install)")
        if not os.path.exists("/dev/net/tun"):
            raise LabError("VM nodes need /dev/net/tun (tap devices)")
    _check_subnet_free(net)


# ---------------------------------------------------------------- up


def _keygen(path: Path, comment: str) -> str:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return (
        (path.with_suffix(".pub") if path.suffix else Path(str(path) + ".pub")).read_text().strip()
    )


def _sshd_config(node_dir: Path, addr: str, directory: Path) -> str:
    return "\n".join(
        [
            "# sshd of a testbed lab node (generated by testbed lab up)",
            f"ListenAddress {addr}:22",
            f"HostKey {node_dir}/ssh_host_ed25519_key",
            f"PidFile {node_dir}/sshd.pid",
            f"AuthorizedKeysFile {directory}/authorized_keys",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PrintMotd no",
            "UseDNS no",
            "MaxStartups 64:30:128",
            "MaxSessions 64",
            "Subsystem sftp internal-sftp",
            # the nodes run this checkout, whatever else the shared Python has installed
            f"SetEnv PYTHONPATH={PROJECT_DIR}",
            "",
        ]
    )


def _start_sshd(ns: str, node_dir: Path, name: str) -> int:
    """sshd in the node's network namespace and in a UTS namespace of its own whose host
    name is the node's: every run stamps ``host.hostname`` = node1, node2, ..."""
    cfg = node_dir / "sshd_config"
    _run(["ip", "netns", "exec", ns, SSHD, "-t", "-f", str(cfg)])
    _run(["ip", "netns", "exec", ns, "unshare", "--uts", "--", "sh", "-c",
          'hostname "$1" && exec "$2" -f "$3" -E "$4"', "sh", name, SSHD, str(cfg),
          str(node_dir / "sshd.log")])  # fmt: skip
    deadline = time.monotonic() + 5.0
    pidfile = node_dir / "sshd.pid"
    while time.monotonic() < deadline:
        try:
            return int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise LabError(f"sshd in {ns} did not write {pidfile} within 5 s (see {node_dir}/sshd.log)")


def _write_ssh_config(directory: Path, nodes: list[dict[str, Any]]) -> None:
    lines = ["# ssh -F this-file node1   (generated by testbed lab up)"]
    for n in nodes:
        lines += [
            f"Host {n['name']} {n['address']}",
            f"  HostName {n['address']}",
            "  User root",
            f"  IdentityFile {directory}/id_ed25519",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {directory}/known_hosts",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 5",
            "",
        ]
    (directory / "ssh_config").write_text("\n".join(lines))


def _write_inventory(directory: Path, state: dict[str, Any]) -> Path:
    inv = directory / "inventory"
    (inv / "group_vars" / "all").mkdir(parents=True, exist_ok=True)
    nodes = state["nodes"]
    n_del = state["delegates"]
    compute, delegates = nodes[: len(nodes) - n_del], nodes[len(nodes) - n_del :]
    lines = [f"# Inventory of the testbed lab {state['id']} (generated by testbed lab up)", ""]
    for group, members in (("compute_nodes", compute), ("delegate_nodes", delegates)):
        lines.append(f"[{group}]")
        lines += [f"{n['name']} ansible_host={n['address']}" for n in members]
        lines.append("")
    lines += ["[lab_nodes:children]", "compute_nodes", "delegate_nodes", ""]
    vms = [n for n in nodes if n.get("kind") == "vm"]
    if vms:
        lines += ["[vm_nodes]", *(n["name"] for n in vms), ""]
        (inv / "group_vars" / "vm_nodes").mkdir(parents=True, exist_ok=True)
        vm_vars = _vm_group_vars()
        body = ["# Variables of the lab's VM nodes (generated by testbed lab up): real hosts",
                "# without a package mirror; see docs/provisioning.md \"VM nodes\""]  # fmt: skip
        body += [f"{k}: {json.dumps(v)}" for k, v in vm_vars.items()]
        (inv / "group_vars" / "vm_nodes" / "lab.yml").write_text("\n".join(body) + "\n")
    (inv / "hosts.ini").write_text("\n".join(lines))
    python = os.path.realpath(sys.executable)
    ssh_args = (
        f"-o UserKnownHostsFile={directory}/known_hosts -o StrictHostKeyChecking=yes "
        f"-o IdentitiesOnly=yes -o ControlMaster=auto -o ControlPersist=60s "
        f"-o ControlPath={directory}/cp/%C"
    )
    group_vars = {
        "ansible_user": "root",
        "ansible_ssh_private_key_file": f"{directory}/id_ed25519",
        "ansible_ssh_common_args": ssh_args,
        "ansible_python_interpreter": python,
        "testbed_lab_dir": str(directory),
        "testbed_node_kind": "netns",
        "common_install_method": "shared",
        "common_python": python,
        "common_source_dir": str(PROJECT_DIR),
        "delegate_state_dir": f"{directory}/state/{{{{ inventory_hostname }}}}/delegate",
        "delegate_listen_address": "{{ ansible_host }}",
        # CURVE (on: the delegate listens beyond loopback) with this lab's own keys
        "delegate_curve_keys_dir": f"{directory}/curve-keys",
        "delegate_relay_keys_dir": f"{directory}/state/{{{{ inventory_hostname }}}}/curve",
        # the nodes share /etc/passwd: a service user of this lab only (lab down removes it)
        "delegate_user": service_user(state),
        "experiment_remote_dir": f"{directory}/state/{{{{ inventory_hostname }}}}/experiment",
    }
    body = ["# Variables of every lab node (generated by testbed lab up); see docs/provisioning.md"]
    body += [f"{k}: {json.dumps(v)}" for k, v in group_vars.items()]
    (inv / "group_vars" / "all" / "lab.yml").write_text("\n".join(body) + "\n")
    return inv


def _vm_group_vars() -> dict[str, Any]:
    """Inventory variables of the group ``vm_nodes``: they override the namespace nodes'
    ``all`` variables with what a real host gets (the roles' own defaults), except that
    the guests have no package mirror: everything ``site.yml`` needs is in the image
    (:func:`~testbed.cluster.vm.nodeimage.lab_packages`), so ``common`` installs no
    distribution package and ``pip`` installs the controller's checkout alone."""
    return {
        "ansible_python_interpreter": "/usr/bin/python3",  # the guest's own
        "testbed_node_kind": "vm",
        "common_install_method": "venv",  # a copy of the controller's checkout, in a venv
        "common_packages_debian": [],  # baked into the image: no mirror to install from
        "common_pip_extra_args": ["--no-deps", "--no-index", "--no-build-isolation"],
        "common_python": "/usr/bin/python3",
        "delegate_state_dir": "/var/lib/testbed-delegate",
        "delegate_relay_keys_dir": "/etc/testbed/curve",
        "delegate_user": "testbed-delegate",
        "experiment_remote_dir": "/var/tmp/testbed-experiment",
    }


def service_user(state: dict[str, Any]) -> str:
    """The delegate's service user in this lab (the nodes share the host's users)."""
    return f"testbed-lab-{state['id']}"


def _remove_service_user(state: dict[str, Any]) -> list[str]:
    """Remove the lab's service user and group if teardown.yml did not (bounded, best effort)."""

    done = []
    name = service_user(state)
    try:
        pwd.getpwnam(name)
        _run(["userdel", name], check=False)
        done.append(f"removed user {name}")
    except KeyError:
        pass
    try:
        grp.getgrnam(name)
        _run(["groupdel", name], check=False)
        done.append(f"removed group {name}")
    except KeyError:
        pass
    return done


def _wait_ssh(directory: Path, node: dict[str, Any]) -> None:
    deadline = time.monotonic() + SSH_WAIT_S
    while not _port_open(node["address"], 22):
        if time.monotonic() > deadline:
            raise LabError(f"sshd of {node['name']} not listening on {node['address']}:22")
        time.sleep(0.1)
    proc = _run(
        ["ssh", "-F", str(directory / "ssh_config"), node["name"], "true"],
        check=False,
        timeout=SSH_WAIT_S,
    )
    if proc.returncode != 0:
        raise LabError(f"cannot ssh to {node['name']}: {proc.stderr.strip()}")


Progress = Callable[[str], None]


def lab_up(
    directory: Path,
    nodes: int,
    subnet: str,
    delegates: int = 1,
    vm_nodes: int = 0,
    progress: Progress | None = None,
    vm_packages: Iterable[str] = (),
    link_rate: str | None = None,
) -> dict[str, Any]:
    """Create the lab; on any failure everything created so far is removed again.

    ``link_rate`` (e.g. ``100mbit``) caps what every node sends on its link with a
    token bucket (``tc tbf``): a what-if bandwidth (docs/whatif.md); namespace nodes
    only.

    The first ``vm_nodes`` nodes are QEMU guests whose image holds
    :func:`~testbed.cluster.vm.nodeimage.lab_packages` (what ``site.yml`` needs
    there: no package mirror reaches them) and ``vm_packages`` (another set is another
    cached image); ``progress`` gets one line per step of building
    their image and booting them."""
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as exc:
        raise LabError(f"--subnet {subnet!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise LabError("--subnet must be an IPv4 network")
    if not 1 <= delegates < nodes + (nodes == 1):
        raise LabError(f"--delegates {delegates}: needs 1 <= delegates < nodes (or 1 node)")
    if not 0 <= vm_nodes <= nodes:
        raise LabError(f"--vm-nodes {vm_nodes}: needs 0 <= vm-nodes <= nodes ({nodes})")
    if link_rate is not None:
        if vm_nodes:
            raise LabError("--link-rate shapes the links of namespace nodes; not with --vm-nodes")
        try:
            parse_rate(link_rate)
        except NetnsError as exc:
            raise LabError(f"--link-rate: {exc}") from None
    existing = load_state(directory)
    if existing is not None:
        raise LabError(
            f"a lab ({existing['id']}, {len(existing['nodes'])} nodes) is already up in {directory}; "
            "run 'testbed lab down' first"
        )
    _preflight(nodes, net, vm_nodes)
    lab_id = secrets.token_hex(2)
    hosts = list(net.hosts())
    state: dict[str, Any] = {
        "version": LAB_STATE_VERSION,
        "id": lab_id,
        "subnet": str(net),
        "bridge": f"tblab{lab_id}",
        "bridge_address": str(hosts[-1]),
        "bridge_created": False,
        "delegates": min(delegates, nodes),
        "link_rate": link_rate,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nodes": [],
    }
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    for sub in ("cp", "nodes", "state"):
        (directory / sub).mkdir(exist_ok=True)
    _save_state(directory, state)
    try:
        _build(directory, state, nodes, hosts, net.prefixlen, vm_nodes, progress, vm_packages)
    except BaseException:
        lab_down(directory)
        raise
    return state


def _say(progress: Progress | None, text: str) -> None:
    if progress is not None:
        progress(text)


def _build(
    directory: Path,
    state: dict[str, Any],
    count: int,
    hosts: list,
    prefix: int,
    vm_nodes: int = 0,
    progress: Progress | None = None,
    vm_packages: Iterable[str] = (),
) -> None:
    kernel = base = None
    if vm_nodes:
        try:
            kernel = find_kernel()
            base = base_image(kernel, lab_packages(kernel, vm_packages), progress=progress)
        except TestbedError as exc:
            raise LabError(f"VM nodes: {exc}") from None
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    client_pub = _keygen(directory / "id_ed25519", f"testbed-lab-{state['id']}")
    (directory / "authorized_keys").write_text(client_pub + "\n")
    br = state["bridge"]
    _run(["ip", "link", "add", br, "type", "bridge"])
    state["bridge_created"] = True
    _save_state(directory, state)
    _run(["ip", "addr", "add", f"{state['bridge_address']}/{prefix}", "dev", br])
    _run(["ip", "link", "set", br, "up"])
    known = []
    for i in range(1, count + 1):
        name, addr = f"node{i}", str(hosts[i - 1])
        node_dir = directory / "nodes" / name
        node_dir.mkdir(exist_ok=True)
        (directory / "state" / name).mkdir(exist_ok=True)
        host_pub = _keygen(node_dir / "ssh_host_ed25519_key", f"{name}@testbed-lab")
        known.append(f"{addr} {' '.join(host_pub.split()[:2])}")
        if i <= vm_nodes:
            assert kernel is not None and base is not None
            _add_vm_node(directory, state, i, addr, prefix, kernel, base, progress)
            continue
        ns = f"tblab-{state['id']}-node{i}"
        try:
            inode = add_namespace(ns)
        except NetnsError as exc:
            raise LabError(str(exc)) from None
        node: dict[str, Any] = {
            "name": name, "kind": "netns", "netns": ns, "address": addr, "ns_inode": inode
        }  # fmt: skip
        state["nodes"].append(node)
        _save_state(directory, state)
        veth = f"tbl{state['id']}n{i}"
        try:
            add_veth(veth, ns, bridge=br)
        except NetnsError as exc:
            raise LabError(str(exc)) from None
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/{prefix}", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        if state.get("link_rate"):
            try:
                shape_link(ns, state["link_rate"])
            except NetnsError as exc:
                raise LabError(str(exc)) from None
        (node_dir / "sshd_config").write_text(_sshd_config(node_dir, addr, directory))
        node["sshd_pid"] = _start_sshd(ns, node_dir, name)
        _save_state(directory, state)
    (directory / "known_hosts").write_text("\n".join(known) + "\n")
    _write_ssh_config(directory, state["nodes"])
    for node in state["nodes"]:
        if node.get("kind") != "vm":
            _wait_ssh(directory, node)
    _wait_vms(directory, state, progress)
    _write_inventory(directory, state)


def _add_vm_node(
    directory: Path,
    state: dict[str, Any],
    i: int,
    addr: str,
    prefix: int,
    kernel: Kernel,
    base: Path,
    progress: Progress | None,
) -> None:
    """Overlay, config disk, tap and QEMU of VM node ``i`` (recorded before each is made)."""
    name = f"node{i}"
    node_dir = directory / "nodes" / name
    vm = vmnode.NodeVM(
        name, node_dir, tap=f"tbl{state['id']}t{i}", mac=vmnode.node_mac(state["id"], i)
    )
    node: dict[str, Any] = {
        "name": name, "kind": "vm", "address": addr, "tap": vm.tap, "mac": vm.mac,
        "overlay": str(vm.overlay), "console": str(vm.console), "qemu_pid": None,
    }  # fmt: skip
    state["nodes"].append(node)
    _save_state(directory, state)
    key = node_dir / "ssh_host_ed25519_key"
    try:
        config_disk(
            vm.config, hostname=name, machine_id=secrets.token_hex(16), mac=vm.mac,
            address=f"{addr}/{prefix}", host_key=key.read_bytes(),
            host_key_pub=Path(f"{key}.pub").read_bytes(),
            authorized_keys=(directory / "authorized_keys").read_bytes(),
        )  # fmt: skip
        vmnode.create_overlay(base, vm.overlay)
        vmnode.add_tap(vm.tap, state["bridge"])
        node["tap_created"] = True
        _save_state(directory, state)
        node["qemu_pid"] = vmnode.start_node(vm, kernel)
    except TestbedError as exc:
        raise LabError(f"{name}: {exc}") from None
    node["started"] = time.time()
    _save_state(directory, state)
    _say(progress, f"{name}: booting (QEMU pid {node['qemu_pid']}, {addr}, tap {vm.tap})")


def _ssh_ok(directory: Path, node: dict[str, Any]) -> bool:
    proc = _run(["ssh", "-F", str(directory / "ssh_config"), node["name"], "true"],
                check=False, timeout=30)  # fmt: skip
    return proc.returncode == 0


def _wait_vms(directory: Path, state: dict[str, Any], progress: Progress | None) -> None:
    """Wait until every VM node answers SSH (they boot in parallel); progress per node."""
    pending = [n for n in state["nodes"] if n.get("kind") == "vm"]
    if not pending:
        return
    deadline = time.monotonic() + VM_BOOT_WAIT_S
    last_note = time.monotonic()
    while pending:
        for node in list(pending):
            if not vmnode.node_alive(node["qemu_pid"], node["overlay"]):
                tail = vmnode.console_tail(Path(node["console"]))
                raise LabError(f"{node['name']}: QEMU exited while booting (console: {tail})")
            if _port_open(node["address"], 22) and _ssh_ok(directory, node):
                node["boot_seconds"] = round(time.time() - node["started"], 1)
                pending.remove(node)
                _save_state(directory, state)
                _say(progress, f"{node['name']}: ssh up after {node['boot_seconds']} s")
        if not pending:
            break
        if time.monotonic() > deadline:
            names = ", ".join(n["name"] for n in pending)
            tail = vmnode.console_tail(Path(pending[0]["console"]))
            raise LabError(
                f"VM node(s) {names} not reachable over SSH within {VM_BOOT_WAIT_S:.0f} s "
                f"(console of {pending[0]['name']}: {tail})"
            )
        if time.monotonic() - last_note >= 30:
            last_note = time.monotonic()
            waited = time.time() - pending[0]["started"]
            _say(progress, f"waiting for {', '.join(n['name'] for n in pending)} "
                           f"({waited:.0f} s since start)")  # fmt: skip
        time.sleep(1.0)


# ---------------------------------------------------------------- down


def _close_control_masters(directory: Path) -> None:
    cp = directory / "cp"
    if not cp.is_dir():
        return
    for sock in cp.iterdir():
        _run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "lab-node"], check=False, timeout=5)


def lab_down(directory: Path) -> list[str]:
    """Remove the lab in ``directory``; returns what was done (safe to call twice)."""
    state = load_state(directory)
    done: list[str] = []
    if state is None:
        return done
    if os.geteuid() != 0:
        raise LabError("testbed lab down needs root")
    _close_control_masters(directory)
    refused = []
    for node in state["nodes"]:
        if node.get("kind") == "vm":
            done += _remove_vm_node(node)
            continue
        ns = node["netns"]
        inode = namespace_inode(ns)
        if inode is None:
            continue
        if inode != node.get("ns_inode"):
            refused.append(ns)
            continue
        killed = kill_namespace_pids(ns, grace=3.0)  # bounded rounds: processes may fork
        if killed:
            done.append(f"killed {killed} process(es) in {ns}")
        _run(["ip", "netns", "del", ns])
        done.append(f"deleted namespace {ns}")
    br = state.get("bridge")
    if state.get("bridge_created") and br and Path(f"/sys/class/net/{br}").exists():
        _run(["ip", "link", "del", br])
        done.append(f"deleted bridge {br}")
    done += _remove_service_user(state)
    if refused:
        raise LabError(
            f"namespace(s) {', '.join(refused)} were not created by this lab (different identity); "
            f"left untouched, and {directory} kept"
        )
    shutil.rmtree(directory, ignore_errors=True)
    done.append(f"removed {directory}")
    return done


def _remove_vm_node(node: dict[str, Any]) -> list[str]:
    """Stop a VM node's QEMU (only if it still runs the node's overlay) and delete its tap;
    the overlay and config disk go with the lab directory."""
    done = []
    pid = node.get("qemu_pid")
    if not pid:  # interrupted between QEMU's start and the state's update: its pid file
        with contextlib.suppress(OSError, ValueError):
            pid = int((Path(node["overlay"]).parent / "qemu.pid").read_text().strip())
    try:
        if vmnode.stop_node(pid, node["overlay"]):
            done.append(f"stopped QEMU {pid} of {node['name']}")
        if node.get("tap_created") and vmnode.delete_tap(node["tap"]):
            done.append(f"deleted tap {node['tap']}")
    except TestbedError as exc:
        raise LabError(f"{node['name']}: {exc}") from None
    return done


# ---------------------------------------------------------------- status


def lab_status(directory: Path) -> dict[str, Any] | None:
    """The recorded lab plus live facts: namespace present, sshd alive, processes."""
    state = load_state(directory)
    if state is None:
        return None
    for node in state["nodes"]:
        if node.get("kind") == "vm":
            alive = vmnode.node_alive(node.get("qemu_pid"), node["overlay"])
            node["present"] = node["qemu_alive"] = alive
            node["ssh_port_open"] = alive and _port_open(node["address"], 22)
            continue
        present = namespace_inode(node["netns"]) == node.get("ns_inode")
        node["present"] = present
        node["sshd_alive"] = bool(node.get("sshd_pid")) and pid_alive(node["sshd_pid"])
        node["ssh_port_open"] = present and _port_open(node["address"], 22)
        node["processes"] = len(namespace_pids(node["netns"])) if present else 0
    state["inventory"] = str(directory / "inventory")
    return state


# ---------------------------------------------------------------- CLI


def _usage(directory: Path, state: dict[str, Any]) -> str:
    inv = directory / "inventory"
    names = ", ".join(
        f"{n['name']}={n['address']}" + (" (vm)" if n.get("kind") == "vm" else "")
        for n in state["nodes"]
    )
    return "\n".join(
        [
            f"lab {state['id']} up: {len(state['nodes'])} nodes on {state['subnet']} ({names})",
            f"  inventory : {inv}",
            f"  ssh       : ssh -F {directory}/ssh_config node1",
            f"  provision : testbed provision -i {inv} site.yml",
            f"  experiment: testbed provision -i {inv} experiment.yml -e experiment_plan=PLAN",
            "  remove    : testbed lab down"
            + ("" if str(directory) == DEFAULT_DIR else f" --dir {directory}"),
        ]
    )


def main_lab(
    action: str,
    *,
    directory: str | None = None,
    nodes: int = 3,
    subnet: str = DEFAULT_SUBNET,
    delegates: int = 1,
    vm_nodes: int = 0,
    as_json: bool = False,
    link_rate: str | None = None,
) -> int:
    """``testbed lab up|status|down``: do ``action`` on the lab in ``directory``, print, exit status.

    ``nodes``, ``subnet``, ``delegates`` and ``vm_nodes`` are for ``up`` (progress lines
    of VM nodes go to stderr); ``as_json`` for ``status``.
    """
    directory = lab_dir(directory)
    if action == "up":

        def progress(line: str) -> None:
            print(f"lab: {line}", file=sys.stderr, flush=True)

        state = lab_up(directory, nodes, subnet, delegates, vm_nodes, progress,
                       link_rate=link_rate)  # fmt: skip
        print(_usage(directory, state))
        return 0
    if action == "down":
        if load_state(directory) is None:
            print(f"no lab in {directory}: nothing to do")
            return 0
        for line in lab_down(directory):
            print(line)
        return 0
    status = lab_status(directory)
    if as_json:
        print(json.dumps(status, indent=2))
        return 0 if status is not None else 1
    if status is None:
        print(f"no lab in {directory}")
        return 1
    rate = f", links capped at {status['link_rate']} (tc tbf)" if status.get("link_rate") else ""
    print(
        f"lab {status['id']} in {directory}: subnet {status['subnet']}, bridge "
        f"{status['bridge']}{rate}"
    )
    for n in status["nodes"]:
        state = "up" if n["present"] and n["ssh_port_open"] else "DOWN"
        if n.get("kind") == "vm":
            boot = f"  boot-to-ssh {n['boot_seconds']} s" if n.get("boot_seconds") else ""
            print(
                f"  {n['name']:<7} {n['address']:<15} {state:<5} vm    tap {n['tap']}  "
                f"qemu {n['qemu_pid']} {'alive' if n['qemu_alive'] else 'dead'}{boot}"
            )
            continue
        print(
            f"  {n['name']:<7} {n['address']:<15} {state:<5} netns {n['netns']}  "
            f"sshd {'alive' if n['sshd_alive'] else 'dead'}  processes {n['processes']}"
        )
    print(f"  inventory: {status['inventory']}")
    return 0
