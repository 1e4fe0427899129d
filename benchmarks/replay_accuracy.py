"""How well ``testbed replay`` predicts a program's wall time, against re-running it.

    python3 benchmarks/replay_accuracy.py [--delay-us 200] [--reps 3] [--workloads gzip,...]
                                          [--scale 1] [--keep DIR] [--remote]

Starts two delegates, A (``--delay-us 0``) and B (``--delay-us D``), on loopback
or (``--remote``, root) A on a compute namespace's loopback and B in another namespace.
For each catalogue workload and repetition, interleaved: record the program on
A; replay that recording against A (same configuration), against B (the
what-if), and against B with ``--elide-compute``; re-run the real program on
B.  Prints per workload the median signed error of each prediction against
the measurement it predicts (never the one it was recorded on, except the
same-configuration row, whose target is the recording itself), the model's
own what-if for comparison (recorded wall + n·D: each call's round trip grows
by the delegate's spin), and how much faster the elided replay ran than the
program (xz and xz -9, with only their file opens forwarded, are the
compute-bound cases), and how far the elided prediction lies from the spun one
(el/spun).
Paired runs; no absolute timing is claimed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))

from testbed.core.hostinfo import host_metadata  # noqa: E402
from testbed.jobs import workloads  # noqa: E402

FORWARD = "read,write,openat,close,newfstatat,fstat,lseek,pread64,pwrite64,fdatasync,getdents64"
DEFAULT = "gzip,tar-tree,sqlite3-tx,python,gcc,wc,xz,xz-9"
#: Workloads run with another forwarded set: xz forwards only its few file
#: opens, so its computation is nearly all of its time (the --elide-compute case).
FORWARD_FOR = {"xz": "openat,close,newfstatat,fstat", "xz-9": "openat,close,newfstatat,fstat"}
#: Workloads that are not catalogue entries: (catalogue entry for the input, argv).
#: xz -9 on the text: seconds of computation around a few dozen calls.
EXTRA = {"xz-9": ("xz", ("xz", "-c", "-T1", "-9", "{input}"))}


def tb(*args: str) -> list[str]:
    return [sys.executable, "-m", "testbed", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Place:
    """Where programs, replays and delegates run: this host, or (``--remote``) a
    ``compute`` namespace with delegate A on its loopback and delegate B in a
    ``delegate`` namespace across a veth pair (another node of the lab)."""

    def __init__(self, topo=None):
        self.topo = topo

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        if self.topo is None:
            return subprocess.run(argv, **kw)
        return self.topo.run("compute", argv, timeout=3600, **kw)

    def start_delegate(self, delay: float, remote: bool) -> tuple[str, subprocess.Popen]:
        host = self.topo.addr("delegate") if remote and self.topo else "127.0.0.1"
        ep = f"tcp://{host}:{free_port() if self.topo is None else 5600 + int(remote)}"
        argv = tb("delegate", "--listen", ep, "--quiet", "--delay-us", f"{delay:g}")
        if self.topo is None:
            proc = subprocess.Popen(argv)
        else:
            proc = self.topo.popen("delegate" if remote else "compute", argv)
        probe = (
            f"from testbed.compute.relay import connect; connect({ep!r}, timeout_s=1.0)[1].close()"
        )
        for _ in range(40):
            if self.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
                return ep, proc
            time.sleep(0.25)
        proc.terminate()
        raise SystemExit(f"replay_accuracy: the delegate on {ep} never answered")


PLACE = Place()


def meta(d: Path) -> dict:
    return json.loads((d / "run.json").read_text())


def real(ep: str, argv: list[str], out: Path, forward: str) -> dict:
    PLACE.run(tb("run", "--quiet", "--delegate", ep, "--forward", forward, "-o", str(out),
                      "--", *argv), stdout=subprocess.DEVNULL, check=True)  # fmt: skip
    return meta(out)


def replay(src: Path, ep: str, out: Path, *extra: str) -> tuple[dict, float]:
    t = time.monotonic()
    PLACE.run(tb("replay", str(src), "--delegate", ep, "--quiet", "-o", str(out), *extra),
              check=True)  # fmt: skip
    return meta(out), time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay-us", type=float, default=200.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workloads", default=DEFAULT)
    ap.add_argument("--scale", type=float, default=1.0, help="input size factor")
    ap.add_argument("--keep", metavar="DIR", help="keep the run directories in DIR")
    ap.add_argument("--remote", action="store_true", help="needs root: record on a loopback "
                    "delegate in a compute namespace, predict runs against delegate B in "
                    "another namespace (another node) across a veth pair")  # fmt: skip
    args = ap.parse_args()
    names = args.workloads.split(",")
    for n in names:
        if n not in workloads.CATALOGUE and n not in EXTRA:
            ap.error(f"unknown workload {n!r}")
    root = Path(args.keep or tempfile.mkdtemp(prefix="replay-acc-"))
    global PLACE
    stack = contextlib.ExitStack()
    if args.remote:
        from testbed.cluster import netns  # lazy: --remote only

        ok, why = netns.available()
        if not ok:
            raise SystemExit(f"replay_accuracy: --remote: {why}")
        PLACE = Place(stack.enter_context(netns.Topology(["compute", "delegate"])))
    ep_a, pa = PLACE.start_delegate(0, remote=False)
    ep_b, pb = PLACE.start_delegate(args.delay_us, remote=True)
    rows: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    try:
        for rep in range(args.reps):
            for name in names:
                entry, template = EXTRA.get(name, (name, None))
                spec = workloads.CATALOGUE[entry]
                d = root / "inputs" / entry
                workloads.prepare(d, spec.size_mb * args.scale, 1, entry)
                argv = workloads.expand(template or spec.argv, d)
                base = root / f"{name}-{rep}"
                fwd = FORWARD_FOR.get(name, FORWARD)
                rec = real(ep_a, argv, base.with_suffix(".rec"), fwd)
                same, _ = replay(base.with_suffix(".rec"), ep_a, base.with_suffix(".same"))
                target = real(ep_b, argv, base.with_suffix(".realB"), fwd)
                what, _ = replay(base.with_suffix(".rec"), ep_b, base.with_suffix(".whatB"))
                el, el_s = replay(base.with_suffix(".rec"), ep_b, base.with_suffix(".elideB"),
                                  "--elide-compute")  # fmt: skip
                wa, wb, n = rec["wall_s"], target["wall_s"], rec["calls"]["count"]
                r = rows[name]
                for key, v in (
                    ("same", same["wall_s"] / wa - 1),
                    ("replay", what["wall_s"] / wb - 1),
                    ("elide", el["wall_s"] / wb - 1),
                    ("model", (wa + n * args.delay_us / 1e6) / wb - 1),
                    ("speed", wb / el["replay"]["replay_duration_s"]),
                    ("elide_vs_spun", el["wall_s"] / what["wall_s"] - 1),
                    ("process", wb / el_s),
                    ("calls", n),
                    ("wall_a", wa),
                    ("wall_b", wb),
                ):
                    r.setdefault(key, []).append(v)
                print(f"  {name} rep {rep}: A {wa:.3f} s, B {wb:.3f} s, {n} calls; same "
                      f"{r['same'][-1]:+.1%}, replay {r['replay'][-1]:+.1%}, elide "
                      f"{r['elide'][-1]:+.1%}, model {r['model'][-1]:+.1%}", flush=True)  # fmt: skip
    finally:
        for p in (pa, pb):
            p.terminate()
            p.wait()
        stack.close()
    h = host_metadata()
    where = "B in another namespace (veth)" if args.remote else "both on loopback"
    print(f"\nhost {h['hostname']} ({h['cores']} cores), A on loopback, {where}, D = "
          f"{args.delay_us:g} µs, {args.reps} reps, forwarded: {FORWARD}")  # fmt: skip
    print("median signed error per workload (prediction / measured - 1); speedup: the "
          "program's wall time on B / the elided replay's own duration (process: / the whole "
          "`testbed replay` process, start-up and calibration included)")  # fmt: skip
    hdr = f"{'workload':<11} {'calls':>6} {'A s':>7} {'B s':>7} {'same':>7} {'replay':>7} {'elide':>7} {'model':>7} {'speedup':>8} {'process':>7} {'el/spun':>7}"  # noqa: E501
    print(hdr)
    med = {k: [] for k in ("same", "replay", "elide", "model")}
    for name in names:
        r = rows[name]
        m = {k: float(np.median(v)) for k, v in r.items()}
        for k in med:
            med[k].append(abs(m[k]))
        print(f"{name:<11} {m['calls']:>6.0f} {m['wall_a']:>7.3f} {m['wall_b']:>7.3f} "
              f"{m['same']:>+7.1%} {m['replay']:>+7.1%} {m['elide']:>+7.1%} {m['model']:>+7.1%} "
              f"{m['speed']:>7.1f}x {m['process']:>6.1f}x {m['elide_vs_spun']:>+7.1%}")  # fmt: skip
    print(f"{'mean |err|':<11} {'':>6} {'':>7} {'':>7} " + " ".join(
        f"{np.mean(med[k]):>7.1%}" for k in ("same", "replay", "elide", "model")))  # fmt: skip
    print(f"run directories: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
