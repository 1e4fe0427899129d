"""Run commands in a QEMU guest booted with Debian's kernel (the kmod VM harness).

The development machines' own kernel cannot load modules, so the kernel module
is built against Debian's ``linux-headers-amd64`` and loaded in a guest running
Debian's ``linux-image-amd64``.  The guest needs no disk image:

* the host root is shared **read-only** over 9p (tag ``hostroot``) and becomes
  the lower layer of an overlayfs whose upper layer is a tmpfs, so the guest
  runs the host's Python, compilers and the (editable) testbed, and may write
  anywhere (``/tmp``, ``/root``, a module build tree) without touching the host;
  the untouched 9p mount is also visible at ``/run/testbed-vm/hostroot``;
* a per-boot control directory (tag ``testbed_ctl``) carries the command in,
  and the command's output and exit status out;
* an optional read-write *results* share (tag ``results``) is mounted at
  :data:`RESULTS_DIR` so tests can get files back.

The initramfs (busybox-static, ``kmod/vm/init.sh`` and the few modules needed to
mount the shares) is built once per kernel and cached.  QEMU always runs with
``-accel tcg`` (``/dev/kvm`` is not usable on the development machines).

Public API: :func:`find_kernel`, :func:`ensure_packages`, :func:`build_module`,
:func:`run`, :class:`Guest`, :class:`VMResult`, :class:`VMFailed`,
:class:`VMTimeout`.  See
``docs/vm.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from testbed.errors import TestbedError

#: Where the results share appears inside the guest.
RESULTS_DIR = "/mnt/results"
#: Where the read-only 9p view of the host root appears inside the guest.
HOSTROOT_DIR = "/run/testbed-vm/hostroot"
#: Debian packages the harness needs.
PACKAGES = ("qemu-system-x86", "linux-image-amd64", "linux-headers-amd64", "busybox-static")
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
#: Kernel command line of every boot.  ``mitigations=off``: under TCG the
#: page-table isolation and speculation barriers of a "vulnerable" emulated CPU
#: only cost time.  ``panic=-1`` with QEMU's ``-no-reboot`` ends QEMU on a panic.
BASE_KERNEL_ARGS = "console=ttyS0 panic=-1 quiet loglevel=4 no_timer_check mitigations=off"
INITRAMFS_FORMAT = 1  # bump when the initramfs layout changes (part of the cache key)
_MSIZE = 262144
_INIT_TEMPLATE = Path(__file__).resolve().parent.parent / "kmod" / "vm" / "init.sh"
_INSTALL_HINT = "apt-get install " + " ".join(PACKAGES)


# ---------------------------------------------------------------- discovery


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
            f"(install with: {_INSTALL_HINT})"
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
        raise TestbedError(f"qemu-system-x86_64 not found (install with: {_INSTALL_HINT})")
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
    raise TestbedError(f"no statically linked busybox found (install with: {_INSTALL_HINT})")


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
            raise TestbedError(f"installing {' '.join(missing)} needs root ({_INSTALL_HINT})")
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
            f"the VM harness needs {' '.join(missing)} (install with: {_INSTALL_HINT})"
        )
    find_qemu()
    find_busybox()
    return find_kernel()


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


# ---------------------------------------------------------------- initramfs


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


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if not zstd:
            raise TestbedError(f"{path} is zstd-compressed: install zstd")
        return subprocess.run([zstd, "-dc", str(path)], capture_output=True, check=True).stdout
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    return data


class _Cpio:
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


def _cache_dir() -> Path:
    base = os.environ.get("TESTBED_VM_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "testbed-vm"


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
    cache = _cache_dir()
    target = cache / f"initramfs-{kernel.version}-{digest.hexdigest()[:16]}.cpio"
    if target.is_file():
        return target
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules", "lower", "rw", "newroot", "ctl"):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.file("init", init.encode(), 0o755)
    names = []
    for rel in modules:
        name = Path(rel).name.split(".ko")[0] + ".ko"
        cpio.file(f"modules/{name}", _module_bytes(kernel.modules_dir / rel))
        names.append(name)
    cpio.file("modules/order", ("\n".join(names) + "\n").encode())
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(cpio.finish())
    os.replace(tmp, target)
    return target


# ---------------------------------------------------------------- kernel image

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
    import gzip
    import zlib

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
    target = _cache_dir() / f"vmlinux-{kernel.version}-{stat.st_size}-{int(stat.st_mtime)}"
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


# ---------------------------------------------------------------- booting


@dataclasses.dataclass
class VMResult:
    """What a guest command produced.

    ``exit_status`` is the command's status (``None`` only when it never
    finished).  ``output`` is its stdout and stderr interleaved, as text;
    ``output_bytes`` the raw bytes.  ``console`` is the guest's serial console
    (kernel and init messages).  ``boot_seconds`` is host time from QEMU start to
    the command starting in the guest; ``seconds`` the whole run.
    """

    exit_status: int | None
    output: str
    output_bytes: bytes = b""
    console: str = ""
    seconds: float = 0.0
    boot_seconds: float | None = None
    rootmode: str = ""
    timed_out: bool = False
    qemu_pid: int | None = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class VMFailed(TestbedError):
    """The guest gave no exit status (QEMU failed, kernel panic...).

    ``.result`` holds what came back: partial output and the whole serial console.
    """

    def __init__(self, message: str, result: VMResult) -> None:
        super().__init__(message)
        self.result = result


class VMTimeout(VMFailed):
    """The guest did not finish in time; QEMU was killed.  ``.result`` has what came back."""


def _memory(value: str | int) -> str:
    text = str(value).strip().upper()
    if not re.fullmatch(r"\d+[MG]?", text):
        raise TestbedError(f"bad guest memory size {value!r} (e.g. 2G or 1024M)")
    if text[-1] not in "MG":
        text += "M"
    megabytes = int(text[:-1]) * (1024 if text[-1] == "G" else 1)
    if megabytes < 256:
        raise TestbedError(f"guest memory {value!r} is too small (at least 256M)")
    return text


def _guest_env(cwd: str, extra: dict[str, str] | None) -> dict[str, str]:
    """PATH/HOME/PYTHONPATH so the host's Python and this project work in the guest."""
    pybin = str(Path(sys.executable).parent)
    project = str(Path(__file__).resolve().parent.parent)
    path = [pybin, "/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    env = {
        "PATH": ":".join(dict.fromkeys(path)),
        "HOME": "/root",
        "USER": "root",
        "LOGNAME": "root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONPATH": project,
        "TESTBED_VM": "1",
        "TESTBED_VM_CWD": cwd,
    }
    env.update(extra or {})
    return env


