"""Where a measurement was taken: stamped into every run directory."""

from __future__ import annotations

import os
import platform
import socket
import sys
from importlib import metadata


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


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def host_metadata() -> dict:
    """Kernel, CPU, core count, software versions, host name and clock source."""
    try:
        import zmq

        libzmq = zmq.zmq_version()
    except ImportError:  # pragma: no cover - pyzmq is a hard dependency
        libzmq = None
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
        "pyzmq": _version("pyzmq"),
        "libzmq": libzmq,
        "msgpack": _version("msgpack"),
        "testbed": _version("delegation-testbed"),
    }
