"""A local lab: N network-namespace "nodes" on one machine, reached over real SSH.

``testbed lab up --nodes N`` creates, on a private /24 (default 10.213.47.0/24):

* a Linux bridge ``tblab<ID>`` in the root namespace holding ``.254`` (the
  controller's address on the lab network);
* N network namespaces ``tblab-<ID>-node<i>``, each with a veth ``eth0`` on the
  bridge and the address ``.i``;
* an ``sshd`` in each namespace with lab-generated host keys and its own
  config, listening only on that node's address, accepting root with the lab's
  client key;
* an Ansible inventory (``node1..N``; the last ``--delegates`` nodes in
  ``delegate_nodes``, the others in ``compute_nodes``) and an ``ssh_config``.

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

import argparse
import ipaddress
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from testbed.errors import TestbedError
from testbed.netns import (
    NetnsError,
    add_namespace,
    add_veth,
    kill_namespace_pids,
    namespace_inode,
    namespace_pids,
    pid_alive,
)

LAB_STATE_VERSION = 1
DEFAULT_DIR = "/run/testbed-lab"
DEFAULT_SUBNET = "10.213.47.0/24"
SSHD = "/usr/sbin/sshd"
SSH_WAIT_S = 15.0
PROJECT_DIR = Path(__file__).resolve().parent.parent


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


def _preflight(nodes: int, net: ipaddress.IPv4Network) -> None:
    if os.geteuid() != 0:
        raise LabError("testbed lab needs root (network namespaces, bridge, sshd)")
    for tool in ("ip", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found (install iproute2 and openssh-client)")
    if not os.access(SSHD, os.X_OK):
        raise LabError(f"{SSHD} not found (install openssh-server)")
    if net.prefixlen > 29 or nodes > net.num_addresses - 3:
        raise LabError(f"subnet {net} is too small for {nodes} nodes")
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


def _start_sshd(ns: str, node_dir: Path) -> int:
    cfg = node_dir / "sshd_config"
    _run(["ip", "netns", "exec", ns, SSHD, "-t", "-f", str(cfg)])
    _run(["ip", "netns", "exec", ns, SSHD, "-f", str(cfg), "-E", str(node_dir / "sshd.log")])
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


def service_user(state: dict[str, Any]) -> str:
    """The delegate's service user in this lab (the nodes share the host's users)."""
    return f"testbed-lab-{state['id']}"


def _remove_service_user(state: dict[str, Any]) -> list[str]:
    """Remove the lab's service user and group if teardown.yml did not (bounded, best effort)."""
    import grp
    import pwd

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


def lab_up(directory: Path, nodes: int, subnet: str, delegates: int = 1) -> dict[str, Any]:
    """Create the lab; on any failure everything created so far is removed again."""
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as exc:
        raise LabError(f"--subnet {subnet!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise LabError("--subnet must be an IPv4 network")
    if not 1 <= delegates < nodes + (nodes == 1):
        raise LabError(f"--delegates {delegates}: needs 1 <= delegates < nodes (or 1 node)")
    existing = load_state(directory)
    if existing is not None:
        raise LabError(
            f"a lab ({existing['id']}, {len(existing['nodes'])} nodes) is already up in {directory}; "
            "run 'testbed lab down' first"
        )
    _preflight(nodes, net)
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "nodes": [],
    }
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    for sub in ("cp", "nodes", "state"):
        (directory / sub).mkdir(exist_ok=True)
    _save_state(directory, state)
    try:
        _build(directory, state, nodes, hosts, net.prefixlen)
    except BaseException:
        lab_down(directory)
        raise
    return state


def _build(directory: Path, state: dict[str, Any], count: int, hosts: list, prefix: int) -> None:
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
        name, ns, addr = f"node{i}", f"tblab-{state['id']}-node{i}", str(hosts[i - 1])
        try:
            inode = add_namespace(ns)
        except NetnsError as exc:
            raise LabError(str(exc)) from None
        node: dict[str, Any] = {"name": name, "netns": ns, "address": addr, "ns_inode": inode}
        state["nodes"].append(node)
        _save_state(directory, state)
        veth = f"tbl{state['id']}n{i}"
        try:
            add_veth(veth, ns, bridge=br)
        except NetnsError as exc:
            raise LabError(str(exc)) from None
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/{prefix}", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        node_dir = directory / "nodes" / name
        node_dir.mkdir(exist_ok=True)
        (directory / "state" / name).mkdir(exist_ok=True)
        host_pub = _keygen(node_dir / "ssh_host_ed25519_key", f"{name}@testbed-lab")
        known.append(f"{addr} {' '.join(host_pub.split()[:2])}")
        (node_dir / "sshd_config").write_text(_sshd_config(node_dir, addr, directory))
        node["sshd_pid"] = _start_sshd(ns, node_dir)
        _save_state(directory, state)
    (directory / "known_hosts").write_text("\n".join(known) + "\n")
    _write_ssh_config(directory, state["nodes"])
    for node in state["nodes"]:
        _wait_ssh(directory, node)
    _write_inventory(directory, state)


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


# ---------------------------------------------------------------- status


def lab_status(directory: Path) -> dict[str, Any] | None:
    """The recorded lab plus live facts: namespace present, sshd alive, processes."""
    state = load_state(directory)
    if state is None:
        return None
    for node in state["nodes"]:
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
    names = ", ".join(f"{n['name']}={n['address']}" for n in state["nodes"])
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


def main_lab(args: argparse.Namespace) -> int:
    directory = lab_dir(getattr(args, "dir", None))
    action = args.lab_action
    if action == "up":
        state = lab_up(directory, args.nodes, args.subnet, args.delegates)
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
    if getattr(args, "json", False):
        print(json.dumps(status, indent=2))
        return 0 if status is not None else 1
    if status is None:
        print(f"no lab in {directory}")
        return 1
    print(
        f"lab {status['id']} in {directory}: subnet {status['subnet']}, bridge {status['bridge']}"
    )
    for n in status["nodes"]:
        state = "up" if n["present"] and n["ssh_port_open"] else "DOWN"
        print(
            f"  {n['name']:<7} {n['address']:<15} {state:<5} netns {n['netns']}  "
            f"sshd {'alive' if n['sshd_alive'] else 'dead'}  processes {n['processes']}"
        )
    print(f"  inventory: {status['inventory']}")
    return 0
