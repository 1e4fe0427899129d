"""The kernel image QEMU loads: the vmlinux inside Debian's bzImage when it has a PVH entry."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
import tempfile
import zlib
from pathlib import Path

from testbed.cluster.vm.kernel import Kernel, cache_dir

_COMPRESSORS = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b\x08", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def _has_pvh_entry(kernel: Kernel) -> bool:
    config = Path("/boot") / f"config-{kernel.version}"
    try:
        return "\nCONFIG_PVH=y\n" in config.read_text()
    except OSError:
        return False


def _decompress_payload(data: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage (xz, gzip or zstd payload), or None."""

    for magic, kind in _COMPRESSORS:
        start = data.find(magic)
        while start != -1:
            try:
                if kind == "xz":
                    out = lzma.LZMADecompressor().decompress(data[start:])
                elif kind == "gzip":
                    out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start:])
                else:
                    zstd = shutil.which("zstd")
                    if not zstd:
                        break
                    out = subprocess.run(
                        [zstd, "-dc"], input=data[start:], capture_output=True
                    ).stdout
            except (lzma.LZMAError, zlib.error, gzip.BadGzipFile):
                out = b""
            if out[:4] == b"\x7fELF":
                return out
            start = data.find(magic, start + 1)
    return None


def boot_image(kernel: Kernel) -> Path:
    """The image QEMU loads: the uncompressed ELF vmlinux when the kernel has a PVH
    entry point (QEMU then jumps straight into it, saving the ~5 s TCG spends
    in firmware and in decompressing the bzImage), else the bzImage itself.
    The vmlinux is extracted once and cached."""
    if os.environ.get("TESTBED_VM_BZIMAGE") or not _has_pvh_entry(kernel):
        return kernel.image
    stat = kernel.image.stat()
    target = cache_dir() / f"vmlinux-{kernel.version}-{stat.st_size}-{int(stat.st_mtime)}"
    if target.is_file():
        return target
    elf = _decompress_payload(kernel.image.read_bytes())
    if elf is None:
        return kernel.image
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".vmlinux-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(elf)
    os.replace(tmp, target)
    return target
