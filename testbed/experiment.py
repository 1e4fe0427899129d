"""Experiment matrices: workloads x forwarded sets/policies x delegates x repetitions.

``testbed experiment PLAN`` runs a plan (YAML or JSON) on this machine, one
``testbed run`` per cell, with a progress display.  It is resumable: a cell
whose run directory is complete is skipped, half-written ones are redone.
``playbooks/experiment.yml`` runs the same command on every compute node with
the inventory's delegate nodes as delegates and fetches the results, so both
produce the same layout::

    RESULTS/
      plan.json                          the normalised plan
      <host>/
        native/<workload>.json           native run: wall time, output sha256
        profile-<workload>/              native profile (only for policy cells)
        <workload>.<forward>.<delegate>.r<N>/
          run.json calls.bin syscalls.csv   the run directory (docs/rundir.md)
          experiment.json                the cell, output checksum vs native,
                                         relay/delegate CPU time, CPUs used
        native/<workload>.<forward>.<delegate>.r<N>/
          run.json experiment.json       the native run made just before that cell
                                         (kind "native": wall/user/sys time)

A plan::

    name: gzip-lab                 # optional (default: the file name)
    repetitions: 2                 # default 1
    mode: cost                     # cost | offload (default cost)
    offload_path: /gpfs            # offload mode only: the offloaded prefix (docs/offload.md)
    backend: seccomp               # seccomp | kmod (default seccomp)
    timeout_s: 600                 # per run (default 600)
    workloads:                     # catalogue names, or maps with options
      - gzip
      - {name: xz, size_mb: 2}
      - {name: words, command: [wc, -w, "{input}"], size_mb: 1}
      - {name: gain, gamma: [1, 4], phases: 10, samples: 100000000}
    forward:                       # syscall sets or policies
      - read,write
      - [write]
      - {policy: "min-freq:20%"}
    delegates:                     # "local" starts one on loopback for the plan
      - local
      - {name: node3, endpoint: "tcp://10.213.47.3:5555"}
      - kthread                    # the mktrace module's kernel thread on this node
      - {name: kt20, kthread: {delay_us: 20, faithful: false}}
      - {name: ktf, kthread: {delay_us: 20, faithful: true, flush_caller_tlb: true}}
    pin: false                     # true: program, relay (and a local delegate)
                                   # on separate CPUs; refused with < 2 CPUs

A ``kthread`` delegate runs its cells with ``testbed run --backend kmod
--mode kthread`` (same-node, no network); it stays in the plan when
``--delegate`` replaces the network delegates, and on a node without the
module (``/dev/mktrace`` missing: seccomp-only) its cells are skipped with one
line saying so.

Every forwarded cell is preceded by a native run of the same workload
(native, forwarded, native, forwarded ...), so drift hits both alike.
The workload ``gain`` is the gain benchmark (testbed/gain.py); a list of
``gamma`` values makes one workload ``gain-g<GAMMA>`` per value.

Everything is validated before anything starts: an unknown workload, syscall
or policy, a missing program or an unreachable delegate is one clear error and
no delegate is left running.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import cpus, gain, rundir, syscalls
from testbed.errors import TestbedError
from testbed.hostinfo import host_metadata

#: Built-in workloads: argv templates ({input} is a generated text file of
#: ``size_mb`` MB, {dir} its directory); stdout is captured and compared with
#: the native run byte for byte (by SHA-256).
WORKLOADS: dict[str, list[str]] = {
    "gzip": ["gzip", "-c", "-6", "{input}"],
    "bzip2": ["bzip2", "-c", "{input}"],
    "xz": ["xz", "-c", "-T1", "-3", "{input}"],
    "cat": ["cat", "{input}"],
    "sha256sum": ["sha256sum", "{input}"],
    "wc": ["wc", "{input}"],
    "tar": ["tar", "-cf", "-", "--mtime=@0", "-C", "{dir}", "input.txt"],
    # load the text into a table (pwrite/pread/fdatasync heavy), one line of output
    "sqlite3": [
        "sqlite3",
        "-cmd",
        "DROP TABLE IF EXISTS t",
        "-cmd",
        "CREATE TABLE t(line TEXT)",
        "-cmd",
        ".import {input} t",
        "{dir}/workload.db",
        "SELECT count(*), sum(length(line)) FROM t",
    ],  # fmt: skip
}
DEFAULT_SIZE_MB = 4.0
INPUT_MTIME = 1_000_000_000  # fixed mtime of generated inputs
PLAN_KEYS = {
    "name",
    "repetitions",
    "mode",
    "backend",
    "timeout_s",
    "workloads",
    "forward",
    "delegates",
    "pin",
    "offload_path",
}
_WORDS = [
    "forward",
    "delegate",
    "kernel",
    "syscall",
    "network",
    "compute",
    "node",
    "relay",
    "zeromq",
    "msgpack",
    "seccomp",
    "module",
    "thread",
    "spin",
    "cost",
    "policy",
    "frequency",
    "latency",
    "model",
    "speedup",
]


class PlanError(TestbedError):
    """A plan that cannot be run as written."""


@dataclass(frozen=True)
class Workload:
    name: str
    argv: tuple[str, ...]
    size_mb: float
    seed: int
    gamma: int | None = None  # the gain benchmark's gain


@dataclass(frozen=True)
class Forward:
    label: str
    names: tuple[str, ...] = ()  # syscall names (explicit set)
    policy: str | None = None


@dataclass(frozen=True)
class DelegateSpec:
    name: str
    endpoint: str  # "local" = start one on loopback, "kthread" = the module's kernel thread
    delay_us: float = 0.0  # kthread: spin per leg
    faithful: bool = False  # kthread: the mktrace-faithful variant
    flush_caller_tlb: bool = False  # kthread, faithful only: flush the caller's CPU too

    @property
    def kthread(self) -> bool:
        return self.endpoint == "kthread"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "endpoint": self.endpoint}
        if self.kthread:
            out.update(delay_us=self.delay_us, faithful=self.faithful)
            if self.flush_caller_tlb:
                out["flush_caller_tlb"] = True
        return out


@dataclass
class Plan:
    name: str
    repetitions: int
    mode: str
    backend: str
    timeout_s: float
    workloads: list[Workload]
    forward: list[Forward]
    delegates: list[DelegateSpec]
    pin: bool = False
    offload_path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return (
            {
                "name": self.name,
                "repetitions": self.repetitions,
                "mode": self.mode,
                "backend": self.backend,
                "timeout_s": self.timeout_s,
                "workloads": [
                    {"name": w.name, "argv": list(w.argv), "size_mb": w.size_mb, "seed": w.seed}
                    | ({"gamma": w.gamma} if w.gamma is not None else {})
                    for w in self.workloads
                ],
                "forward": [
                    {"label": f.label, "syscalls": list(f.names), "policy": f.policy}
                    for f in self.forward
                ],
                "delegates": [d.to_json() for d in self.delegates],
            }
            | ({"pin": True} if self.pin else {})
            | ({"offload_path": self.offload_path} if self.offload_path else {})
        )


@dataclass(frozen=True)
class Cell:
    workload: Workload
    forward: Forward
    delegate: DelegateSpec
    rep: int

    @property
    def run_id(self) -> str:
        return f"{self.workload.name}.{self.forward.label}.{self.delegate.name}.r{self.rep}"


# ---------------------------------------------------------------- plan parsing


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_+-]+", "-", text.replace("%", "pct")).strip("-") or "x"


def _read_plan_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(f"plan {path}: no such file") from None
    except OSError as exc:
        raise PlanError(f"plan {path}: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise PlanError(
            f"plan {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})"
        ) from None
    if not isinstance(data, dict):
        raise PlanError(f"plan {path}: expected a mapping with workloads, forward, delegates")
    return data


GAIN_KEYS = {"name", "gamma", "phases", "samples"}


def _gain_workloads(item: dict, where: str) -> list[Workload]:
    """``{name: gain, gamma: G or [G...], phases, samples}``: one workload per gain."""
    unknown = set(item) - GAIN_KEYS
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} in workload 'gain'")
    gammas = item.get("gamma", 1)
    gammas = gammas if isinstance(gammas, list) else [gammas]
    try:
        gammas = [gain.check_gamma(g) for g in gammas]
    except TestbedError as exc:
        raise PlanError(f"{where}: workload 'gain': {exc}") from None
    if not gammas or len(set(gammas)) != len(gammas):
        raise PlanError(f"{where}: workload 'gain': gamma must be distinct integers")
    phases, samples = (
        item.get("phases", gain.DEFAULT_PHASES),
        item.get("samples", gain.DEFAULT_SAMPLES),
    )
    for key, v in (("phases", phases), ("samples", samples)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10**12:
            raise PlanError(f"{where}: workload 'gain': {key} must be an integer >= 1")
    try:
        gain.build()  # compile now: a broken compiler is a plan error, not a failed run
    except TestbedError as exc:
        raise PlanError(f"{where}: {exc}") from None
    argv = ("{gainbench}", "{gamma}", str(phases), str(samples))
    return [Workload(f"gain-g{g}", argv, 0.0, 0, gamma=g) for g in gammas]


def _workloads(item: Any, where: str) -> list[Workload]:
    if isinstance(item, dict) and item.get("name") == "gain" and "command" not in item:
        return _gain_workloads(item, where)
    if item == "gain":
        return _gain_workloads({"name": "gain"}, where)
    return [_workload(item, where)]


def _workload(item: Any, where: str) -> Workload:
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise PlanError(f"{where}: a workload is a name or a map with 'name'")
    name = item["name"]
    unknown = set(item) - {"name", "command", "size_mb", "seed"}
    if unknown:
        raise PlanError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} in workload {name!r}"
        )
    command = item.get("command")
    if command is None:
        if name not in WORKLOADS:
            raise PlanError(
                f"{where}: unknown workload {name!r} (known: {', '.join(sorted([*WORKLOADS, 'gain']))}; "
                "or give a 'command')"
            )
        command = WORKLOADS[name]
    if isinstance(command, str):
        import shlex

        command = shlex.split(command)
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise PlanError(
            f"{where}: command of workload {name!r} must be a non-empty list of strings"
        )
    if shutil.which(command[0]) is None:
        raise PlanError(f"{where}: program {command[0]!r} of workload {name!r} not found on PATH")
    try:
        size = float(item.get("size_mb", DEFAULT_SIZE_MB))
        seed = int(item.get("seed", 1))
    except (TypeError, ValueError):
        raise PlanError(f"{where}: size_mb and seed of workload {name!r} must be numbers") from None
    if not 0 < size <= 4096:
        raise PlanError(f"{where}: size_mb of workload {name!r} must be in (0, 4096]")
    return Workload(_label(name), tuple(command), size, seed)


def _forward(item: Any, where: str) -> Forward:
    if isinstance(item, dict):
        if set(item) != {"policy"} or not isinstance(item["policy"], str):
            raise PlanError(f"{where}: a forward entry is a syscall list or {{policy: SPEC}}")
        from testbed.policy import parse_policy

        try:
            pol = parse_policy(item["policy"])
        except TestbedError as exc:
            raise PlanError(f"{where}: {exc}") from None
        if pol.kind == "list":
            return _forward(item["policy"], where)
        return Forward(_label(item["policy"]), policy=item["policy"].strip())
    if isinstance(item, list):
        item = ",".join(str(x) for x in item)
    if not isinstance(item, str):
        raise PlanError(f"{where}: a forward entry is a syscall list or {{policy: SPEC}}")
    try:
        nrs = syscalls.parse_set(item)
    except TestbedError as exc:
        raise PlanError(f"{where}: {exc}") from None
    names = tuple(syscalls.name_of(n) for n in sorted(nrs))
    return Forward("+".join(names), names=names)


def _delegate(item: Any, where: str) -> DelegateSpec:
    from testbed.keys import EndpointError, parse_endpoint

    if item == "local":
        return DelegateSpec("local", "local")
    if item == "kthread":
        return DelegateSpec("kthread", "kthread")
    if isinstance(item, dict) and "kthread" in item:
        return _kthread_delegate(item, where)
    if isinstance(item, str):
        item = {"endpoint": item}
    if not isinstance(item, dict) or not isinstance(item.get("endpoint"), str):
        raise PlanError(f"{where}: a delegate is 'local', an endpoint or {{name, endpoint}}")
    try:
        ep = parse_endpoint(item["endpoint"])
    except EndpointError as exc:
        raise PlanError(f"{where}: {exc}") from None
    name = item.get("name") or ep.split("://", 1)[1]
    return DelegateSpec(_label(str(name)), ep)


KTHREAD_KEYS = {"delay_us", "faithful", "flush_caller_tlb"}


def _kthread_delegate(item: dict, where: str) -> DelegateSpec:
    opts = item["kthread"]
    if opts is True or opts is None:
        opts = {}
    unknown = set(item) - {"name", "kthread"}
    if not isinstance(opts, dict) or unknown or set(opts) - KTHREAD_KEYS:
        raise PlanError(
            f"{where}: a kthread delegate is {{name, kthread: {{delay_us, faithful, flush_caller_tlb}}}}"
        )
    try:
        delay = float(opts.get("delay_us", 0.0))
    except (TypeError, ValueError):
        delay = -1.0
    if not 0 <= delay <= 1e6:
        raise PlanError(f"{where}: kthread delay_us must be a number in [0, 1000000]")
    faithful = opts.get("faithful", False)
    flush = opts.get("flush_caller_tlb", False)
    if not isinstance(faithful, bool) or not isinstance(flush, bool):
        raise PlanError(f"{where}: kthread faithful and flush_caller_tlb must be true or false")
    if flush and not faithful:
        raise PlanError(f"{where}: kthread flush_caller_tlb needs faithful: true")
    name = _label(str(item.get("name") or "kthread"))
    return DelegateSpec(name, "kthread", delay, faithful, flush)


def _list(data: dict, key: str, where: str) -> list:
    value = data.get(key)
    if value is None:
        raise PlanError(f"{where}: '{key}' is missing")
    if not isinstance(value, list) or not value:
        raise PlanError(f"{where}: '{key}' must be a non-empty list")
    return value


def parse_plan(
    data: dict[str, Any], name: str, where: str, delegates: list[str] | None = None
) -> Plan:
    """Validate a plan mapping; ``delegates`` (NAME=ENDPOINT) replaces the plan's delegates."""
    unknown = set(data) - PLAN_KEYS
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        reps = int(data.get("repetitions", 1))
        timeout = float(data.get("timeout_s", 600))
    except (TypeError, ValueError):
        raise PlanError(f"{where}: repetitions and timeout_s must be numbers") from None
    if not 1 <= reps <= 1000 or not 0 < timeout <= 86400:
        raise PlanError(f"{where}: repetitions must be 1..1000 and timeout_s in (0, 86400]")
    mode, backend = data.get("mode", "cost"), data.get("backend", "seccomp")
    if mode not in ("cost", "offload"):
        raise PlanError(f"{where}: mode {mode!r} is not cost or offload")
    if backend not in ("seccomp", "kmod"):
        raise PlanError(f"{where}: backend {backend!r} is not seccomp or kmod")
    workloads = [x for w in _list(data, "workloads", where) for x in _workloads(w, where)]
    pin = data.get("pin", False)
    if not isinstance(pin, bool):
        raise PlanError(f"{where}: pin must be true or false")
    offload_path = _offload_path(data, mode, where)
    if offload_path:  # offload mode traps the file-I/O calls itself
        forward = [Forward("offload")]
    else:
        forward = [_forward(f, where) for f in _list(data, "forward", where)]
    if delegates:
        specs = []
        for text in delegates:
            dname, sep, ep = text.partition("=")
            specs.append(_delegate({"name": dname, "endpoint": ep} if sep else text, "--delegate"))
        # node-local kernel-thread delegates are not replaced by network ones
        plan_specs = (_delegate(x, where) for x in data.get("delegates") or [])
        specs += [d for d in plan_specs if d.kthread]
    else:
        specs = [_delegate(d, where) for d in _list(data, "delegates", where)]
    if offload_path and any(d.kthread for d in specs):
        raise PlanError(f"{where}: kthread delegates measure cost only; not with mode: offload")
    for kind, labels in (
        ("workload", [w.name for w in workloads]),
        ("forward", [f.label for f in forward]),
        ("delegate", [d.name for d in specs]),
    ):
        if len(set(labels)) != len(labels):
            raise PlanError(f"{where}: two {kind} entries have the same name ({', '.join(labels)})")
    plan_name = _label(str(data.get("name") or name))
    return Plan(
        plan_name, reps, mode, backend, timeout, workloads, forward, specs, pin, offload_path
    )


