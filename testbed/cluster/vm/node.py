"""A lab VM node: one QEMU/TCG guest on a tap device of the lab's bridge.

The guest boots Debian's kernel (:func:`~testbed.cluster.vm.image.boot_image`) with
the node initramfs, its own copy-on-write overlay of the cached base image as
``/dev/vda`` and its config disk as ``/dev/vdb`` (:mod:`~testbed.cluster.vm.nodeimage`).
QEMU runs daemonized (``-daemonize -pidfile``): it outlives ``testbed lab up`` and
belongs to no caller's process tree; ``testbed lab down`` ends it with
:func:`stop_node` after checking, by its command line, that the process is still
the one the lab started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.cluster.vm.boot import _memory
from testbed.cluster.vm.image import boot_image
from testbed.cluster.vm.kernel import Kernel, find_qemu
from testbed.cluster.vm.nodeimage import node_initramfs
from testbed.core.errors import TestbedError

#: Kernel command line of a node: serial console, systemd as init (the initramfs's
#: ``switch_root``), no time wasted on mitigations under TCG; a panic ends QEMU.
NODE_KERNEL_ARGS = (
    "console=ttyS0 panic=-1 quiet loglevel=4 no_timer_check mitigations=off "
    "softlockup_panic=1 net.ifnames=0 systemd.show_status=0"
)
NODE_MEMORY = "1G"
NODE_CPUS = 1


@dataclass
class NodeVM:
    """Where a node's QEMU keeps its files and how it reaches the bridge."""

    name: str
    node_dir: Path
    tap: str
    mac: str

    @property
    def overlay(self) -> Path:
        return self.node_dir / "disk.qcow2"

    @property
    def config(self) -> Path:
        return self.node_dir / "config.tar"

    @property
    def pidfile(self) -> Path:
        return self.node_dir / "qemu.pid"

    @property
    def console(self) -> Path:
        return self.node_dir / "console.log"


def _run(cmd: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise TestbedError(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"{' '.join(cmd)}: timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise TestbedError(f"{' '.join(cmd)}: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return proc


def node_mac(lab_id: str, index: int) -> str:
    """A locally administered MAC from QEMU's range, unique per lab and node."""
    a, b = int(lab_id[:2], 16), int(lab_id[2:4], 16)
    return f"52:54:{a:02x}:{b:02x}:{(index >> 8) & 0xFF:02x}:{index & 0xFF:02x}"


def add_tap(tap: str, bridge: str) -> None:
    """A persistent tap device enslaved to ``bridge`` and up (QEMU attaches by name)."""
    _run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
    try:
        _run(["ip", "link", "set", tap, "master", bridge])
        _run(["ip", "link", "set", tap, "up"])
    except TestbedError:
        delete_tap(tap)
        raise


def delete_tap(tap: str) -> bool:
    """Remove ``tap`` if it exists; whether it did."""
    if not Path(f"/sys/class/net/{tap}").exists():
        return False
    _run(["ip", "link", "del", tap])
    return True


def create_overlay(base: Path, overlay: Path) -> None:
    """A qcow2 copy-on-write overlay of the (read-only, raw) base image."""
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(overlay)])


def start_node(vm: NodeVM, kernel: Kernel, memory: str = NODE_MEMORY, cpus: int = NODE_CPUS) -> int:
    """Start the node's QEMU (daemonized); its pid.  The overlay, config disk and tap
    must exist."""
    argv = [
        find_qemu(), "-nodefaults", "-no-user-config", "-name", vm.name,
        "-accel", "tcg", "-cpu", os.environ.get("TESTBED_VM_CPU", "max"),
        "-smp", str(cpus), "-m", _memory(memory), "-display", "none", "-monitor", "none",
        "-no-reboot", "-kernel", str(boot_image(kernel)), "-initrd", str(node_initramfs(kernel)),
        "-append", NODE_KERNEL_ARGS,
        "-drive", f"file={vm.overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
        "-drive", f"file={vm.config},if=virtio,format=raw,readonly=on",
        "-netdev", f"tap,id=n0,ifname={vm.tap},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=n0,mac={vm.mac}",
        "-device", "virtio-rng-pci",
        "-serial", f"file:{vm.console}",
        "-daemonize", "-pidfile", str(vm.pidfile),
    ]  # fmt: skip
    for path in (vm.overlay, vm.config, vm.node_dir):
        if "," in str(path):
            raise TestbedError(f"{path}: a comma in a path QEMU parses (choose another --dir)")
    with open(vm.node_dir / "qemu.log", "wb") as log:
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=60)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise TestbedError(f"QEMU of {vm.name} did not daemonize within 60 s") from None
    if proc.returncode != 0:
        tail = (vm.node_dir / "qemu.log").read_text(errors="replace").strip().splitlines()
        raise TestbedError(f"QEMU of {vm.name} failed: {tail[-1] if tail else proc.returncode}")
    try:
        return int(vm.pidfile.read_text().strip())
    except (OSError, ValueError):
        raise TestbedError(f"QEMU of {vm.name} wrote no pid to {vm.pidfile}") from None


def node_alive(pid: int | None, overlay: str | os.PathLike) -> bool:
    """Whether ``pid`` is (still) the QEMU running ``overlay`` (and not a zombie)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
    except OSError:
        return False
    return any(str(overlay).encode() in arg for arg in cmdline)


def stop_node(pid: int | None, overlay: str | os.PathLike, grace: float = 5.0) -> bool:
    """End the node's QEMU (SIGTERM, SIGKILL after ``grace`` s); whether one was running.
    A pid that no longer runs ``overlay`` is someone else's and is left alone."""
    if not node_alive(pid, overlay):
        return False
    assert pid is not None
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while node_alive(pid, overlay) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not node_alive(pid, overlay):
            break
    return True


def console_tail(vm_console: Path, lines: int = 5) -> str:
    """The last lines of a node's serial console (for error messages)."""
    try:
        text = vm_console.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) or "(empty console)"
