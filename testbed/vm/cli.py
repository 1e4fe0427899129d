"""``testbed vm check|run|up|experiment``: the command line of the VM harness (docs/vm.md)."""

from __future__ import annotations

import shlex
import signal
import sys
import time
from pathlib import Path

from testbed.errors import TestbedError
from testbed.procs import program_argv
from testbed.vm.boot import VMFailed, VMTimeout, run
from testbed.vm.guest import Guest
from testbed.vm.initramfs import build_initramfs
from testbed.vm.kernel import ensure_packages, find_busybox, find_qemu


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
    if action == "experiment":
        from testbed.vm.experiment import main_vm_experiment

        return main_vm_experiment(args)
    command = program_argv(args.command, example="testbed vm run -- uname -r")
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
