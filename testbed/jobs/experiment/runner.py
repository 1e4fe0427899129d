"""Running a plan: native references, the cells through ``testbed run``, progress, resume.

:func:`run_plan` runs every unfinished cell of a :class:`~testbed.jobs.experiment.plan.Plan`
into ``RESULTS/<host>/`` (layout in ``testbed.jobs.experiment``); :func:`main_experiment`
is ``testbed experiment``.

Each cell is a :class:`~testbed.compute.spec.RunSpec` (:meth:`Runner.cell_spec`),
built for every cell to run before the first one starts, so a cell whose
options ``testbed run`` would refuse stops the plan at once; the command line
of its ``python -m testbed run`` is :meth:`RunSpec.to_argv`, read back by the
same parser as a user's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from testbed.compute.interpose.kmod import DEVICE
from testbed.compute.spec import KthreadSpec, OffloadSpec, RunSpec
from testbed.core import cpus, rundir, syscalls
from testbed.core.errors import TestbedError
from testbed.core.hostinfo import host_metadata
from testbed.core.procs import pinner, testbed_env
from testbed.core.procs import wait4 as _wait4
from testbed.core.program import exit_status
from testbed.jobs import gainbench, workloads
from testbed.jobs.experiment.plan import (
    Cell,
    DelegateSpec,
    Plan,
    PlanError,
    ReplayCell,
    Workload,
    cells,
    label,
    load_plan,
    replay_cells,
)
from testbed.jobs.localdelegate import LocalDelegate, ping

#: The experiment's policies resolved once (``RESULTS/policies.json``, :func:`resolve_policies`).
POLICIES_JSON = "policies.json"
#: 1: version, plan, resolved_on (host label), how ("once"), profiles (workload ->
#: profile run directory relative to RESULTS), sets (workload -> policy -> syscall names).
POLICIES_VERSION = 1

#: Version of ``testbed experiment --check --json``.
#: 1: check_version, valid, plan (name), runs, normalised (as plan.json), host.
CHECK_JSON_VERSION = 1


def input_dir(work: Path, w: Workload) -> Path:
    """Where the inputs of ``w`` are generated (one folder per workload, size and seed)."""
    return work / f"{w.name}-{w.size_mb:g}mb-{w.seed}"


def workload_argv(w: Workload, directory: Path) -> list[str]:
    """The argv of ``w`` with its inputs in ``directory``."""
    if w.argv and w.argv[0] == "{gainbench}":
        return gainbench.command(int(w.gamma or 1), int(w.argv[2]), int(w.argv[3]))
    return workloads.expand(w.argv, directory)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
        self.policies: dict[str, Any] | None = None  # resolved once (policies.json)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def input_path(self, w: Workload) -> Path:
        """Where the inputs of ``w`` are (the gain benchmark reads none: the work folder)."""
        return self.work if w.gamma is not None else input_dir(self.work, w)

    def input_for(self, w: Workload) -> Path:
        """The folder holding the inputs of ``w`` (generated on first use)."""
        d = self.input_path(w)
        if w.gamma is None:
            workloads.prepare(d, w.size_mb, w.seed, w.catalogue)
        return d

    def offload_path(self, w: Workload) -> Path:
        """Where the inputs of ``w`` are in the offloaded tree (:meth:`offload_input` copies them)."""
        return Path(self.plan.offload_path, self.plan.name, self.input_path(w).name)

    def profile_path(self, w: Workload) -> Path:
        """The native profile of ``w`` a policy chooses from (:meth:`profile_for` makes it)."""
        return self.base / f"profile-{w.name}"

    def cell_spec(self, cell: Cell) -> RunSpec:
        """The ``testbed run`` of ``cell``: checked here, before any input or profile is made."""
        w, d, plan = cell.workload, cell.delegate, self.plan
        inputs = self.offload_path(w) if plan.offload_path else self.input_path(w)
        common: dict[str, Any] = {
            "program": tuple(workload_argv(w, inputs)),
            "output": str(self.base / (cell.run_id + ".partial")),
            "pin_program": self.place.program,
        }
        if plan.offload_path:
            pass  # offload mode traps the file-I/O calls itself
        elif cell.forward.policy and self.policies is not None:
            common["forward"] = ",".join(self.resolved_set(cell))
        elif cell.forward.policy:
            common.update(policy=cell.forward.policy, profile=str(self.profile_path(w)))
        else:
            common["forward"] = ",".join(cell.forward.names)
        if d.kthread:
            kthread = KthreadSpec(d.delay_us, d.faithful, d.flush_caller_tlb)
            return RunSpec(mode="kthread", backend="kmod", kthread=kthread, **common)
        return RunSpec(
            mode=plan.mode,
            backend=plan.backend,
            delegate=self.endpoints[d.name],
            curve_keys=self.curve_keys if d.endpoint != "local" else None,
            offload=(
                OffloadSpec((plan.offload_path,), read_ahead=plan.offload_read_ahead)
                if plan.offload_path
                else None
            ),
            **common,
        )

    def _native(self, w: Workload, out: Path) -> dict[str, Any]:
        """Run ``w`` natively (pinned like the program of forwarded runs)."""
        argv = workload_argv(w, self.input_for(w))
        started = time.time()
        with open(out, "wb") as f:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.DEVNULL, cwd=self.work,
                                    preexec_fn=pinner(self.place.program))  # fmt: skip
            try:
                _pid, status, ru = _wait4(proc.pid, self.plan.timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise TestbedError(f"native run of {w.name} timed out") from None
            wall = time.monotonic() - t0
            proc.returncode = exit_status(status)  # 128 + N when killed, like run
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
        """The workload's input folder copied (``cp -pR``, offloaded) into the offloaded tree."""
        endpoint = self.endpoints[delegate.name]
        local = self.input_for(w)
        remote = self.offload_path(w)
        key = f"{endpoint} {remote}"
        if key in self.staged:
            return remote
        spec = RunSpec(
            ("sh", "-c", 'mkdir -p "$2" && cp -pR "$1"/. "$2"/', "sh", str(local), str(remote)),
            mode="offload",
            backend=self.plan.backend,
            delegate=endpoint,
            curve_keys=self.curve_keys if delegate.endpoint != "local" else None,
            offload=OffloadSpec((self.plan.offload_path,)),
            output=str(self.work / "stage-run"),
        )
        cmd = [sys.executable, "-m", "testbed", "run", "--quiet", *spec.to_argv()]
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

    def resolved_set(self, cell: Cell) -> list[str]:
        """The syscall names ``cell``'s policy was resolved to once for the experiment."""
        assert self.policies is not None and cell.forward.policy
        return self.policies["sets"][cell.workload.name][cell.forward.policy]

    def resolution(self, cell: Cell) -> dict[str, Any]:
        """How ``cell``'s policy became its syscall set (experiment.json ``resolution``)."""
        if not cell.forward.policy:
            return {}
        if self.policies is None:
            return {"resolution": {"how": "per-host", "on": self.host,
                                   "profile": f"{self.host}/profile-{cell.workload.name}"}}  # fmt: skip
        return {"resolution": {
            "how": "once", "on": self.policies["resolved_on"],
            "profile": self.policies["profiles"].get(cell.workload.name),
            "set": self.resolved_set(cell),
        }}  # fmt: skip

    def _cell_json(self, cell: Cell) -> dict[str, Any]:
        declared = {"predictor": self.plan.predictor} if self.plan.predictor else {}
        return (
            self.resolution(cell)
            | declared
            | {
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
        )

    def profile_for(self, w: Workload) -> Path:
        path = self.profile_path(w)
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
            *workload_argv(w, self.input_for(w)),
        ]
        with open(self.work / f"{w.name}.profile.out", "wb") as out:  # not /dev/null: tar
            proc = subprocess.run(  # skips its reads when it writes there
                cmd, stdout=out, stderr=subprocess.PIPE, text=True, cwd=self.work,
                env=testbed_env(),
            )  # fmt: skip
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

    def run_cell(self, cell: Cell, spec: RunSpec | None = None) -> dict[str, Any]:
        """Run ``cell`` as ``spec`` (default: :meth:`cell_spec`) after its native pair."""
        spec = spec or self.cell_spec(cell)
        final = self.base / cell.run_id
        partial = Path(spec.output)
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        w = cell.workload
        native = self.native_run(w)
        paired = self.paired_native(cell)  # native, forwarded, native, forwarded ...
        if self.plan.offload_path:
            self.offload_input(w, cell.delegate)
        else:
            self.input_for(w)
        if spec.profile:
            self.profile_for(w)
        argv = list(spec.program)
        # A subprocess, not testbed.compute.run.run in process: the relay is pinned to its
        # own CPUs (preexec_fn), killed on the plan's timeout, and its CPU time
        # (run.json) must not include this runner's or a local delegate's.
        cmd = [sys.executable, "-m", "testbed", "run", "--quiet", *spec.to_argv()]
        out = self.work / f"{w.name}.run.out"
        dpid = self.delegate_pids.get(cell.delegate.name)
        d0 = cpus.proc_cpu_s(dpid) if dpid else None
        t0 = time.monotonic()
        try:
            with open(out, "wb") as f:
                proc = subprocess.run(
                    cmd, stdout=f, stderr=subprocess.PIPE, text=True, cwd=self.work,
                    env=testbed_env(), preexec_fn=pinner(self.place.relay),
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

    def replay_done(self, rc: ReplayCell) -> bool:
        d = self.base / rc.run_id
        try:
            return (d / "experiment.json").exists() and rundir.load(d).complete
        except TestbedError:
            return False

    def run_replay(self, rc: ReplayCell) -> dict[str, Any]:
        """``testbed replay`` of the recorded cell against ``rc.target`` (docs/whatif.md)."""
        source = self.base / rc.cell.run_id
        final = self.base / rc.run_id
        partial = self.base / (rc.run_id + ".partial")
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        if not self.done(rc.cell):
            return {"status": "failed", "error": f"its recording {rc.cell.run_id} did not finish"}
        cmd = [sys.executable, "-m", "testbed", "replay", "--quiet", str(source),
               "--delegate", self.endpoints[rc.target.name], "-o", str(partial)]  # fmt: skip
        if self.plan.replay is not None and self.plan.replay.elide_compute:
            cmd.append("--elide-compute")
        if self.curve_keys and not rc.target.same_node:
            cmd += ["--curve-keys", self.curve_keys]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, cwd=self.work, env=testbed_env(),
                                  preexec_fn=pinner(self.place.relay),
                                  timeout=self.plan.timeout_s)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {self.plan.timeout_s:g} s"}
        try:
            run = rundir.load(partial)
            if not run.complete:
                raise TestbedError("incomplete run directory")
        except TestbedError:
            return {"status": "failed",
                    "error": _tail(proc.stderr) or f"testbed replay exit {proc.returncode}"}  # fmt: skip
        cell = rc.cell
        info = {
            "plan": self.plan.name,
            "host": self.host,
            "workload": cell.workload.name,
            "forward": cell.forward.label,
            "delegate": rc.target.name,
            "repetition": cell.rep,
            "replay_of": cell.run_id,
            "recorded_on": cell.delegate.name,
            "endpoint": self.endpoints[rc.target.name],
            "mode": "replay",
        }
        (partial / "experiment.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(partial, final)
        faults = (run.meta.get("calls") or {}).get("faults", 0)
        return {**info, "status": "ok" if not faults else "faults",
                "wall_s": run.meta.get("wall_s")}  # fmt: skip

    def run_replays(self, todo: list[ReplayCell], counts: dict[str, int], first: int = 1,
                    total: int | None = None) -> None:  # fmt: skip
        """Run the replays ``todo`` (numbered from ``first`` of ``total``) with progress
        lines, adding to ``counts``."""
        total = total or len(todo)
        for i, rc in enumerate(todo, start=first):
            info = self.run_replay(rc)
            counts["ran"] += 1
            if info["status"] != "ok":
                counts["failed"] += 1
            detail = info.get("error") or f"predicted wall {info['wall_s']:.3f} s"
            self.say(f"[replay {i}/{total}] {rc.run_id}  {info['status']}  {detail}")

    def run(
        self,
        todo: list[Cell],
        total: int,
        skipped: int,
        specs: list[RunSpec] | None = None,
        replays: list[ReplayCell] | None = None,
    ) -> dict[str, int]:
        """Run ``todo`` (as ``specs``, default :meth:`cell_spec` of each) with progress lines.

        ``replays`` run interleaved: each right after the last cell of its group (the
        repetition, workload and forwarded set of the cell it replays) has run, so a
        replay and the real runs it predicts meet the machine in the same state;
        replays of groups with nothing left to run come last."""
        counts = {"ran": 0, "skipped": skipped, "failed": 0}
        specs = specs or [self.cell_spec(c) for c in todo]
        replays = replays or []
        left: dict[tuple, int] = {}
        for c in todo:
            left[_group(c)] = left.get(_group(c), 0) + 1
        waiting: dict[tuple, list[ReplayCell]] = {}
        last = []
        for rc in replays:
            (waiting.setdefault(_group(rc.cell), []) if left.get(_group(rc.cell)) else last).append(
                rc
            )
        n_replayed = 0
        t_start = time.monotonic()
        for i, (cell, spec) in enumerate(zip(todo, specs, strict=True), start=1):
            k = skipped + i
            label = f"[{k:>{len(str(total))}}/{total}] {cell.run_id}"
            info = self.run_cell(cell, spec)
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
            left[_group(cell)] -= 1
            if not left[_group(cell)] and waiting.get(_group(cell)):
                group = waiting.pop(_group(cell))
                self.run_replays(group, counts, n_replayed + 1, len(replays))
                n_replayed += len(group)
        if last:
            self.run_replays(last, counts, n_replayed + 1, len(replays))
        return counts


def _group(c: Cell) -> tuple:
    """The cells a replay of ``c`` predicts share its repetition, workload and forwarded set."""
    return c.rep, c.workload.name, c.forward.label


def kthread_unavailable() -> str | None:
    """Why this node cannot run kthread cells, or None if it can."""

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


def resolve_policies(runner: Runner) -> dict[str, Any]:
    """Resolve every policy of the plan for every workload, once, from this machine's
    native profiles (made in ``RESULTS/<host>/profile-<workload>/``): the sets every
    node of the experiment forwards (``policies.json``, ``POLICIES_VERSION``)."""
    from testbed.core.policy import resolve_policy  # lazy: fractions, policy plans only

    plan, sets, profiles = runner.plan, {}, {}
    for w in plan.workloads:
        runner.say(f"experiment {plan.name}: profiling {w.name} natively to resolve "
                   f"{', '.join(plan.policies)} on {runner.host}")  # fmt: skip
        prof = runner.profile_for(w)
        profiles[w.name] = f"{runner.host}/{prof.name}"
        sets[w.name] = {}
        for pol in plan.policies:
            names = sorted(syscalls.name_of(n) for n in resolve_policy(pol, prof))
            if not names:
                raise PlanError(f"policy {pol!r} resolves to no system call for {w.name}")
            sets[w.name][pol] = names
            runner.say(f"  {w.name}: {pol} -> {','.join(names)} ({len(names)} types)")
    return {"version": POLICIES_VERSION, "plan": plan.name, "resolved_on": runner.host,
            "how": "once", "profiles": profiles, "sets": sets}  # fmt: skip


def read_policies(path: Path, plan: Plan) -> dict[str, Any]:
    """``policies.json`` written by :func:`resolve_policies` for ``plan``, checked."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"{path}: no such file (make it with testbed experiment PLAN "
                        "--resolve-policies -o RESULTS)") from None  # fmt: skip
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != POLICIES_VERSION:
        raise PlanError(f"{path}: not a policies.json of version {POLICIES_VERSION}")
    if data.get("plan") != plan.name:
        raise PlanError(f"{path}: resolved for plan {data.get('plan')!r}, not {plan.name!r}")
    sets = data.get("sets")
    if not isinstance(data.get("profiles"), dict) or not isinstance(data.get("resolved_on"), str):
        raise PlanError(f"{path}: resolved_on or profiles missing")
    for w in plan.workloads:
        for pol in plan.policies:
            names = (sets or {}).get(w.name, {}).get(pol) if isinstance(sets, dict) else None
            if not isinstance(names, list) or not names:
                raise PlanError(f"{path}: no syscall set for workload {w.name!r} and policy "
                                f"{pol!r} (resolved for another version of the plan?)")  # fmt: skip
            try:
                for n in names:
                    syscalls.lookup(str(n))
            except TestbedError as exc:
                raise PlanError(f"{path}: {w.name} {pol}: {exc}") from None
    return data


def _policies(runner: Runner, results: Path, given: Path | None) -> dict[str, Any] | None:
    """The sets this run forwards for the plan's policies: ``given`` (the controller's),
    else the ones this results folder already resolved (resume), else resolved here.
    None with ``resolve: per-host`` (each cell resolves from this node's profile)."""
    plan = runner.plan
    if not plan.policies or plan.resolve == "per-host":
        if given is not None:
            raise PlanError(f"--policies: plan {plan.name} has no policy resolved once "
                            f"({'resolve: per-host' if plan.policies else 'no policy'})")  # fmt: skip
        return None
    mine = results / POLICIES_JSON
    if given is not None:
        data = read_policies(given, plan)
    elif mine.exists():
        data = read_policies(mine, plan)
    else:
        data = resolve_policies(runner)
    if mine.exists() and read_policies(mine, plan)["sets"] != data["sets"]:
        raise PlanError(f"{mine} holds other syscall sets for this plan's policies than "
                        f"{given}; choose another results folder (-o) or remove it")  # fmt: skip
    mine.write_text(json.dumps(data, indent=2) + "\n")
    return data


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
    policies: Path | None = None,
) -> dict[str, int]:
    """Run every unfinished cell of ``plan``; returns counts ran/skipped/failed.

    ``policies``: the plan's policies as resolved once for the experiment (by
    ``--resolve-policies`` on the controller); without it they are resolved
    here, once, before the first cell."""
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
    replays = [rc for rc in replay_cells(plan) if not runner.replay_done(rc)]
    if replays:
        runner.say(f"experiment {plan.name}: and {len(replays)} replays of the runs on "
                   f"{plan.replay.source} against the other delegates, each after the "
                   "runs it predicts")  # fmt: skip
    try:
        if not todo and not replays:
            return {"ran": 0, "skipped": skipped, "failed": 0}
        # one delegate on this node per transport (and injected delay) its local
        # delegates use, for the cells to run and the delegates replays target
        wanted = [c.delegate for c in todo] + [rc.target for rc in replays]
        keys = sorted({(d.scheme, d.delay_us) for d in wanted if d.endpoint == "local"})
        locals_ = {
            (sc, delay): LocalDelegate(
                ["--delay-us", f"{delay:g}"] if delay else None,
                offload_root=(work / f"offload-root-{sc}") if plan.offload_path else None,
                cpus=runner.place.delegate, scheme=sc,
            )
            for sc, delay in keys
        }  # fmt: skip  # endpoints are chosen now, the processes start below
        for d in plan.delegates:
            ld = locals_.get((d.scheme, d.delay_us)) if d.endpoint == "local" else None
            runner.endpoints[d.name] = (
                "kthread" if d.kthread
                else (ld.endpoint if ld is not None else "local")
                if d.endpoint == "local"
                else d.endpoint
            )  # fmt: skip
        specs = [runner.cell_spec(c) for c in todo]  # every cell checked before anything starts
        runner.policies = _policies(runner, results, policies)
        if runner.policies is not None:  # the same cells, forwarding the resolved sets
            specs = [runner.cell_spec(c) for c in todo]
        started: list[LocalDelegate] = []
        try:
            for ld in locals_.values():
                ld.__enter__()
                started.append(ld)
            for d in plan.delegates:
                if d.kthread:
                    continue
                if d.endpoint == "local":
                    ld = locals_.get((d.scheme, d.delay_us))
                    if ld is not None and ld.proc is not None:
                        runner.delegate_pids[d.name] = ld.proc.pid
                    continue
                try:
                    ping(d.endpoint, timeout_s=5.0, curve_keys=curve_keys)
                except TestbedError as exc:
                    raise TestbedError(f"delegate {d.name}: {exc}") from None
            return runner.run(todo, len(all_cells), skipped, specs, replays)
        finally:
            for ld in started:
                ld.__exit__()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_only(plan: Plan, results: Path, host: str, out=sys.stderr) -> Path:
    """``--resolve-policies``: profile the workloads here and resolve the plan's policies
    once into ``RESULTS/policies.json`` (the controller's step before the nodes run)."""
    if not plan.policies:
        raise PlanError(f"plan {plan.name} has no policy to resolve")
    if plan.resolve == "per-host":
        raise PlanError(f"plan {plan.name} says resolve: per-host (each node resolves its own)")
    results.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="testbed-resolve-"))
    try:
        _policies(Runner(plan, results, host, work, out), results, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results / POLICIES_JSON


def check_json(plan: Plan) -> dict[str, Any]:
    """``testbed experiment PLAN --check --json``: the validated plan, for scripts (Ansible)."""
    return {
        "check_version": CHECK_JSON_VERSION,
        "valid": True,
        "plan": plan.name,
        "runs": len(cells(plan)),
        "normalised": plan.to_json(),
        "host": host_metadata(),
    }


def main_experiment(
    plan_path: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    host_label: str | None = None,
    delegates: list[str] | None = None,
    curve_keys: str | None = None,
    check: bool = False,
    as_json: bool = False,
    policies: str | os.PathLike | None = None,
    resolve_policies_only: bool = False,
) -> int:
    """``testbed experiment PLAN``: run the plan's unfinished cells, print a summary line.

    ``output`` defaults to ``results/<plan name>``, ``host_label`` to the host
    name; ``delegates`` (``NAME=ENDPOINT``) replace the plan's.  With
    ``check`` only validate the plan (``as_json``: print :func:`check_json`).
    ``policies``: a ``policies.json`` to forward the sets of (:func:`run_plan`);
    ``resolve_policies_only``: write one (:func:`resolve_only`) and run nothing.
    Exit status 1 if a cell failed.
    """
    plan = load_plan(plan_path, delegates or None)
    if check:
        if as_json:
            print(json.dumps(check_json(plan), indent=2))
        else:
            replays = len(replay_cells(plan))
            print(f"plan {plan.name}: valid, {len(cells(plan))} runs"
                  + (f" and {replays} replays" if replays else ""))  # fmt: skip
        return 0
    results = Path(output or Path("results") / plan.name).absolute()
    host = label(host_label or socket.gethostname())
    if resolve_policies_only:
        print(f"experiment {plan.name}: policies resolved into {resolve_only(plan, results, host)}")
        return 0
    counts = run_plan(
        plan, results, host, curve_keys=str(Path(curve_keys).absolute()) if curve_keys else None,
        policies=Path(policies).absolute() if policies else None,
    )  # fmt: skip
    print(
        f"experiment {plan.name}: ran={counts['ran']} skipped={counts['skipped']} "
        f"failed={counts['failed']} results={results}"
    )
    return 1 if counts["failed"] else 0
