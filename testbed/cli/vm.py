"""``testbed vm check|run|up|experiment``: the command line of the VM harness (docs/vm.md)."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from pathlib import Path

from testbed.cli.options import Subparsers, add_actions, add_guest_size, timeout_seconds
from testbed.core.errors import TestbedError
from testbed.core.procs import program_argv

# testbed.cluster.vm is imported by the actions, so that ``testbed --help`` does not.


def main_vm(args: argparse.Namespace) -> int:
    action = args.vm_action
    if action == "check":
        from testbed.cluster.vm.initramfs import build_initramfs  # lazy: only when this verb runs
        from testbed.cluster.vm.kernel import (  # lazy: only when this verb runs
            ensure_packages,
            find_busybox,
            find_qemu,
        )

        kernel = ensure_packages(install=args.install)
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
        from testbed.jobs.vm_experiment import main_vm_experiment  # lazy: only when this verb runs

        return main_vm_experiment(
            args.plans,
            output=args.output,
            module=args.module,
            timeout=args.timeout,
            memory=args.memory,
            cpus=args.cpus,
        )
    from testbed.cluster.vm.boot import VMFailed, VMTimeout, run  # lazy: only when this verb runs

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


def _main_up(args: argparse.Namespace) -> int:
    from testbed.cluster.vm.guest import Guest  # lazy: only when this verb runs

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


def add_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "vm",
        help="run a command in a QEMU guest with Debian's kernel",
        description="Boot Debian's kernel under QEMU (TCG) with the host root "
        "shared read-only and run a command in the guest (docs/vm.md).",
    )
    vm_sub = add_actions(p, "vm_action")
    q = vm_sub.add_parser(
        "run",
        help="boot, run COMMAND as root in the guest, power off",
        description="Boot a guest, run COMMAND (argv, or one quoted shell "
        "snippet), print its output and exit with its status (124 on timeout).",
    )
    q.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=600.0,
        metavar="S",
        help="kill the guest after S seconds (default 600)",
    )
    q.add_argument(
        "--share",
        metavar="DIR",
        help="host directory mounted read-write at /mnt/results in the guest",
    )
    q.add_argument(
        "--net", action="store_true", help="give the guest a NIC (QEMU user networking, restricted)"
    )
    q.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print boot-to-command and total time on stderr",
    )
    q.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    q2 = vm_sub.add_parser(
        "up",
        help="boot a guest with sshd and wait (Ctrl-C powers it off)",
        description="Boot a long-lived guest reachable over SSH on a "
        "loopback port and print the ssh command line.",
    )
    q2.add_argument(
        "--authorized-key",
        metavar="FILE",
        help="public key allowed to log in as root (default: a generated key pair)",
    )
    q2.add_argument(
        "--share",
        metavar="DIR",
        help="host directory mounted read-write at /mnt/results in the guest",
    )
    q3 = vm_sub.add_parser(
        "check",
        help="find (or --install) QEMU, kernel, headers, busybox",
        description="Show the kernel, QEMU and busybox the harness uses and build the initramfs.",
    )
    q3.add_argument(
        "--install", action="store_true", help="apt-get install missing packages (root)"
    )
    q4 = vm_sub.add_parser(
        "experiment",
        help="run experiment plans in the guest with the mktrace module loaded",
        description="Boot a guest, load the mktrace module and run each PLAN with "
        "testbed experiment; results come back as run directories in DIR/<plan>/. "
        "Delegates: kthread, local (the guest's loopback) and tcp://10.0.2.100:PORT, "
        "a delegate started on this host's 127.0.0.1 (docs/vm.md).",
    )
    q4.add_argument("plans", nargs="+", metavar="PLAN", help="experiment plan (YAML or JSON)")
    q4.add_argument(
        "-o", "--output", default="results/vm", metavar="DIR",
        help="results folder on the host (default results/vm)",
    )  # fmt: skip
    q4.add_argument(
        "--module", metavar="KO",
        help="mktrace.ko built for the guest kernel (default: build kmod/ now)",
    )  # fmt: skip
    q4.add_argument(
        "--timeout", type=timeout_seconds, default=3600.0, metavar="S",
        help="kill the guest after S seconds (default 3600)",
    )  # fmt: skip
    for q in (vm_sub.choices["run"], q2, q4):
        add_guest_size(q)
    p.set_defaults(func=main_vm)
