"""A long-lived guest reachable over SSH on a loopback port (for Ansible and the lab)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from testbed.cluster.vm.boot import Boot, VMResult, VMTimeout, failure_hint, guest_env, start
from testbed.cluster.vm.kernel import Kernel
from testbed.core.errors import TestbedError
from testbed.core.procs import free_port

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
        self._boot: Boot | None = None

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
        env = guest_env("/root", None)
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
            port = free_port()
            t0 = time.monotonic()
            boot = start(
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
                return f"QEMU exited early ({failure_hint(self._boot)})"
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