def _offload_path(data: dict, mode: str, where: str) -> str | None:
    path = data.get("offload_path")
    if mode != "offload":
        if path is not None:
            raise PlanError(f"{where}: offload_path is only used with mode: offload")
        return None
    if "forward" in data:
        raise PlanError(f"{where}: mode offload traps the file-I/O calls itself; drop 'forward'")
    if not isinstance(path, str) or not path.startswith("/") or os.path.normpath(path) == "/":
        raise PlanError(f"{where}: mode offload needs offload_path: an absolute prefix (not /)")
    return os.path.normpath(path)


def load_plan(path: str | os.PathLike, delegates: list[str] | None = None) -> Plan:
    p = Path(path)
    return parse_plan(_read_plan_file(p), p.stem, f"plan {p}", delegates)


def cells(plan: Plan) -> list[Cell]:
    """The matrix in run order (repetitions outermost, so early results cover every cell)."""
    return [
        Cell(w, f, d, rep)
        for rep in range(1, plan.repetitions + 1)
        for w in plan.workloads
        for f in plan.forward
        for d in plan.delegates
    ]


# ---------------------------------------------------------------- execution helpers


def generate_input(path: Path, size_mb: float, seed: int) -> None:
    """Compressible, reproducible text of ``size_mb`` MB."""
    if path.exists() and path.stat().st_size == int(size_mb * 1e6):
        return
    _generate(path, size_mb, seed)
    os.utime(path, (INPUT_MTIME, INPUT_MTIME))  # gzip/tar record it: keep outputs comparable


