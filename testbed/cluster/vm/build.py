"""Build an out-of-tree module on the host against the guest kernel's headers."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from testbed.cluster.vm.kernel import Kernel, find_kernel
from testbed.core.errors import TestbedError

_BUILD_JUNK = ("*.o", "*.ko", "*.mod", "*.mod.c", ".*.cmd", "Module.symvers", "modules.order")


def build_module(
    src: str | os.PathLike,
    kernel: Kernel | None = None,
    *,
    build_dir: str | os.PathLike | None = None,
    timeout: float = 600.0,
) -> list[Path]:
    """Build an out-of-tree module (Kbuild + ``make KDIR=...``) for the guest kernel.

    ``src`` is copied (without build products) to ``build_dir`` (default: a new
    temporary directory, so concurrent builds never share a tree) and built on
    the host with ``make KDIR=<kernel headers> modules``; the host's compiler is
    the one Debian builds its kernel with.  Returns the ``.ko`` files.  The
    guest sees them at the same paths through the shared root.
    """
    kernel = kernel or find_kernel()
    if not kernel.has_headers():
        raise TestbedError(
            f"no headers for kernel {kernel.version} in {kernel.build_dir} "
            f"(install with: apt-get install linux-headers-{kernel.version})"
        )
    src = Path(src).resolve()
    if not (src / "Makefile").is_file():
        raise TestbedError(f"{src} has no Makefile")
    work = Path(build_dir) if build_dir else Path(tempfile.mkdtemp(prefix="testbed-kmod-"))
    shutil.copytree(src, work, ignore=shutil.ignore_patterns(*_BUILD_JUNK), dirs_exist_ok=True)
    try:
        proc = subprocess.run(
            ["make", "-C", str(work), f"KDIR={kernel.build_dir}", "modules"],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except FileNotFoundError:
        raise TestbedError("make not found (apt-get install build-essential)") from None
    except subprocess.TimeoutExpired:
        raise TestbedError(f"module build in {work} took longer than {timeout:g} s") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        errs = [ln for ln in lines if "error" in ln.lower()] or lines[-1:] or ["?"]
        raise TestbedError(f"module build failed for {kernel.version}: {errs[0]}")
    modules = sorted(work.glob("*.ko"))
    if not modules:
        raise TestbedError(f"module build in {work} produced no .ko file")
    return modules
