"""How much delegate memory can one hostile peer cause?  (issue 11)

    python3 benchmarks/peer_memory.py [REPO]

Starts ``python -m testbed delegate --workers 1`` from REPO (default: this
checkout; pass another checkout to compare) and, one attack per fresh
delegate, measures its peak RSS (``VmHWM``) growth over its RSS after one
good call:

  multipart   1 MiB parts all marked "more", up to 500 MiB (never completed)
  no-read     4000 requests of 60 kB with an unknown message type (each
              answered with an ERROR) on a connection that never reads
  big-frames  200 frames of MAX_FRAME bytes sent as fast as TCP takes them

Peers speak raw ZMTP over TCP (tests/rawzmtp.py), so nothing is buffered on
their side.  Prints one line per attack and the largest growth, host-stamped.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import msgpack

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from testbed.core.hostinfo import host_metadata  # noqa: E402
from tests import rawzmtp  # noqa: E402

MAX_FRAME = 4 << 20


def start(repo: Path) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed", "delegate", "--listen", "tcp://127.0.0.1:*"],
        cwd=repo, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stderr.readline()
    endpoint = re.search(r"listening on (\S+) ", line).group(1)
    version = int(re.search(r"wire v(\d+)", line).group(1))
    return proc, endpoint, version


def good_call(endpoint: str, version: int) -> None:
    s = rawzmtp.connect(endpoint)
    s.sendall(rawzmtp.frame(msgpack.packb([version, "hello", {}])))
    s.recv(4096)
    s.close()


def attack(name: str, endpoint: str, version: int) -> str:
    s = rawzmtp.connect(endpoint)
    sent = 0
    try:
        if name == "multipart":
            part = rawzmtp.frame(b"m" * (1 << 20), more=True)
            for _ in range(500):
                s.sendall(part)
                sent += 1 << 20
        elif name == "no-read":
            frame = rawzmtp.frame(msgpack.packb([version, "y" * 60_000, {}]))
            for _ in range(4000):
                s.sendall(frame)
                sent += len(frame)
        else:
            frame = rawzmtp.frame(msgpack.packb([version, "z" * (MAX_FRAME - 32), {}]))
            for _ in range(200):
                s.sendall(frame)
                sent += len(frame)
        outcome = "accepted"
    except OSError as exc:
        outcome = f"cut ({exc.strerror})"
    time.sleep(1.0)
    s.close()
    return f"sent {sent / (1 << 20):.0f} MiB, {outcome}"


def main() -> int:
    repo = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else HERE
    worst = 0.0
    for name in ("multipart", "no-read", "big-frames"):
        proc, endpoint, version = start(repo)
        try:
            good_call(endpoint, version)
            before = rawzmtp.rss_mib(proc.pid)
            what = attack(name, endpoint, version)
            peak = rawzmtp.rss_mib(proc.pid, "VmHWM")
            good_call(endpoint, version)  # still serving
            alive = proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
        worst = max(worst, peak - before)
        print(f"{name:10s} {what:28s} RSS {before:6.1f} -> peak {peak:6.1f} MiB "
              f"(+{peak - before:.1f}){'' if alive else ' DELEGATE DIED'}")  # fmt: skip
    host = host_metadata()
    print(f"largest growth one peer caused: {worst:.1f} MiB (repo {repo}, wire v{version}, "
          f"host {json.dumps({k: host.get(k) for k in ('hostname', 'kernel', 'cpu_model')})}, "
          f"pid {os.getpid()})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
