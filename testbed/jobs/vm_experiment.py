"""``testbed vm experiment``: run experiment plans inside the QEMU guest, results back as run dirs.

The guest boots Debian's kernel under TCG (:func:`testbed.cluster.vm.run`), loads the
``mktrace`` module (built on the host against the guest's headers, or
``--module KO``), and runs ``testbed experiment PLAN`` for each plan with the
results share mounted: ``RESULTS/<plan>/guest/...`` on the host are ordinary
experiment results (``testbed analyze RESULTS/<plan>``).

Delegates a plan may name in the guest:

* ``kthread`` (and ``{kthread: {...}}``): the module's kernel thread;
* ``local``: a delegate on the guest's loopback, started by the experiment;
* ``tcp://10.0.2.100:PORT`` (:data:`HOST_ADDR`): a delegate on *another
  node*, the host.  For each such port this command starts ``testbed
  delegate`` on the host's ``127.0.0.1`` (a free port) and QEMU's user
  network carries the guest's connections there (``guestfwd``, one
  :mod:`testbed.cluster.vm.guestfwd` per connection).  The NIC stays
  ``restrict=on``: the guest reaches nothing else, not even the gateway.

Anything else is refused before the guest boots (one error line).
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from testbed.cluster import vm
from testbed.cluster.vm.boot import GUESTFWD_ADDR
from testbed.core.errors import TestbedError
from testbed.jobs.experiment import LocalDelegate, load_plan

#: The guest's address of "a delegate on another node": the host (QEMU guestfwd).
HOST_ADDR = GUESTFWD_ADDR
#: The experiment's host label inside the guest (``RESULTS/<plan>/<label>/``).
HOST_LABEL = "guest"
REPO = Path(__file__).resolve().parents[2]


def host_ports(plans) -> list[int]:
    """Guest ports of the plans' delegates on :data:`HOST_ADDR`; other endpoints are errors."""
    ports = set()
    for plan in plans:
        for d in plan.delegates:
            if d.kthread or d.endpoint == "local":
                continue
            scheme, _, rest = d.endpoint.partition("://")
            host, _, port = rest.rpartition(":")
            if scheme == "tcp" and host == HOST_ADDR and port.isdigit():
                ports.add(int(port))
                continue
            where = "the guest's own loopback" if _loopback(host) else "outside the guest"
            raise TestbedError(
                f"plan {plan.name}: delegate {d.name} ({d.endpoint}) is {where}; in the guest "
                f"a plan may use kthread, local, or tcp://{HOST_ADDR}:PORT (a delegate on this host)"
            )
    return sorted(ports)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def guest_script(plans, ko: Path, results_dir: str) -> str:
    """The guest's command: load the module, run every plan, unload; exit 1 if any failed."""
    lines = [
        "set -u",
        f"insmod {shlex.quote(str(ko))} || {{ echo 'testbed: error: insmod failed'; exit 97; }}",
        "python3 -m testbed kmod status",
        "rc=0",
    ]
    for plan, path in plans:
        out = f"{results_dir}/{plan.name}"
        lines.append(
            f"python3 -m testbed experiment {shlex.quote(str(path))} -o {shlex.quote(out)} "
            f"--host-label {HOST_LABEL} || rc=1"
        )
    lines += ["rmmod mktrace || rc=1", "exit $rc"]
    return "\n".join(lines) + "\n"


def main_vm_experiment(
    plans: list[str],
    *,
    output: str | os.PathLike = "results/vm",
    module: str | None = None,
    timeout: float = 3600.0,
    memory: str = "2G",
    cpus: int = 2,
) -> int:
    """``testbed vm experiment PLAN...``: run the plans in one guest; its exit status.

    ``module`` is a ``mktrace.ko`` built for the guest kernel (default: build
    ``kmod/`` now); ``timeout`` (s), ``memory`` and ``cpus`` size the guest.
    """

    paths = [Path(p).resolve() for p in plans]
    loaded = [(load_plan(p), p) for p in paths]  # validated on the host: one error line
    names = [p.name for p, _ in loaded]
    if len(set(names)) != len(names):
        raise TestbedError(f"two plans have the same name ({', '.join(names)})")
    ports = host_ports([p for p, _ in loaded])
    results = Path(output).resolve()
    results.mkdir(parents=True, exist_ok=True)
    kernel = vm.find_kernel()
    if module:
        ko = Path(module).resolve()
        if not ko.is_file():
            raise TestbedError(f"module {ko}: no such file")
    else:
        print(f"testbed vm: building the module for {kernel.version}", file=sys.stderr)
        ko = next(p for p in vm.build_module(REPO / "kmod", kernel) if p.name == "mktrace.ko")
    with ExitStack() as stack:
        fwd = []
        for port in ports:
            d = stack.enter_context(LocalDelegate())
            host_port = int(d.endpoint.rpartition(":")[2])
            fwd.append((port, host_port))
            print(f"testbed vm: delegate on the host at {d.endpoint}, reached from the guest "
                  f"as tcp://{HOST_ADDR}:{port}", file=sys.stderr)  # fmt: skip
        print(f"testbed vm: booting the guest for {len(loaded)} plan(s)", file=sys.stderr)
        t0 = time.monotonic()
        try:
            res = vm.run(
                guest_script(loaded, ko, vm.RESULTS_DIR), share=results, net=True, guestfwd=fwd,
                timeout=timeout, memory=memory, cpus=cpus, kernel=kernel,
                cwd=str(REPO),
            )  # fmt: skip
        except vm.VMFailed as exc:
            sys.stdout.buffer.write(exc.result.output_bytes)
            raise
    sys.stdout.buffer.write(res.output_bytes)
    sys.stdout.flush()
    print(f"testbed vm: guest finished with status {res.exit_status} after "
          f"{time.monotonic() - t0:.0f} s; results: "
          + ", ".join(str(results / n) for n in names), file=sys.stderr)  # fmt: skip
    return res.exit_status or 0
