"""Running a plan: native references, the cells through ``testbed run``, progress, resume.

:func:`run_plan` runs every unfinished cell of a :class:`~testbed.experiment.plan.Plan`
into ``RESULTS/<host>/`` (layout in ``testbed.experiment``); :func:`main_experiment`
is ``testbed experiment``.
"""

from __future__ import annotations

import argparse
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

from testbed import cpus, gain, rundir, workloads
from testbed.errors import TestbedError
from testbed.experiment.plan import (
    Cell,
    DelegateSpec,
    Plan,
    PlanError,
    Workload,
    cells,
    label,
    load_plan,
)
from testbed.hostinfo import host_metadata
from testbed.localdelegate import LocalDelegate, ping
from testbed.procs import pinner, testbed_env
from testbed.procs import wait4 as _wait4
from testbed.program import exit_status

#: Version of ``testbed experiment --check --json``.
#: 1: check_version, valid, plan (name), runs, normalised (as plan.json), host.
CHECK_JSON_VERSION = 1


def input_dir(work: Path, w: Workload) -> Path:
    """Where the inputs of ``w`` are generated (one folder per workload, size and seed)."""
    return work / f"{w.name}-{w.size_mb:g}mb-{w.seed}"


def workload_argv(w: Workload, directory: Path) -> list[str]:
    """The argv of ``w`` with its inputs in ``directory``."""
    if w.argv and w.argv[0] == "{gainbench}":
        return gain.command(int(w.gamma or 1), int(w.argv[2]), int(w.argv[3]))
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

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def input_for(self, w: Workload) -> Path:
        """The folder holding the inputs of ``w`` (generated on first use)."""
        if w.gamma is not None:  # the gain benchmark reads no input
            return self.work
        d = input_dir(self.work, w)
        workloads.prepare(d, w.size_mb, w.seed, w.catalogue)
        return d

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
        keys = (
            ["--curve-keys", self.curve_keys]
            if self.curve_keys and delegate.endpoint != "local"
            else []
        )
        local = self.input_for(w)
        remote = Path(self.plan.offload_path, self.plan.name, local.name)
        key = f"{endpoint} {remote}"
        if key in self.staged:
            return remote
        cmd = [sys.executable, "-m", "testbed", "run", "--quiet", "--delegate", endpoint,
               "--mode", "offload", "--offload-path", str(self.plan.offload_path),
               "--backend", self.plan.backend, *keys, "-o", str(self.work / "stage-run"), "--",
               "sh", "-c", 'mkdir -p "$2" && cp -pR "$1"/. "$2"/', "sh",
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

    def run_cell(self, cell: Cell) -> dict[str, Any]:
        final = self.base / cell.run_id
        partial = self.base / (cell.run_id + ".partial")
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        w = cell.workload
        native = self.native_run(w)
        paired = self.paired_native(cell)  # native, forwarded, native, forwarded ...
        if self.plan.offload_path:
            argv = workload_argv(w, self.offload_input(w, cell.delegate))
        else:
            argv = workload_argv(w, self.input_for(w))
        # A subprocess, not testbed.run.run in process: the relay is pinned to its
        # own CPUs (preexec_fn), killed on the plan's timeout, and its CPU time
        # (run.json) must not include this runner's or a local delegate's.
        cmd = [sys.executable, "-m", "testbed", "run"] + mechanism_args(
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


def mechanism_args(d: DelegateSpec, endpoint: str, plan: Plan) -> list[str]:
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
        local = (
            LocalDelegate(offload_root=root, cpus=runner.place.delegate) if needs_local else None
        )
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


def main_experiment(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan, args.delegate or None)
    if args.check:
        if getattr(args, "json", False):
            print(json.dumps(check_json(plan), indent=2))
        else:
            print(f"plan {plan.name}: valid, {len(cells(plan))} runs")
        return 0
    results = Path(args.output or Path("results") / plan.name).absolute()
    host = label(args.host_label or socket.gethostname())
    curve = getattr(args, "curve_keys", None)
    counts = run_plan(
        plan, results, host, curve_keys=str(Path(curve).absolute()) if curve else None
    )
    print(
        f"experiment {plan.name}: ran={counts['ran']} skipped={counts['skipped']} "
        f"failed={counts['failed']} results={results}"
    )
    return 1 if counts["failed"] else 0