def _command_script(command: str | Sequence[str], env: dict[str, str]) -> str:
    if isinstance(command, str):
        body = command
    else:
        if not command:
            raise TestbedError("no command given for the guest")
        body = "exec " + shlex.join(command)
    lines = ["# written by testbed.vm"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += [
        'read -r _up _rest < /proc/uptime; echo "$_up" > /run/testbed-vm/ctl/started',
        'cd "$TESTBED_VM_CWD" 2>/dev/null || cd /',
        body,
    ]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hostfwd_rules(hostfwd: Iterable) -> list[str]:
    """Each rule is ``(host_port, guest_port)`` or ``"tcp:127.0.0.1:H-:G"``; loopback only."""
    rules = []
    for rule in hostfwd:
        if isinstance(rule, str):
            text = rule
        else:
            host_port, guest_port = rule
            text = f"tcp:127.0.0.1:{int(host_port)}-:{int(guest_port)}"
        proto, _, rest = text.partition(":")
        if proto not in ("tcp", "udp") or not rest.startswith("127.0.0.1:"):
            raise TestbedError(f"hostfwd rule {text!r}: only tcp/udp on 127.0.0.1 allowed")
        rules.append(text)
    return rules


@dataclasses.dataclass
class _Boot:
    """One running QEMU process and its control directory."""

    proc: subprocess.Popen
    ctl: Path
    started: float

    def read(self, name: str) -> bytes | None:
        try:
            return (self.ctl / name).read_bytes()
        except OSError:
            return None

    def console(self) -> str:
        return (self.read("console.log") or b"").decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def boot_seconds(self) -> float | None:
        with contextlib.suppress(OSError):
            return max(0.0, (self.ctl / "started").stat().st_mtime - self.started)
        return None


def _start(
    command: str | Sequence[str],
    *,
    share: str | os.PathLike | None,
    memory: str | int,
    cpus: int,
    net: bool,
    hostfwd: Iterable,
    cwd: str | None,
    env: dict[str, str] | None,
    kernel: Kernel | None,
    hostroot_cache: str,
    overlay: bool,
    kernel_args: str = "",
    extra_files: dict[str, tuple[bytes, int]] | None = None,
) -> _Boot:
    qemu = find_qemu()
    kernel = kernel or find_kernel()
    initrd = build_initramfs(kernel, hostroot_cache)
    if cpus < 1:
        raise TestbedError("cpus must be >= 1")
    mem = _memory(memory)
    rules = _hostfwd_rules(hostfwd)
    if rules:
        net = True
    if share is not None:
        share = Path(share).resolve()
        if not share.is_dir():
            raise TestbedError(f"results share {share} is not a directory")
    if cwd is None:
        try:
            cwd = os.getcwd()
        except OSError:
            cwd = "/"
    ctl = Path(tempfile.mkdtemp(prefix="testbed-vm-"))
    try:
        settings = {
            "NET": int(bool(net)),
            "RESULTS": int(share is not None),
            "OVERLAY": int(bool(overlay)),
            "VMHOSTNAME": "testbed-vm",
        }
        (ctl / "config").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        (ctl / "cmd.sh").write_text(_command_script(command, _guest_env(cwd, env)))
        for name, (data, mode) in (extra_files or {}).items():
            (ctl / name).write_bytes(data)
            os.chmod(ctl / name, mode)
        cpu_model = os.environ.get("TESTBED_VM_CPU", "max")
        append = f"{BASE_KERNEL_ARGS} {kernel_args}".strip()
        argv = [
            qemu, "-nodefaults", "-no-user-config", "-accel", "tcg", "-cpu", cpu_model,
            "-smp", str(cpus), "-m", mem, "-display", "none", "-monitor", "none",
            "-no-reboot", "-kernel", str(boot_image(kernel)), "-initrd", str(initrd),
            "-append", append, "-serial", f"file:{ctl / 'console.log'}",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={ctl},mount_tag=testbed_ctl,security_model=none,multidevs=remap",
            "-device", "virtio-rng-pci",
        ]  # fmt: skip
        if share is not None:
            argv += [
                "-virtfs",
                f"local,path={str(share).replace(',', ',,')},mount_tag=results,"
                "security_model=none,multidevs=remap",
            ]
        if net:
            netdev = "user,id=n0,restrict=on" + "".join(f",hostfwd={r}" for r in rules)
            argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
        log = open(ctl / "qemu.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        return _Boot(proc, ctl, time.time())
    except BaseException:
        shutil.rmtree(ctl, ignore_errors=True)
        raise


def _result(boot: _Boot, seconds: float, timed_out: bool) -> VMResult:
    status_text = (boot.read("status") or b"").decode().strip()
    console = boot.console()
    status = int(status_text) if status_text.lstrip("-").isdigit() else None
    if status is None:
        match = re.search(rf"{SENTINEL}=(-?\d+)", console)
        status = int(match.group(1)) if match else None
    raw = boot.read("output") or b""
    return VMResult(
        exit_status=status,
        output=raw.decode("utf-8", "replace"),
        output_bytes=raw,
        console=console,
        seconds=seconds,
        boot_seconds=boot.boot_seconds(),
        rootmode=(boot.read("rootmode") or b"").decode().strip(),
        timed_out=timed_out,
        qemu_pid=boot.proc.pid,
    )


def _failure_hint(boot: _Boot) -> str:
    fatal = (boot.read("fatal") or b"").decode(errors="replace").strip()
    if fatal:
        return fatal
    qlog = (boot.read("qemu.log") or b"").decode(errors="replace").strip().splitlines()
    if qlog:
        return "qemu: " + qlog[-1]
    lines = [ln for ln in boot.console().splitlines() if ln.strip()]
    return "console: " + (lines[-1] if lines else "(empty)")


def run(
    command: str | Sequence[str],
    *,
    timeout: float = 300.0,
    share: str | os.PathLike | None = None,
    memory: str | int = "2G",
    cpus: int = 2,
    net: bool = False,
    hostfwd: Iterable = (),
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    kernel: Kernel | None = None,
    hostroot_cache: str = "loose",
    overlay: bool = True,
    kernel_args: str = "",
) -> VMResult:
    """Boot a guest, run ``command`` as root, power off; return its output and status.

    ``command`` is a shell script (str, run by ``/bin/sh``) or an argv list.  It
    runs in ``cwd`` (default: the caller's working directory, seen through the
    shared root) with the host's Python first on ``PATH`` and this project on
    ``PYTHONPATH``; ``env`` adds variables.  ``share`` is a host directory mounted
    read-write at :data:`RESULTS_DIR`.  ``net=True`` adds a NIC (10.0.2.15/24 via
    QEMU user networking, restricted: the guest reaches nothing outside);
    ``hostfwd`` rules ``(host_port, guest_port)`` forward 127.0.0.1 ports into it.
    ``kernel_args`` are appended to :data:`BASE_KERNEL_ARGS` (later ones win,
    e.g. ``"mitigations=auto"``).

    On timeout QEMU is killed and :class:`VMTimeout` (a :class:`TestbedError`) is
    raised with ``.result`` holding the partial output.  A guest that stops
    without reporting a status (QEMU error, kernel panic) raises
    :class:`VMFailed` (also a :class:`TestbedError`, also with ``.result``).
    """
    t0 = time.monotonic()
    boot = _start(
        command, share=share, memory=memory, cpus=cpus, net=net, hostfwd=hostfwd, cwd=cwd,
        env=env, kernel=kernel, hostroot_cache=hostroot_cache, overlay=overlay,
        kernel_args=kernel_args,
    )  # fmt: skip
    try:
        try:
            boot.proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        boot.kill()
        result = _result(boot, time.monotonic() - t0, timed_out)
        if timed_out:
            raise VMTimeout(f"guest command did not finish within {timeout:g} s", result)
        if result.exit_status is None:
            raise VMFailed(f"guest stopped without an exit status ({_failure_hint(boot)})", result)
        return result
    finally:
        boot.kill()
        shutil.rmtree(boot.ctl, ignore_errors=True)


# ---------------------------------------------------------------- long-lived guest


_SSHD_CONFIG = """\
# private sshd configuration of a testbed VM guest (tmpfs, never the host's)
Port 22
ListenAddress 0.0.0.0
HostKey {d}/ssh_host_ed25519_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes yes
PrintMotd no
UseDNS no
X11Forwarding no
AcceptEnv LANG LC_*
SetEnv {env}
Subsystem sftp internal-sftp
"""

_GUEST_SCRIPT = """\
D=/run/testbed-vm/sshd
mkdir -p "$D" /run/sshd
chmod 700 "$D"
cp /run/testbed-vm/ctl/ssh_host_ed25519_key /run/testbed-vm/ctl/authorized_keys \
   /run/testbed-vm/ctl/sshd_config "$D"/
chmod 600 "$D"/ssh_host_ed25519_key "$D"/authorized_keys "$D"/sshd_config
# sshd refuses key logins for locked accounts when PAM is off; unlock root in the
# guest's (overlay) /etc/shadow, never on the host.
if [ -w /etc/shadow ]; then sed -i 's/^root:![^:]*:/root:*:/' /etc/shadow; fi
# SSH sessions run bash, which would source the host's ~/.bashrc (pyenv, cargo...:
# slow under TCG and surprising); the guest's root gets minimal dotfiles instead
# (written to the overlay, never to the host).  PATH comes from sshd's SetEnv.
if [ "$(cat /run/testbed-vm/ctl/rootmode)" = overlay ]; then
    echo '# testbed VM guest: the host ~/.bashrc is hidden (docs/vm.md)' > /root/.bashrc
    echo '[ -f ~/.bashrc ] && . ~/.bashrc' > /root/.profile
    rm -f /root/.bash_profile /root/.bash_login
fi
exec /usr/sbin/sshd -D -e -f "$D"/sshd_config
"""


class Guest:
    """A long-lived guest reachable over SSH on a loopback port (for Ansible).

    ::

        with Guest(authorized_key=pubkey_text) as g:
            subprocess.run([*g.ssh_command(), "uname -r"])
            print(g.run("python3 -c 'print(1)'").output)

    The guest boots like :func:`run` (shared read-only host root with a tmpfs
    overlay) with QEMU user networking (10.0.2.15/24, gateway 10.0.2.2,
    restricted: no traffic beyond the host's forwarded loopback port), and runs
    the host's ``/usr/sbin/sshd`` with a private configuration, a fresh ed25519
    host key (known to :attr:`known_hosts`) and ``authorized_key`` for root (key
    logins only).  ``identity`` names a private key whose ``.pub`` is used when
    ``authorized_key`` is not given, and which :meth:`ssh_command` passes with
    ``-i``.  With neither, a key pair is generated and :attr:`identity` names its
    private half.  On exit QEMU is always killed.
    """

    def __init__(
        self,
        authorized_key: str | None = None,
        *,
        identity: str | os.PathLike | None = None,
        memory: str | int = "2G",
        cpus: int = 2,
        share: str | os.PathLike | None = None,
        hostfwd: Iterable = (),
        boot_timeout: float = 180.0,
        kernel: Kernel | None = None,
        hostroot_cache: str = "loose",
        kernel_args: str = "",
    ) -> None:
        self.identity: Path | None = Path(identity) if identity else None
        if authorized_key is None and self.identity is not None:
            pub = Path(f"{self.identity}.pub")
            try:
                authorized_key = pub.read_text()
            except OSError as exc:
                raise TestbedError(f"cannot read {pub}: {exc.strerror}") from None
        self.authorized_key = authorized_key
        self.memory = memory
        self.cpus = cpus
        self.share = share
        self.extra_hostfwd = list(hostfwd)
        self.boot_timeout = boot_timeout
        self.kernel = kernel
        self.hostroot_cache = hostroot_cache
        self.kernel_args = kernel_args
        self.ssh_port: int = 0
        self.known_hosts: Path | None = None
        self.boot_seconds: float | None = None
        self._keydir: Path | None = None
        self._boot: _Boot | None = None

    # -- lifecycle
    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._boot is not None:
            raise TestbedError("guest already started")
        keygen = shutil.which("ssh-keygen")
        sshd = Path("/usr/sbin/sshd")
        if not keygen or not sshd.is_file() or not shutil.which("ssh"):
            raise TestbedError("the SSH guest needs openssh-server and openssh-client on the host")
        self._keydir = Path(tempfile.mkdtemp(prefix="testbed-vm-ssh-"))
        try:
            self._boot_with_retries(keygen)
        except BaseException:
            self.stop()
            raise

    def _keygen(self, keygen: str, name: str) -> tuple[bytes, str]:
        assert self._keydir is not None
        path = self._keydir / name
        proc = subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-C", f"testbed-vm-{name}", "-f", str(path)],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise TestbedError(f"ssh-keygen failed: {proc.stderr.strip() or proc.returncode}")
        return path.read_bytes(), (self._keydir / f"{name}.pub").read_text().strip()

    def _boot_with_retries(self, keygen: str) -> None:
        assert self._keydir is not None
        host_priv, host_pub = self._keygen(keygen, "ssh_host_ed25519_key")
        authorized = self.authorized_key
        if not authorized:
            _, authorized = self._keygen(keygen, "id_ed25519")
            self.identity = self._keydir / "id_ed25519"
        env = _guest_env("/root", None)
        sshd_env = " ".join(f"{k}={env[k]}" for k in ("PATH", "PYTHONPATH", "LANG"))
        files = {
            "ssh_host_ed25519_key": (host_priv, 0o600),
            "authorized_keys": (authorized.strip().encode() + b"\n", 0o600),
            "sshd_config": (
                _SSHD_CONFIG.format(d="/run/testbed-vm/sshd", env=sshd_env).encode(),
                0o600,
            ),
        }
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            port = _free_port()
            t0 = time.monotonic()
            boot = _start(
                _GUEST_SCRIPT, share=self.share, memory=self.memory, cpus=self.cpus, net=True,
                hostfwd=[(port, 22), *self.extra_hostfwd], cwd="/root", env=None,
                kernel=self.kernel, hostroot_cache=self.hostroot_cache, overlay=True,
                extra_files=files, kernel_args=self.kernel_args,
            )  # fmt: skip
            self._boot = boot
            self.ssh_port = port
            self.known_hosts = self._keydir / "known_hosts"
            kh_key = " ".join(host_pub.split()[:2])
            self.known_hosts.write_text(f"[127.0.0.1]:{port} {kh_key}\n")
            error = self._wait_ready(t0)
            if error is None:
                self.boot_seconds = time.monotonic() - t0
                return
            last_error = error
            self._kill_boot()
            if "hostfwd" not in error and "forwarding" not in error:
                break
        raise TestbedError(f"SSH guest did not come up: {last_error}")

    def _wait_ready(self, t0: float) -> str | None:
        """None once the guest's sshd answers with a banner, else why it failed."""
        assert self._boot is not None
        deadline = t0 + self.boot_timeout
        while time.monotonic() < deadline:
            if self._boot.proc.poll() is not None:
                return f"QEMU exited early ({_failure_hint(self._boot)})"
            if self._banner():
                return None
            time.sleep(0.5)
        return f"no SSH banner on 127.0.0.1:{self.ssh_port} within {self.boot_timeout:g} s"

    def _banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ssh_port), timeout=2) as sock:
                sock.settimeout(2)
                return sock.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def _kill_boot(self) -> None:
        if self._boot is not None:
            self._boot.kill()
            shutil.rmtree(self._boot.ctl, ignore_errors=True)
            self._boot = None

    def stop(self) -> None:
        """Kill QEMU and remove the temporary keys (safe to call twice)."""
        if self.alive and self._keydir is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(
                    ["ssh", *self.ssh_options(), "-O", "exit", "root@127.0.0.1"],
                    capture_output=True, timeout=5,
                )  # fmt: skip
        self._kill_boot()
        if self._keydir is not None:
            shutil.rmtree(self._keydir, ignore_errors=True)
            self._keydir = None

    @property
    def alive(self) -> bool:
        return self._boot is not None and self._boot.proc.poll() is None

    @property
    def qemu_pid(self) -> int | None:
        return self._boot.proc.pid if self._boot else None

    @property
    def console(self) -> str:
        return self._boot.console() if self._boot else ""

    # -- use
    def ssh_options(self) -> list[str]:
        """``ssh`` options (without user@host) that reach this guest non-interactively."""
        if not self.ssh_port:
            raise TestbedError("guest not started")
        opts = [
            "-p", str(self.ssh_port),
            "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "ConnectTimeout=20",
            "-o", "LogLevel=ERROR",
            # one master connection per guest: key exchange is slow under TCG
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={self._keydir}/cm-%C",
            "-o", "ControlPersist=120",
        ]  # fmt: skip
        if self.identity is not None:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return opts

    def ssh_command(self, user: str = "root") -> list[str]:
        """argv prefix: ``[*g.ssh_command(), "uname -r"]`` runs ``uname -r`` in the guest."""
        return ["ssh", *self.ssh_options(), f"{user}@127.0.0.1"]

    def run(self, command: str | Sequence[str], timeout: float = 300.0) -> VMResult:
        """Run a shell command in the guest over SSH; stdout+stderr and exit status."""
        if not self.alive:
            raise TestbedError("guest is not running")
        text = command if isinstance(command, str) else shlex.join(command)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                [*self.ssh_command(), text], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raw = exc.stdout or b""
            result = VMResult(None, raw.decode("utf-8", "replace"), raw, timed_out=True)
            raise VMTimeout(f"guest command did not finish within {timeout:g} s", result) from None
        return VMResult(
            proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stdout,
            seconds=time.monotonic() - t0,
        )  # fmt: skip

    def ansible_inventory_vars(self) -> dict[str, str]:
        """Host variables that point Ansible at this guest."""
        hostvars = {
            "ansible_host": "127.0.0.1",
            "ansible_port": str(self.ssh_port),
            "ansible_user": "root",
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_common_args": (
                f"-o UserKnownHostsFile={self.known_hosts} -o StrictHostKeyChecking=yes"
            ),
        }
        if self.identity is not None:
            hostvars["ansible_ssh_private_key_file"] = str(self.identity)
        return hostvars


