"""Find what the guest boots on the host: Debian's kernel, its headers, QEMU, busybox.

Also where the harness caches what it derives from them (:func:`cache_dir`).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

from testbed.core.errors import TestbedError

#: Debian packages the harness needs.
PACKAGES = ("qemu-system-x86", "linux-image-amd64", "linux-headers-amd64", "busybox-static")

INSTALL_HINT = "apt-get install " + " ".join(PACKAGES)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel the guest can boot: image, modules directory and release string."""

    version: str
    image: Path
    modules_dir: Path

    @property
    def build_dir(self) -> Path:
        """Kbuild directory (``KDIR``) of the matching headers package."""
        return self.modules_dir / "build"

    def has_headers(self) -> bool:
        return (self.build_dir / "Makefile").is_file()


def _version_key(version: str) -> list[tuple[int, int, str]]:
    return [(1, int(p), "") if p.isdigit() else (0, 0, p) for p in re.split(r"[.\-+~]", version)]


def find_kernel(version: str | None = None) -> Kernel:
    """The newest ``/boot/vmlinuz-*`` with a matching ``/lib/modules/<release>``.

    ``version`` (or ``$TESTBED_VM_KERNEL``) selects one release explicitly.
    Raises :class:`TestbedError` naming the packages to install when none fits.
    """
    version = version or os.environ.get("TESTBED_VM_KERNEL") or None
    candidates = []
    for image in glob.glob("/boot/vmlinuz-*"):
        release = image.removeprefix("/boot/vmlinuz-")
        mods = Path("/lib/modules") / release
        if (mods / "modules.dep").is_file() and (version is None or release == version):
            candidates.append(Kernel(release, Path(image), mods))
    if not candidates:
        which = f"kernel {version}" if version else "a kernel image"
        raise TestbedError(
            f"no bootable guest kernel: need {which} in /boot with modules in /lib/modules "
            f"(install with: {INSTALL_HINT})"
        )
    # Prefer Debian's generic x86-64 flavour, then the newest release.
    candidates.sort(key=lambda k: (k.version.endswith("-amd64"), _version_key(k.version)))
    kernel = candidates[-1]
    if not os.access(kernel.image, os.R_OK):
        raise TestbedError(f"{kernel.image} is not readable: run as root or make it readable")
    return kernel


def find_qemu() -> str:
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        raise TestbedError(f"qemu-system-x86_64 not found (install with: {INSTALL_HINT})")
    return qemu


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP program header."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def find_busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/busybox/busybox-static"):
        path = Path(cand)
        if _is_static_elf(path):
            return path
    raise TestbedError(f"no statically linked busybox found (install with: {INSTALL_HINT})")


def missing_packages() -> list[str]:
    """Names from :data:`PACKAGES` whose files the harness cannot find."""
    missing = []
    if not shutil.which("qemu-system-x86_64"):
        missing.append("qemu-system-x86")
    try:
        kernel = find_kernel()
    except TestbedError:
        missing += ["linux-image-amd64", "linux-headers-amd64"]
    else:
        if not kernel.has_headers():
            missing.append("linux-headers-amd64")
    try:
        find_busybox()
    except TestbedError:
        missing.append("busybox-static")
    return missing


def ensure_packages(install: bool = False) -> Kernel:
    """Find everything the harness needs; with ``install=True`` apt-get what is missing.

    Returns the kernel the guest will boot.
    """
    missing = missing_packages()
    if missing and install:
        if os.geteuid() != 0:
            raise TestbedError(f"installing {' '.join(missing)} needs root ({INSTALL_HINT})")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        ):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                raise TestbedError(f"{' '.join(cmd)} failed: {tail[0]}")
        missing = missing_packages()
    if missing:
        raise TestbedError(
            f"the VM harness needs {' '.join(missing)} (install with: {INSTALL_HINT})"
        )
    find_qemu()
    find_busybox()
    return find_kernel()


def cache_dir() -> Path:
    base = os.environ.get("TESTBED_VM_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "testbed-vm"
