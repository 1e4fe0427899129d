"""Experiment plans: the schema, its validation and the matrix of cells.

A plan (YAML or JSON, documented in ``testbed.jobs.experiment``) is validated in
full before anything runs: :func:`load_plan` / :func:`parse_plan` return a
:class:`Plan` or raise one :class:`PlanError`; :func:`cells` lists the runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.compute.spec import READ_AHEAD_MAX
from testbed.core import syscalls
from testbed.core.errors import TestbedError
from testbed.core.keys import EndpointError, parse_endpoint
from testbed.core.policy import parse_policy
from testbed.core.predictors import check_predictor
from testbed.jobs import gainbench
from testbed.jobs.workloads import CATALOGUE, DEFAULT_SIZE_MB, WORKLOADS

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
    "offload_read_ahead",
    "resolve",
    "predictor",
    "replay",
}

#: How a policy becomes a syscall set: ``once`` for the whole experiment (from
#: the profile of the machine that resolves it, the controller under Ansible:
#: every node forwards the same set), or ``per-host`` (each node from its own
#: profile; its set may differ from another node's).
RESOLVE = ("once", "per-host")


class PlanError(TestbedError):
    """A plan that cannot be run as written."""


@dataclass(frozen=True)
class ReplaySpec:
    """``replay: {from: NAME, elide_compute: false}``: after the cells, every cell run on
    delegate NAME is replayed (``testbed replay``) against each other delegate of the
    plan, predicting the cells run there for real (docs/whatif.md)."""

    source: str
    elide_compute: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "elide_compute": self.elide_compute}


@dataclass(frozen=True)
class Workload:
    name: str
    argv: tuple[str, ...]
    size_mb: float
    seed: int
    gamma: int | None = None  # the gain benchmark's gain
    catalogue: str | None = None  # the catalogue entry (its inputs), None for a plan's command


@dataclass(frozen=True)
class Forward:
    label: str
    names: tuple[str, ...] = ()  # syscall names (explicit set)
    policy: str | None = None


@dataclass(frozen=True)
class DelegateSpec:
    name: str
    endpoint: str  # "local" = start one on loopback, "kthread" = the module's kernel thread
    delay_us: float = 0.0  # kthread: spin per leg; {local: ...}: the delegate's --delay-us
    faithful: bool = False  # kthread: the mktrace-faithful variant
    flush_caller_tlb: bool = False  # kthread, faithful only: flush the caller's CPU too
    scheme: str = "tcp"  # "local": the transport of the delegate started on this node
    same_node: bool = False  # {local: SCHEME}: a same-node mechanism, kept by --delegate

    @property
    def kthread(self) -> bool:
        return self.endpoint == "kthread"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "endpoint": self.endpoint}
        if self.same_node:
            out["local"] = self.scheme
            if self.delay_us:
                out["delay_us"] = self.delay_us
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
    resolve: str = "once"
    predictor: str | None = None  # declared for the report, before any data
    replay: ReplaySpec | None = None
    offload_read_ahead: int = 0  # mode offload: testbed run --offload-read-ahead N

    @property
    def policies(self) -> list[str]:
        """The policies of the forward entries (to be resolved into syscall sets)."""
        return [f.policy for f in self.forward if f.policy]

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
            | ({"offload_read_ahead": self.offload_read_ahead} if self.offload_read_ahead else {})
            | ({"resolve": self.resolve} if self.policies else {})
            | ({"predictor": self.predictor} if self.predictor else {})
            | ({"replay": self.replay.to_json()} if self.replay else {})
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


def label(text: str) -> str:
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
            import yaml  # lazy: PyYAML (16 ms), plan files only

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise PlanError(
            f"plan {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({first})"
        ) from None
    if not isinstance(data, dict):
        raise PlanError(f"plan {path}: expected a mapping with workloads, forward, delegates")
    return data


GAINBENCH_KEYS = {"name", "gamma", "phases", "samples"}
#: The workload names of the gain benchmark: ``gainbench``, and ``gain`` (its old name).
GAINBENCH_NAMES = (gainbench.WORKLOAD, *gainbench.OLD_WORKLOADS)


def _gainbench_workloads(item: dict, where: str) -> list[Workload]:
    """``{name: gainbench, gamma: G or [G...], phases, samples}``: one workload per gain,
    named ``<name>-g<G>`` after the name the plan used (``gain`` keeps ``gain-g<G>``)."""
    name = item["name"]
    unknown = set(item) - GAINBENCH_KEYS
    if unknown:
        raise PlanError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))} in workload {name!r}"
        )
    gammas = item.get("gamma", 1)
    gammas = gammas if isinstance(gammas, list) else [gammas]
    try:
        gammas = [gainbench.check_gamma(g) for g in gammas]
    except TestbedError as exc:
        raise PlanError(f"{where}: workload {name!r}: {exc}") from None
    if not gammas or len(set(gammas)) != len(gammas):
        raise PlanError(f"{where}: workload {name!r}: gamma must be distinct integers")
    phases, samples = (
        item.get("phases", gainbench.DEFAULT_PHASES),
        item.get("samples", gainbench.DEFAULT_SAMPLES),
    )
    for key, v in (("phases", phases), ("samples", samples)):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10**12:
            raise PlanError(f"{where}: workload {name!r}: {key} must be an integer >= 1")
    try:
        gainbench.build()  # compile now: a broken compiler is a plan error, not a failed run
    except TestbedError as exc:
        raise PlanError(f"{where}: {exc}") from None
    argv = ("{gainbench}", "{gamma}", str(phases), str(samples))
    return [Workload(f"{name}-g{g}", argv, 0.0, 0, gamma=g) for g in gammas]


def _workloads(item: Any, where: str) -> list[Workload]:
    if isinstance(item, dict) and item.get("name") in GAINBENCH_NAMES and "command" not in item:
        return _gainbench_workloads(item, where)
    if item in GAINBENCH_NAMES:
        return _gainbench_workloads({"name": item}, where)
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
    catalogue = None
    if command is None:
        catalogue = name
        if name not in WORKLOADS:
            raise PlanError(
                f"{where}: unknown workload {name!r} (known: {', '.join(sorted([*WORKLOADS, gainbench.WORKLOAD]))}; "
                "or give a 'command')"
            )
        command = WORKLOADS[name]
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
        raise PlanError(
            f"{where}: command of workload {name!r} must be a non-empty list of strings"
        )
    program = CATALOGUE[catalogue].program if catalogue else command[0]
    if shutil.which(program) is None:
        raise PlanError(f"{where}: program {program!r} of workload {name!r} not found on PATH")
    try:
        default = CATALOGUE[catalogue].size_mb if catalogue else DEFAULT_SIZE_MB
        size = float(item.get("size_mb", default))
        seed = int(item.get("seed", 1))
    except (TypeError, ValueError):
        raise PlanError(f"{where}: size_mb and seed of workload {name!r} must be numbers") from None
    if not 0 < size <= 4096:
        raise PlanError(f"{where}: size_mb of workload {name!r} must be in (0, 4096]")
    return Workload(label(name), tuple(command), size, seed, catalogue=catalogue)


def _forward(item: Any, where: str) -> Forward:
    if isinstance(item, dict):
        if set(item) != {"policy"} or not isinstance(item["policy"], str):
            raise PlanError(f"{where}: a forward entry is a syscall list or {{policy: SPEC}}")

        try:
            pol = parse_policy(item["policy"])
        except TestbedError as exc:
            raise PlanError(f"{where}: {exc}") from None
        if pol.kind == "list":
            return _forward(item["policy"], where)
        return Forward(label(item["policy"]), policy=item["policy"].strip())
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
    if item == "local":
        return DelegateSpec("local", "local")
    if item == "kthread":
        return DelegateSpec("kthread", "kthread")
    if isinstance(item, dict) and "kthread" in item:
        return _kthread_delegate(item, where)
    if isinstance(item, dict) and "local" in item:
        if set(item) - {"name", "local", "delay_us"} or item["local"] not in LOCAL_SCHEMES:
            raise PlanError(f"{where}: a same-node delegate is {{name, local: tcp|ipc|shm}} "
                            "with an optional delay_us")  # fmt: skip
        delay = _delay_us(item.get("delay_us", 0.0), f"{where}: delay_us of a same-node delegate")
        name = label(str(item.get("name") or f"local-{item['local']}"))
        return DelegateSpec(name, "local", delay_us=delay, scheme=item["local"], same_node=True)
    if isinstance(item, str):
        item = {"endpoint": item}
    if not isinstance(item, dict) or not isinstance(item.get("endpoint"), str):
        raise PlanError(f"{where}: a delegate is 'local', an endpoint or {{name, endpoint}}")
    try:
        ep = parse_endpoint(item["endpoint"])
    except EndpointError as exc:
        raise PlanError(f"{where}: {exc}") from None
    name = item.get("name") or ep.split("://", 1)[1]
    return DelegateSpec(label(str(name)), ep)


def _delay_us(value: Any, what: str) -> float:
    """An injected delay in microseconds, a number in [0, 1000000] (else PlanError)."""
    try:
        delay = float(value)
    except (TypeError, ValueError):
        delay = -1.0
    if not 0 <= delay <= 1e6:
        raise PlanError(f"{what} must be a number in [0, 1000000]")
    return delay


KTHREAD_KEYS = {"delay_us", "faithful", "flush_caller_tlb"}
#: Transports of a delegate a plan starts on the node itself (``{local: SCHEME}``).
LOCAL_SCHEMES = ("tcp", "ipc", "shm")


def _kthread_delegate(item: dict, where: str) -> DelegateSpec:
    opts = item["kthread"]
    if opts is True or opts is None:
        opts = {}
    unknown = set(item) - {"name", "kthread"}
    if not isinstance(opts, dict) or unknown or set(opts) - KTHREAD_KEYS:
        raise PlanError(
            f"{where}: a kthread delegate is {{name, kthread: {{delay_us, faithful, flush_caller_tlb}}}}"
        )
    delay = _delay_us(opts.get("delay_us", 0.0), f"{where}: kthread delay_us")
    faithful = opts.get("faithful", False)
    flush = opts.get("flush_caller_tlb", False)
    if not isinstance(faithful, bool) or not isinstance(flush, bool):
        raise PlanError(f"{where}: kthread faithful and flush_caller_tlb must be true or false")
    if flush and not faithful:
        raise PlanError(f"{where}: kthread flush_caller_tlb needs faithful: true")
    name = label(str(item.get("name") or "kthread"))
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
        # same-node mechanisms (the module's kernel thread, {local: SCHEME}) are not
        # replaced by network ones
        plan_specs = (_delegate(x, where) for x in data.get("delegates") or [])
        specs += [d for d in plan_specs if d.kthread or d.same_node]
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
    plan_name = label(str(data.get("name") or name))
    resolve = data.get("resolve", "once")
    if resolve not in RESOLVE:
        raise PlanError(f"{where}: resolve must be once or per-host, not {resolve!r}")
    if "resolve" in data and not any(f.policy for f in forward):
        raise PlanError(f"{where}: resolve is only used with policy forward entries")
    predictor = data.get("predictor")
    if predictor is not None:
        try:
            check_predictor(str(predictor), f"{where}: predictor")
        except TestbedError as exc:
            raise PlanError(str(exc)) from None
    return Plan(
        plan_name, reps, mode, backend, timeout, workloads, forward, specs, pin, offload_path,
        resolve, None if predictor is None else str(predictor),
        _replay(data.get("replay"), specs, mode, where), _read_ahead(data, offload_path, where),
    )  # fmt: skip


def _read_ahead(data: dict, offload_path: str | None, where: str) -> int:
    """``offload_read_ahead: N`` (mode offload): every cell runs with --offload-read-ahead N."""
    n = data.get("offload_read_ahead", 0)
    if n and not offload_path:
        raise PlanError(f"{where}: offload_read_ahead is only used with mode: offload")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= READ_AHEAD_MAX:
        raise PlanError(f"{where}: offload_read_ahead must be a number of reads in "
                        f"0..{READ_AHEAD_MAX}, not {n!r}")  # fmt: skip
    return n


def _replay(item: Any, specs: list[DelegateSpec], mode: str, where: str) -> ReplaySpec | None:
    if item is None:
        return None
    if not isinstance(item, dict) or set(item) - {"from", "elide_compute"} or "from" not in item:
        raise PlanError(f"{where}: replay is {{from: DELEGATE, elide_compute: true|false}}")
    if mode != "cost":
        raise PlanError(f"{where}: replay re-issues cost-mode runs; not with mode: {mode}")
    source = label(str(item["from"]))
    targets = [d.name for d in specs if not d.kthread and d.name != source]
    if source not in [d.name for d in specs if not d.kthread]:
        raise PlanError(f"{where}: replay from {source!r}: not a delegate of the plan "
                        f"(a kernel thread has no calls to replay)")  # fmt: skip
    if not targets:
        raise PlanError(f"{where}: replay from {source!r}: no other delegate to replay against")
    elide = item.get("elide_compute", False)
    if not isinstance(elide, bool):
        raise PlanError(f"{where}: replay elide_compute must be true or false")
    return ReplaySpec(source, elide)


@dataclass(frozen=True)
class ReplayCell:
    """One replay of a plan: the cell recorded on ``source`` replayed against ``target``."""

    cell: Cell  # the recorded cell
    target: DelegateSpec

    @property
    def run_id(self) -> str:
        """Named after the cell it predicts, and where it was recorded."""
        c = self.cell
        return (f"{c.workload.name}.{c.forward.label}.{self.target.name}.r{c.rep}"
                f".replayed-from-{c.delegate.name}")  # fmt: skip


def replay_cells(plan: Plan) -> list[ReplayCell]:
    """The replays of ``plan`` (none without ``replay:``), in the cells' order."""
    if plan.replay is None:
        return []
    targets = [d for d in plan.delegates if not d.kthread and d.name != plan.replay.source]
    return [
        ReplayCell(c, t) for c in cells(plan) if c.delegate.name == plan.replay.source
        for t in targets
    ]  # fmt: skip


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