def _generate(path: Path, size_mb: float, seed: int) -> None:
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(_WORDS) for _ in range(10)) + f" {rng.randrange(10**6)}\n"
        for _ in range(4096)
    ]
    block = "".join(lines).encode()
    size = int(size_mb * 1e6)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left > 0:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            left -= len(chunk)
            block = block[len(block) // 3 :] + block[: len(block) // 3]  # vary the order
    os.replace(tmp, path)


def _argv(w: Workload, input_path: Path) -> list[str]:
    if w.argv and w.argv[0] == "{gainbench}":
        return gain.command(int(w.gamma or 1), int(w.argv[2]), int(w.argv[3]))
    return [
        a.replace("{input}", str(input_path)).replace("{dir}", str(input_path.parent))
        for a in w.argv
    ]


def _testbed_env() -> dict[str, str]:
    """Environment for ``python -m testbed`` children run in another cwd: the same package."""
    top = str(Path(__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=top + (os.pathsep + old if old else ""))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ping(endpoint: str, timeout_s: float = 5.0, curve_keys: str | None = None) -> dict[str, Any]:
    """HELLO -> WELCOME with the delegate at ``endpoint``; its WELCOME map or a TestbedError."""
    from testbed.relay import connect

    ctx, sock, welcome = connect(
        endpoint, timeout_s=timeout_s, info={"role": "experiment"}, curve_keys=curve_keys
    )
    sock.close(0)
    return welcome


#: How long a local delegate may take to answer (Python under QEMU TCG starts slowly).
LOCAL_DELEGATE_START_S = 120.0


class LocalDelegate:
    """A delegate on loopback for the duration of a plan (always stopped)."""

    def __init__(
        self, offload_root: Path | None = None, cpus: frozenset[int] | None = None
    ) -> None:
        self.endpoint = f"tcp://127.0.0.1:{_free_port()}"
        self.proc: subprocess.Popen | None = None
        self.offload_root = offload_root
        self.cpus = cpus

    def __enter__(self) -> LocalDelegate:
        cmd = [sys.executable, "-m", "testbed", "delegate", "--listen", self.endpoint, "--quiet"]
        if self.offload_root is not None:
            self.offload_root.mkdir(parents=True, exist_ok=True)
            cmd += ["--offload-root", str(self.offload_root)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     preexec_fn=_pinner(self.cpus), env=_testbed_env())  # fmt: skip
        try:
            deadline = time.monotonic() + LOCAL_DELEGATE_START_S
            while True:
                if self.proc.poll() is not None:
                    raise TestbedError(f"local delegate exited with status {self.proc.returncode}")
                try:
                    ping(self.endpoint, timeout_s=0.5)
                    return self
                except TestbedError:
                    if time.monotonic() > deadline:
                        raise TestbedError(
                            f"local delegate at {self.endpoint} did not answer"
                        ) from None
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait4(pid: int, timeout_s: float) -> tuple[int, int, Any]:
    """``os.wait4`` (status and rusage of the child) with a kill after ``timeout_s``."""
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        result = os.wait4(pid, 0)
    finally:
        timer.cancel()
    if fired.is_set():
        raise subprocess.TimeoutExpired(str(pid), timeout_s)
    return result


def _pinner(cpus: frozenset[int] | None):
    """A preexec_fn that pins the new process (all its future threads) to ``cpus``."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


# ---------------------------------------------------------------- runner


class Runner:
    """Runs the cells of a plan into ``results/<host>/``."""

    def __init__(self, plan: Plan, results: Path, host: str, work: Path, out=sys.stderr):
        self.plan, self.results, self.host, self.work, self.out = plan, results, host, work, out
        self.base = results / host
        self.endpoints: dict[str, str] = {}
        self.curve_keys: str | None = None  # for every delegate but "local"
        self.native: dict[str, dict[str, Any]] = {}
        self.profiles: dict[str, Path] = {}
        self.place = cpus.placement(plan.pin)
        self.delegate_pids: dict[str, int] = {}  # local delegates: CPU time read from /proc
        self.staged: set[str] = set()

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def input_for(self, w: Workload) -> Path:
        if w.gamma is not None:  # the gain benchmark reads no input
            return self.work / "input.txt"
        d = self.work / f"{w.name}-{w.size_mb:g}mb-{w.seed}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / "input.txt"
        generate_input(path, w.size_mb, w.seed)
        return path

    def _native(self, w: Workload, out: Path) -> dict[str, Any]:
        """Run ``w`` natively (pinned like the program of forwarded runs)."""
        argv = _argv(w, self.input_for(w))
        started = time.time()
        with open(out, "wb") as f:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.DEVNULL, cwd=self.work,
                                    preexec_fn=_pinner(self.place.program))  # fmt: skip
            try:
                _pid, status, ru = _wait4(proc.pid, self.plan.timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise TestbedError(f"native run of {w.name} timed out") from None
            wall = time.monotonic() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        return {
            "workload": w.name,
            "argv": argv,
            "exit_status": proc.returncode,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "wall_s": wall,
            "user_s": ru.ru_utime,
            "sys_s": ru.ru_stime,
            "output_bytes": out.stat().st_size,
            "output_sha256": _sha256(out),
        }

    def offload_input(self, w: Workload, delegate: DelegateSpec) -> Path:
        """The workload's input copied (``cp -p``, offloaded) into the offloaded tree."""
        endpoint = self.endpoints[delegate.name]
        keys = (
            ["--curve-keys", self.curve_keys]
            if self.curve_keys and delegate.endpoint != "local"
            else []
        )
        local = self.input_for(w)
        remote = Path(self.plan.offload_path, self.plan.name, local.parent.name, local.name)
        key = f"{endpoint} {remote}"
        if key in self.staged:
            return remote
        cmd = [sys.executable, "-m", "testbed", "run", "--quiet", "--delegate", endpoint,
               "--mode", "offload", "--offload-path", str(self.plan.offload_path),
               "--backend", self.plan.backend, *keys, "-o", str(self.work / "stage-run"), "--",
               "sh", "-c", 'mkdir -p "$(dirname "$2")" && cp -p "$1" "$2"', "sh",
               str(local), str(remote)]  # fmt: skip
        shutil.rmtree(self.work / "stage-run", ignore_errors=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.plan.timeout_s)
        if proc.returncode != 0:
            raise TestbedError(f"staging the input of {w.name} at the delegate failed: "
                               f"{_tail(proc.stderr)}")  # fmt: skip
        self.staged.add(key)
        return remote

    def native_run(self, w: Workload) -> dict[str, Any]:
        """The reference native run of ``w`` (output checksum), cached in native/<workload>.json."""
        path = self.base / "native" / f"{w.name}.json"
        if w.name in self.native:
            return self.native[w.name]
        if path.exists():
            self.native[w.name] = json.loads(path.read_text())
            return self.native[w.name]
        info = self._native(w, self.work / f"{w.name}.native.out")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n")
        self.native[w.name] = info
        return info

    def paired_native(self, cell: Cell) -> dict[str, Any]:
        """The native run just before ``cell``: a run directory native/<run_id>/ (kind native)."""
        w = cell.workload
        ref = self.native_run(w)
        final = (
            self.base / "native" / cell.run_id
        )  # redone with the cell, so it stays "just before"
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        info = self._native(w, self.work / f"{w.name}.native.out")
        meta = {
            "kind": "native",
            "command": info["argv"],
            "command_line": " ".join(info["argv"]),
            "workload": w.name,
            **{k: info[k] for k in ("exit_status", "started_at", "wall_s", "user_s", "sys_s")},
            "cpu": {"program_cpus": sorted(self.place.program) if self.place.program else None,
                    "cpu_count": os.cpu_count()},
            "host": host_metadata(),
        }  # fmt: skip
        rundir.write_meta(partial, meta)
        exp = self._cell_json(cell) | {
            "kind": "native",
            "paired_with": cell.run_id,
            "exit_status": info["exit_status"],
            "wall_s": info["wall_s"],
            "output_sha256": info["output_sha256"],
            "output_matches_native": info["output_sha256"] == ref["output_sha256"],
        }
        (partial / "experiment.json").write_text(json.dumps(exp, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        return exp

    def _cell_json(self, cell: Cell) -> dict[str, Any]:
        return {
            "plan": self.plan.name,
            "host": self.host,
            "run_id": cell.run_id,
            "workload": cell.workload.name,
            "gamma": cell.workload.gamma,
            "forward": cell.forward.label,
            "policy": cell.forward.policy,
            "delegate": cell.delegate.name,
            "repetition": cell.rep,
            "mode": self.plan.mode,
            "backend": self.plan.backend,
            "pinning": self.place.as_json(),
        }

    def profile_for(self, w: Workload) -> Path:
        path = self.base / f"profile-{w.name}"
        if (path / rundir.RUN_JSON).exists():
            return path
        shutil.rmtree(path, ignore_errors=True)
        cmd = [
            sys.executable,
            "-m",
            "testbed",
            "profile",
            "-o",
            str(path),
            "--",
            *_argv(w, self.input_for(w)),
        ]
        proc = subprocess.run(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=self.work,
            env=_testbed_env(),
        )
        if proc.returncode != 0 or not (path / rundir.RUN_JSON).exists():
            raise TestbedError(f"native profile of {w.name} failed: {_tail(proc.stderr)}")
        info = {"plan": self.plan.name, "host": self.host, "kind": "profile",
                "workload": w.name, "gamma": w.gamma}  # fmt: skip
        (path / "experiment.json").write_text(json.dumps(info, indent=2) + "\n")
        return path

    def done(self, cell: Cell) -> bool:
        d = self.base / cell.run_id
        if not (d / "experiment.json").exists():
            return False
        try:
            return rundir.load(d).complete
        except TestbedError:
            return False

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        final = self.base / cell.run_id
        partial = self.base / (cell.run_id + ".partial")
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        w = cell.workload
        native = self.native_run(w)
        paired = self.paired_native(cell)  # native, forwarded, native, forwarded ...
        if self.plan.offload_path:
            argv = _argv(w, self.offload_input(w, cell.delegate))
        else:
            argv = _argv(w, self.input_for(w))
        # A subprocess, not testbed.run.run in process: the relay is pinned to its
        # own CPUs (preexec_fn), killed on the plan's timeout, and its CPU time
        # (run.json) must not include this runner's or a local delegate's.
        cmd = [sys.executable, "-m", "testbed", "run"] + _mechanism_args(
            cell.delegate, self.endpoints[cell.delegate.name], self.plan
        )
        if self.curve_keys and cell.delegate.endpoint not in ("local", "kthread"):
            cmd += ["--curve-keys", self.curve_keys]
        if self.plan.offload_path:
            cmd += ["--offload-path", self.plan.offload_path]
        elif cell.forward.policy:
            cmd += ["--policy", cell.forward.policy, "--profile", str(self.profile_for(w))]
        else:
            cmd += ["--forward", ",".join(cell.forward.names)]
        cmd += ["--quiet", "-o", str(partial)]
        if self.place.program is not None:
            cmd += ["--pin-program", cpus.format_cpus(self.place.program)]
        out = self.work / f"{w.name}.run.out"
        dpid = self.delegate_pids.get(cell.delegate.name)
        d0 = cpus.proc_cpu_s(dpid) if dpid else None
        t0 = time.monotonic()
        try:
            with open(out, "wb") as f:
                proc = subprocess.run(
                    [*cmd, "--", *argv], stdout=f, stderr=subprocess.PIPE, text=True, cwd=self.work,
                    env=_testbed_env(), preexec_fn=_pinner(self.place.relay),
                    timeout=self.plan.timeout_s,
                )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {self.plan.timeout_s:g} s"}
        elapsed = time.monotonic() - t0
        d1 = cpus.proc_cpu_s(dpid) if dpid else None
        try:
            run = rundir.load(partial)
            if not run.complete:  # the relay died: run.json was never completed
                raise TestbedError("incomplete run directory")
        except TestbedError:
            return {
                "status": "failed",
                "error": _tail(proc.stderr) or f"testbed run exit {proc.returncode}",
            }
        sha = _sha256(out)
        cpu = run.meta.get("cpu") or {}
        delegate_cpus = (
            sorted(self.place.delegate) if self.place.delegate is not None and dpid
            else cpus.affinity(dpid) if dpid else None
        )  # fmt: skip
        info = self._cell_json(cell) | {
            "argv": argv,
            "forward_syscalls": list(cell.forward.names) or run.meta.get("forwarded", []),
            "endpoint": self.endpoints[cell.delegate.name],
            "repetition": cell.rep,
            "mode": run.meta.get("mode", self.plan.mode),
            "backend": run.meta.get("backend", self.plan.backend),
            "native_run": f"native/{cell.run_id}",
            "native_paired_wall_s": paired.get("wall_s"),
            "cpu": cpus.cell_cpu(cpu, delegate_cpus, d1 - d0 if None not in (d0, d1) else None),
            "exit_status": run.meta.get("exit_status", proc.returncode),
            "elapsed_s": elapsed,
            "output_bytes": out.stat().st_size,
            "output_sha256": sha,
            "native_output_sha256": native["output_sha256"],
            "output_matches_native": sha == native["output_sha256"],
            "native_wall_s": native["wall_s"],
        }
        (partial / "experiment.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(partial, final)
        ok = info["exit_status"] == 0 and info["output_matches_native"]
        info["status"] = (
            "ok" if ok else "mismatch" if info["exit_status"] == 0 else "program-failed"
        )
        info["f_c_us"] = (run.meta.get("summary") or {}).get("f_c_us")
        info["calls"] = (run.meta.get("calls") or {}).get("count")
        return info

    def run(self, todo: list[Cell], total: int, skipped: int) -> dict[str, int]:
        counts = {"ran": 0, "skipped": skipped, "failed": 0}
        t_start = time.monotonic()
        for i, cell in enumerate(todo, start=1):
            k = skipped + i
            label = f"[{k:>{len(str(total))}}/{total}] {cell.run_id}"
            info = self.run_cell(cell)
            counts["ran"] += 1
            if info["status"] != "ok":
                counts["failed"] += 1
            spent = time.monotonic() - t_start
            eta = spent / i * (len(todo) - i)
            detail = info.get("error") or (
                f"{info['elapsed_s']:.2f} s"
                + (
                    f", f_c {info['f_c_us']:.1f} us"
                    if isinstance(info.get("f_c_us"), int | float)
                    else ""
                )
                + ("" if info["output_matches_native"] else ", OUTPUT DIFFERS FROM NATIVE")
            )
            self.say(f"{label}  {info['status']}  {detail}  (eta {eta:.0f} s)")
        return counts


def _mechanism_args(d: DelegateSpec, endpoint: str, plan: Plan) -> list[str]:
    """``testbed run`` options that choose the mechanism of a cell."""
    if d.kthread:
        args = ["--backend", "kmod", "--mode", "kthread", "--delay-us", f"{d.delay_us:g}"]
        return (
            args
            + (["--faithful"] if d.faithful else [])
            + (["--flush-caller-tlb"] if d.flush_caller_tlb else [])
        )
    return ["--delegate", endpoint, "--mode", plan.mode, "--backend", plan.backend]


def kthread_unavailable() -> str | None:
    """Why this node cannot run kthread cells, or None if it can."""
    from testbed.interpose.kmod import DEVICE

    if not os.path.exists(DEVICE):
        return f"mktrace module not loaded ({DEVICE} missing: seccomp-only node)"
    return None


def _tail(text: str | None) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _comparable(plan_json: dict[str, Any]) -> dict[str, Any]:
    """A plan without its delegate endpoints (those may move between invocations)."""
    out = dict(plan_json)
    out["delegates"] = [d.get("name") for d in plan_json.get("delegates", [])]
    return out


def check_results_dir(plan: Plan, results: Path) -> None:
    """Refuse to resume into a results folder that holds a different plan."""
    try:
        old = json.loads((results / "plan.json").read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        raise PlanError(
            f"{results}/plan.json is unreadable; choose another results folder"
        ) from None
    if _comparable(old) != _comparable(plan.to_json()):
        raise PlanError(
            f"{results} holds results of a different plan ({old.get('name')!r}); "
            "choose another results folder (-o) or remove it"
        )


def run_plan(
    plan: Plan,
    results: Path,
    host: str,
    out=sys.stderr,
    curve_keys: str | None = None,
) -> dict[str, int]:
    """Run every unfinished cell of ``plan``; returns counts ran/skipped/failed."""
    check_results_dir(plan, results)
    cpus.placement(plan.pin)  # pin: true on a node with < 2 CPUs: refused before any run
    results.mkdir(parents=True, exist_ok=True)
    (results / "plan.json").write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    all_cells = cells(plan)
    work = Path(tempfile.mkdtemp(prefix="testbed-experiment-"))
    runner = Runner(plan, results, host, work, out)
    runner.curve_keys = curve_keys
    todo = [c for c in all_cells if not runner.done(c)]
    kthread = [d.name for d in plan.delegates if d.kthread]
    why = kthread_unavailable() if kthread else None
    if why:
        n_before = len(todo)
        todo = [c for c in todo if not c.delegate.kthread]
        runner.say(f"experiment {plan.name}: skipping delegate(s) {', '.join(kthread)} on {host} "
                   f"({n_before - len(todo)} runs): {why}")  # fmt: skip
    skipped = len(all_cells) - len(todo)
    runner.say(
        f"experiment {plan.name}: {len(all_cells)} runs "
        f"({len(plan.workloads)} workloads x {len(plan.forward)} forwarded sets x "
        f"{len(plan.delegates)} delegates x {plan.repetitions} repetitions) on {host}; "
        f"{skipped} already finished"
    )
    try:
        if not todo:
            return {"ran": 0, "skipped": skipped, "failed": 0}
        needs_local = any(c.delegate.endpoint == "local" for c in todo)
        root = work / "offload-root" if plan.offload_path else None
        local = LocalDelegate(root, runner.place.delegate) if needs_local else None
        if local is not None:
            local.__enter__()
        try:
            for d in plan.delegates:
                if d.kthread:
                    runner.endpoints[d.name] = "kthread"
                    continue
                if d.endpoint == "local":
                    runner.endpoints[d.name] = local.endpoint if local else "local"
                    if local is not None and local.proc is not None:
                        runner.delegate_pids[d.name] = local.proc.pid
                    continue
                try:
                    ping(d.endpoint, timeout_s=5.0, curve_keys=curve_keys)
                except TestbedError as exc:
                    raise TestbedError(f"delegate {d.name}: {exc}") from None
                runner.endpoints[d.name] = d.endpoint
            return runner.run(todo, len(all_cells), skipped)
        finally:
            if local is not None:
                local.__exit__()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main_experiment(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan, args.delegate or None)
    if args.check:
        n = len(cells(plan))
        print(f"plan {plan.name}: valid, {n} runs")
        return 0
    results = Path(args.output or Path("results") / plan.name).absolute()
    host = _label(args.host_label or socket.gethostname())
    curve = getattr(args, "curve_keys", None)
    counts = run_plan(
        plan, results, host, curve_keys=str(Path(curve).absolute()) if curve else None
    )
    print(
        f"experiment {plan.name}: ran={counts['ran']} skipped={counts['skipped']} "
        f"failed={counts['failed']} results={results}"
    )
    return 1 if counts["failed"] else 0
