"""The guest's initramfs: busybox, ``kmod/vm/init.sh`` and the share drivers, as cpio.

The guest's file-system layout (where the shares appear) is defined here and
in ``kmod/vm/init.sh``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path

from testbed.cluster.vm.kernel import Kernel, cache_dir, find_busybox
from testbed.core.errors import TestbedError

#: Where the results share appears inside the guest.
RESULTS_DIR = "/mnt/results"
#: Where the read-only 9p view of the host root appears inside the guest.
HOSTROOT_DIR = "/run/testbed-vm/hostroot"
#: Modules the initramfs loads (with their modules.dep closure), in this order.
#: Optional ones are skipped when the kernel lacks them or has them built in.
INITRAMFS_MODULES = (
    ("virtio_pci", True),
    ("9pnet_virtio", True),
    ("9p", True),
    ("overlay", False),
    ("virtio_net", False),
    ("virtio_rng", False),
)
SENTINEL = "TESTBED-VM-EXIT-STATUS"
INITRAMFS_FORMAT = 1  # bump when the initramfs layout changes (part of the cache key)
_MSIZE = 262144
_INIT_TEMPLATE = Path(__file__).resolve().parents[3] / "kmod" / "vm" / "init.sh"


def _read_modules_dep(kernel: Kernel) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (relative path, [relative paths of its dependencies])."""
    table = {}
    for line in (kernel.modules_dir / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        table[name] = (path, deps.split())
    return table


def _builtin_modules(kernel: Kernel) -> set[str]:
    path = kernel.modules_dir / "modules.builtin"
    if not path.is_file():
        return set()
    return {
        Path(line).name.split(".ko")[0].replace("-", "_") for line in path.read_text().splitlines()
    }


def module_closure(kernel: Kernel, wanted: Iterable[tuple[str, bool]]) -> list[str]:
    """Relative module paths for ``wanted`` plus dependencies, dependencies first.

    ``wanted`` holds ``(name, required)`` pairs; a required module that is neither
    in ``modules.dep`` nor built in raises :class:`TestbedError`.
    """
    table = _read_modules_dep(kernel)
    builtin = _builtin_modules(kernel)
    order: list[str] = []
    for name, required in wanted:
        key = name.replace("-", "_")
        if key not in table:
            if required and key not in builtin:
                raise TestbedError(f"kernel {kernel.version} has no module {name}")
            continue
        path, deps = table[key]
        # modules.dep lists the full closure with the deepest dependency last.
        for rel in [*reversed(deps), path]:
            if rel not in order:
                order.append(rel)
    return order


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if not zstd:
            raise TestbedError(f"{path} is zstd-compressed: install zstd")
        return subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


class Cpio:
    """Minimal writer for the ``newc`` cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        head = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(head + name.encode() + b"\0")
        self.buf.write(b"\0" * (-(len(head) + len(name) + 1) % 4))
        self.buf.write(data + b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _init_script() -> str:
    try:
        text = _INIT_TEMPLATE.read_text()
    except OSError as exc:
        raise TestbedError(f"VM init template missing: {_INIT_TEMPLATE} ({exc.strerror})") from None
    return (
        text.replace("@SENTINEL@", SENTINEL)
        .replace("@MSIZE@", str(_MSIZE))
        .replace("@RESULTS_DIR@", RESULTS_DIR)
    )


def build_initramfs(kernel: Kernel, hostroot_cache: str = "loose") -> Path:
    """Build (or reuse from the cache) the initramfs for ``kernel``; return its path."""
    if hostroot_cache not in ("loose", "none", "mmap"):
        raise TestbedError(f"unknown 9p cache mode {hostroot_cache!r} (loose, none, mmap)")
    init = _init_script().replace("@HOSTROOT_CACHE@", f"cache={hostroot_cache}")
    busybox = find_busybox()
    modules = module_closure(kernel, INITRAMFS_MODULES)
    digest = hashlib.sha256()
    for part in (str(INITRAMFS_FORMAT), init, kernel.version, *modules):
        digest.update(part.encode() + b"\0")
    digest.update(str(busybox.stat().st_size).encode())
    cache = cache_dir()
    target = cache / f"initramfs-{kernel.version}-{digest.hexdigest()[:16]}.cpio"
    if target.is_file():
        return target
    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot", "ctl"):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", init.encode(), 0o755)
    names = []
    for rel in modules:
        name = Path(rel).name.split(".ko")[0] + ".ko"
        cpio.file(f"modules/{name}", module_bytes(kernel.modules_dir / rel))
        names.append(name)
    cpio.file("modules/order", ("\n".join(names) + "\n").encode())
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(cpio.finish())
    os.replace(tmp, target)
    return target
