#!/usr/bin/env python3
"""Keep one command running in the background where no systemd is PID 1.

usage: testbed-supervise.py {ensure,stop,status,run} DIR

DIR/config.json holds {"argv": [...], "env": {...}, "max_restarts": N,
"restart_window_s": S}.  ``ensure`` starts the supervisor (a new session,
stdio to DIR/service.log) unless it runs with the same configuration, and
restarts it when the configuration changed; it prints "started", "restarted"
or "running" followed by the pid.  The supervisor (``run``) restarts the
command when it dies, at most max_restarts times within restart_window_s,
and forwards SIGTERM to it.  ``stop`` ends both (bounded wait, then SIGKILL).
Standard library only: this file is copied to the node and run there.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

STOP_WAIT_S = 10.0
START_WAIT_S = 10.0


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid, directory):
    """pid runs and is this directory's supervisor (guards against pid reuse)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return False
    return directory.encode() in cmd and b"run" in cmd


def _config_hash(directory):
    with open(os.path.join(directory, "config.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _paths(directory):
    return {k: os.path.join(directory, k) for k in ("supervisor.pid", "child.pid", "running.sha")}


def status(directory):
    p = _paths(directory)
    pid = _read_pid(p["supervisor.pid"])
    alive = _alive(pid, directory)
    try:
        running = None
        if alive:
            with open(p["running.sha"]) as f:
                running = f.read().strip()
    except OSError:
        running = None
    return {
        "running": alive,
        "pid": pid if alive else None,
        "child": _read_pid(p["child.pid"]) if alive else None,
        "current": running == _config_hash(directory),
    }


def stop(directory):
    p = _paths(directory)
    pid = _read_pid(p["supervisor.pid"])
    if not _alive(pid, directory):
        print("stopped (was not running)")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline and _alive(pid, directory):
        time.sleep(0.05)
    if _alive(pid, directory):
        child = _read_pid(p["child.pid"])
        for victim in (child, pid):
            if victim:
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for name in ("supervisor.pid", "child.pid", "running.sha"):
        try:
            os.unlink(p[name])
        except FileNotFoundError:
            pass
    print(f"stopped pid {pid}")
    return 0


def _spawn(directory):
    with open(os.path.join(directory, "service.log"), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "run", directory],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    p = _paths(directory)
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(
                f"supervisor exited with status {proc.returncode}; see {directory}/service.log"
            )
        if _read_pid(p["child.pid"]) and _read_pid(p["supervisor.pid"]) == proc.pid:
            return proc.pid
        time.sleep(0.05)
    sys.exit(f"supervisor did not start its command within {START_WAIT_S:g} s")


def ensure(directory):
    st = status(directory)
    if st["running"] and st["current"]:
        print(f"running pid {st['pid']}")
        return 0
    word = "started"
    if st["running"]:
        stop(directory)
        word = "restarted"
    print(f"{word} pid {_spawn(directory)}")
    return 0


def run(directory):
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    p = _paths(directory)
    env = dict(os.environ, **cfg.get("env", {}))
    stopping = []
    child = None

    def on_term(signum, frame):
        stopping.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with open(p["running.sha"], "w") as f:
        f.write(_config_hash(directory) + "\n")
    with open(p["supervisor.pid"], "w") as f:
        f.write(f"{os.getpid()}\n")
    starts = []
    max_restarts = int(cfg.get("max_restarts", 5))
    window = float(cfg.get("restart_window_s", 60))
    status_code = 0
    while not stopping:
        now = time.monotonic()
        starts = [t for t in starts if now - t < window] + [now]
        if len(starts) > max_restarts + 1:
            print(
                f"testbed-supervise: {max_restarts} restarts within {window:g} s, giving up",
                flush=True,
            )
            status_code = 1
            break
        child = subprocess.Popen(cfg["argv"], stdin=subprocess.DEVNULL, env=env)
        with open(p["child.pid"], "w") as f:
            f.write(f"{child.pid}\n")
        while True:
            try:
                rc = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        if stopping:
            break
        print(f"testbed-supervise: command exited with status {rc}, restarting", flush=True)
        time.sleep(1.0)
    if child is not None and child.poll() is None:
        child.terminate()
        try:
            child.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            child.kill()
    for name in ("supervisor.pid", "child.pid", "running.sha"):
        try:
            os.unlink(p[name])
        except FileNotFoundError:
            pass
    return status_code


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("ensure", "stop", "status", "run"):
        sys.exit(__doc__.split("\n\n")[1])
    action, directory = sys.argv[1], os.path.abspath(sys.argv[2])
    if action == "status":
        print(json.dumps(status(directory)))
        return 0
    return {"ensure": ensure, "stop": stop, "run": run}[action](directory)


if __name__ == "__main__":
    sys.exit(main())
