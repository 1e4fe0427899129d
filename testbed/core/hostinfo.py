"""Where a measurement was taken: stamped into every run directory."""

from __future__ import annotations

import functools
import os
import platform
import shutil
import socket
import subprocess
import sys


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _clocksource() -> str:
    path = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _detect_virt() -> str | None:
    """``systemd-detect-virt --vm`` (a VM only: in a VM guest sharing the host's root,
    the container check would see the host's /.dockerenv)."""
    exe = shutil.which("systemd-detect-virt")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "--vm"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


@functools.lru_cache(maxsize=1)
def virtualization() -> dict:
    """Whether this machine is a virtual machine, and whether its CPU is emulated.

    ``emulated`` is true under QEMU's TCG (the CPU model says "QEMU TCG CPU", or
    systemd-detect-virt says ``qemu``, which it reports only without hardware
    acceleration): there every instruction, the TLB included, is emulated in
    software, so absolute times are not hardware times.
    """
    cpu = _cpu_model()
    vm = _detect_virt()
    hypervisor = "hypervisor" in _cpu_flags()
    emulated = "TCG" in cpu or vm == "qemu"
    return {
        "virtualised": bool(hypervisor or emulated or (vm and vm != "none")),
        "hypervisor_flag": hypervisor,
        "detect_virt": vm,
        "dmi_vendor": _read("/sys/class/dmi/id/sys_vendor"),
        "dmi_product": _read("/sys/class/dmi/id/product_name"),
        "emulated": emulated,
        "testbed_vm": os.environ.get("TESTBED_VM") == "1",
    }


def host_metadata() -> dict:
    """Kernel, CPU, core count, software versions, host name, clock source, virtualisation."""
    try:
        import zmq  # lazy: pyzmq (its version is recorded); analysis imports this module without it

        libzmq, pyzmq = zmq.zmq_version(), zmq.pyzmq_version()
    except ImportError:  # pragma: no cover - pyzmq is a hard dependency
        libzmq = pyzmq = None
    try:
        import msgpack  # lazy: as pyzmq

        msgpack_version = ".".join(str(x) for x in msgpack.version)
    except ImportError:  # pragma: no cover - msgpack is a hard dependency
        msgpack_version = None
    from testbed import __version__  # lazy: the package imports this module's users

    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "clocksource": _clocksource(),
        "clock": "CLOCK_MONOTONIC (time.monotonic_ns)",
        "python": sys.version.split()[0],
        "pyzmq": pyzmq,
        "libzmq": libzmq,
        "msgpack": msgpack_version,
        "testbed": __version__,
        "virtualization": virtualization(),
    }