# ---------------------------------------------------------------- CLI


def main_vm(args) -> int:  # noqa: ANN001 - argparse.Namespace
    action = getattr(args, "vm_action", None)
    if action == "check":
        kernel = ensure_packages(install=getattr(args, "install", False))
        print(f"kernel   {kernel.version}  {kernel.image}")
        print(f"modules  {kernel.modules_dir}")
        print(f"headers  {kernel.build_dir if kernel.has_headers() else '(missing)'}")
        print(f"qemu     {find_qemu()}")
        print(f"busybox  {find_busybox()}")
        print(f"initrd   {build_initramfs(kernel)}")
        return 0
    if action == "up":
        return _main_up(args)
    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise TestbedError("no command given (put it after --, e.g. testbed vm run -- uname -r)")
    if len(command) == 1 and any(ch in command[0] for ch in " ;|&$<>"):
        command = command[0]  # one quoted shell snippet
    try:
        result = run(
            command, timeout=args.timeout, share=args.share, memory=args.memory,
            cpus=args.cpus, net=args.net,
        )  # fmt: skip
    except VMFailed as exc:
        sys.stdout.buffer.write(exc.result.output_bytes)
        sys.stdout.flush()
        if not isinstance(exc, VMTimeout):
            raise
        print(f"testbed: error: {exc}", file=sys.stderr)
        return 124
    sys.stdout.buffer.write(result.output_bytes)
    sys.stdout.flush()
    if args.verbose:
        boot = f"{result.boot_seconds:.1f}" if result.boot_seconds is not None else "?"
        print(
            f"testbed vm: exit {result.exit_status}, boot-to-command {boot} s, "
            f"total {result.seconds:.1f} s ({result.rootmode} root)",
            file=sys.stderr,
        )
    return result.exit_status if result.exit_status is not None else 1


def _main_up(args) -> int:  # noqa: ANN001
    key = None
    if args.authorized_key:
        try:
            key = Path(args.authorized_key).read_text().strip()
        except OSError as exc:
            raise TestbedError(f"cannot read {args.authorized_key}: {exc.strerror}") from None
    guest = Guest(authorized_key=key, memory=args.memory, cpus=args.cpus, share=args.share)
    stop = []
    old = signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        with guest:
            print(f"guest up after {guest.boot_seconds:.1f} s; ssh with:", flush=True)
            print("  " + shlex.join(guest.ssh_command()), flush=True)
            print("Ctrl-C (or SIGTERM) powers it off.", flush=True)
            while guest.alive and not stop:
                time.sleep(0.5)
            if not guest.alive:
                raise TestbedError("the guest stopped")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
    return 0
