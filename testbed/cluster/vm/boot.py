"""Boot one guest under QEMU/TCG, run a command in it, collect its output and status."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from testbed.cluster.vm.image import boot_image
from testbed.cluster.vm.initramfs import SENTINEL, build_initramfs
from testbed.cluster.vm.kernel import Kernel, find_kernel, find_qemu
from testbed.core.errors import TestbedError

#: Kernel command line of every boot.  ``mitigations=off``: under TCG the
#: page-table isolation and speculation barriers of a "vulnerable" emulated CPU
#: only cost time.  ``panic=-1`` with QEMU's ``-no-reboot`` ends QEMU on a panic;
#: ``softlockup_panic=1`` makes a CPU that stops scheduling for 20 s such a panic,
#: with the report on the console, instead of a guest that holds its caller to the
#: time limit (docs/vm.md, "A TCG hazard").
BASE_KERNEL_ARGS = (
    "console=ttyS0 panic=-1 quiet loglevel=4 no_timer_check mitigations=off softlockup_panic=1"
)


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


def guest_env(cwd: str, extra: dict[str, str] | None) -> dict[str, str]:
    """PATH/HOME/PYTHONPATH so the host's Python and this project work in the guest."""
    pybin = str(Path(sys.executable).parent)
    project = str(Path(__file__).resolve().parents[3])
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
    lines = ["# written by testbed.cluster.vm"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += [
        'read -r _up _rest < /proc/uptime; echo "$_up" > /run/testbed-vm/ctl/started',
        'cd "$TESTBED_VM_CWD" 2>/dev/null || cd /',
        body,
    ]
    return "\n".join(lines) + "\n"


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


#: The guest's address for connections carried to the host's loopback (``guestfwd``).
GUESTFWD_ADDR = "10.0.2.100"
GUESTFWD_SCRIPT = Path(__file__).resolve().parent / "guestfwd.py"


def _guestfwd_rules(guestfwd: Iterable) -> list[str]:
    """Each rule ``(guest_port, host_port)``: the guest's connections to
    ``GUESTFWD_ADDR:guest_port`` reach ``127.0.0.1:host_port`` on the host, one
    :mod:`testbed.cluster.vm.guestfwd` process per connection (nothing else is reachable)."""
    rules = []
    for rule in guestfwd:
        try:
            guest_port, host_port = (int(x) for x in rule)
        except (TypeError, ValueError):
            raise TestbedError(
                f"guestfwd rule {rule!r}: expected (guest_port, host_port)"
            ) from None
        if not (0 < guest_port < 65536 and 0 < host_port < 65536):
            raise TestbedError(f"guestfwd rule {rule!r}: ports must be 1..65535")
        cmd = shlex.join([sys.executable, "-I", "-S", str(GUESTFWD_SCRIPT), str(host_port)])
        if "," in cmd:
            raise TestbedError(f"guestfwd: {cmd!r} has a comma (QEMU option syntax)")
        rules.append(f"tcp:{GUESTFWD_ADDR}:{guest_port}-cmd:{cmd}")
    return rules


@dataclasses.dataclass
class Boot:
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


def start(
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
    guestfwd: Iterable = (),
) -> Boot:
    qemu = find_qemu()
    kernel = kernel or find_kernel()
    initrd = build_initramfs(kernel, hostroot_cache)
    if cpus < 1:
        raise TestbedError("cpus must be >= 1")
    mem = _memory(memory)
    rules = _hostfwd_rules(hostfwd)
    grules = _guestfwd_rules(guestfwd)
    if rules or grules:
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
        (ctl / "cmd.sh").write_text(_command_script(command, guest_env(cwd, env)))
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
            netdev = ("user,id=n0,restrict=on" + "".join(f",hostfwd={r}" for r in rules)
                      + "".join(f",guestfwd={r}" for r in grules))  # fmt: skip
            argv += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0"]
        log = open(ctl / "qemu.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        finally:
            log.close()
        return Boot(proc, ctl, time.time())
    except BaseException:
        shutil.rmtree(ctl, ignore_errors=True)
        raise


def _result(boot: Boot, seconds: float, timed_out: bool) -> VMResult:
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


def failure_hint(boot: Boot) -> str:
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
    guestfwd: Iterable = (),
) -> VMResult:
    """Boot a guest, run ``command`` as root, power off; return its output and status.

    ``command`` is a shell script (str, run by ``/bin/sh``) or an argv list.  It
    runs in ``cwd`` (default: the caller's working directory, seen through the
    shared root) with the host's Python first on ``PATH`` and this project on
    ``PYTHONPATH``; ``env`` adds variables.  ``share`` is a host directory mounted
    read-write at :data:`RESULTS_DIR`.  ``net=True`` adds a NIC (10.0.2.15/24 via
    QEMU user networking, restricted: the guest reaches nothing outside);
    ``hostfwd`` rules ``(host_port, guest_port)`` forward 127.0.0.1 ports into it;
    ``guestfwd`` rules ``(guest_port, host_port)`` let the guest reach the host's
    ``127.0.0.1:host_port`` as ``10.0.2.100:guest_port`` (nothing else).
    ``kernel_args`` are appended to :data:`BASE_KERNEL_ARGS` (later ones win,
    e.g. ``"mitigations=auto"``).

    On timeout QEMU is killed and :class:`VMTimeout` (a :class:`TestbedError`) is
    raised with ``.result`` holding the partial output.  A guest that stops
    without reporting a status (QEMU error, kernel panic) raises
    :class:`VMFailed` (also a :class:`TestbedError`, also with ``.result``).
    """
    t0 = time.monotonic()
    boot = start(
        command, share=share, memory=memory, cpus=cpus, net=net, hostfwd=hostfwd, cwd=cwd,
        env=env, kernel=kernel, hostroot_cache=hostroot_cache, overlay=overlay,
        kernel_args=kernel_args, guestfwd=guestfwd,
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
            raise VMFailed(f"guest stopped without an exit status ({failure_hint(boot)})", result)
        return result
    finally:
        boot.kill()
        shutil.rmtree(boot.ctl, ignore_errors=True)
