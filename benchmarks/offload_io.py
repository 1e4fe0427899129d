"""Offloaded I/O against local I/O and the raw transport of the same bytes, side by side.

    python3 benchmarks/offload_io.py [--rounds R] [--json OUT] [--no-python]

In interleaved rounds (every kind once per round, in the same order), on loopback:

  local     ``cref/ioloop.c`` (a C loop of read(2)/write(2)) on a local file,
            no interposition
  offl C    the same program under ``testbed run --mode offload``, the file beneath
            the delegate's --offload-root: the relay's C data path and the
            delegate's data path (the default)
  offl Py   the same with ``TESTBED_FASTPATH=0`` for the relay and for a second
            delegate: every call in Python (what the C path replaces)
  raw       ``cref/rawxfer.c``: C at both ends, the same bytes over the same
            kind of socket: a CALL-sized frame out, a RESULT-sized frame back
            (write: SIZE+95 bytes out, 68 back; read: 88 out, SIZE+75 back), no
            interpreter, no msgpack, nothing executed

Rows: 4 KiB and 1 MiB, write and read (per-call times taken by the C program
around each call: p50 and mean); a 64 MiB copy (1 MiB read + 1 MiB write, 64
rounds; raw: the same 64 round trips each way, from the 1 MiB rows' means); real
programs on a 64 MiB file: ``cp`` inside the offloaded tree and ``cat`` into a
pipe, without and with ``--offload-read-ahead 4`` (program wall: run.json
``wall_s``, the relay's start-up excluded; cat against the raw transport's time
for 64 MiB of reads); 3
concurrent clients each writing 64 MiB (aggregate MB/s over the span from the
first client's start to the last one's end).  Printed: the medians, MB/s,
and the ratios the targets of issue 21 name: offloaded p50 − raw p50 at 4 KiB
(target ≤ 30 µs) and offloaded MB/s ÷ raw MB/s at 1 MiB (target ≥ 0.5); the
share of offloaded calls the C path served (run.json ``hot_path``).  Every
number is host-stamped (testbed.core.hostinfo); the machine is whatever it is
(shared machines: read the spread across rounds, printed as min–max of the
per-round medians).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# this checkout's testbed, here and in the testbed processes started below
TOP = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, TOP)
os.environ["PYTHONPATH"] = TOP + (
    os.pathsep + os.environ["PYTHONPATH"] if "PYTHONPATH" in os.environ else ""
)

from testbed.core import rundir  # noqa: E402
from testbed.core.hostinfo import host_metadata  # noqa: E402
from testbed.jobs.localdelegate import LocalDelegate  # noqa: E402

CREF = Path(TOP) / "testbed" / "jobs" / "cref"
PREFIX = "/tb-bench-offload"
CALL_OVERHEAD, RESULT_OVERHEAD = 95, 75  # fixed-width CALL with a buffer / RESULT with one
CALL_EMPTY, RESULT_EMPTY = 88, 68
MIB = 1 << 20


#: the read-ahead row of the cat: reads streamed ahead of the program (docs/offload.md)
READ_AHEAD = ("--offload-read-ahead", "4")


def build(tmp: Path) -> dict[str, Path]:
    out = {}
    for name in ("ioloop", "rawxfer"):
        exe = tmp / name
        subprocess.run(["cc", "-O2", "-o", str(exe), str(CREF / f"{name}.c")], check=True)
        out[name] = exe
    return out


def _load(path: Path, k: int = 1) -> list[tuple[int, int, np.ndarray]]:
    """(start, end, per-call ns) per client of an ioloop / rawxfer output."""
    v = np.fromfile(path, dtype=np.uint64).reshape(k, -1)
    return [(int(r[0]), int(r[1]), r[2:].astype(np.float64)) for r in v]


def local(exe: dict, mode: str, n: int, size: int, work: Path, src: Path | None = None):
    out = work / "lat.bin"
    cmd = [str(exe["ioloop"]), mode, str(n), str(size), str(work / "file"), str(out)]
    subprocess.run(cmd + ([str(src)] if src else []), check=True)
    return _load(out)[0]


def _offload_cmd(exe: dict, mode: str, n: int, size: int, endpoint: str, run: Path,
                 out: Path, name: str = "file", src: str | None = None) -> list[str]:  # fmt: skip
    return [sys.executable, "-m", "testbed", "run", "--quiet", "--delegate", endpoint,
            "--mode", "offload", "--offload-path", PREFIX, "-o", str(run), "--",
            str(exe["ioloop"]), mode, str(n), str(size), f"{PREFIX}/{name}", str(out),
            *([f"{PREFIX}/{src}"] if src else [])]  # fmt: skip


def _env(python: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TESTBED_FASTPATH", None)
    if python:
        env["TESTBED_FASTPATH"] = "0"
    return env


def _hot(run: Path) -> float:
    """Share of the offloaded calls the C path served (run.json hot_path)."""
    meta = json.loads((run / "run.json").read_text())
    hot, off = meta.get("hot_path", {}), meta.get("offload", {})
    remote = off.get("remote_calls", 0)
    return hot.get("c_calls", 0) / remote if remote else 0.0


def offloaded(exe, mode, n, size, endpoint, work, tag, python, src=None):
    out, run = work / "lat-off.bin", work / f"run-{tag}"
    cmd = _offload_cmd(exe, mode, n, size, endpoint, run, out, "copy" if src else "file", src)
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(python))
    if res.returncode != 0:
        sys.exit(f"offloaded run failed: {res.stderr.strip()}")
    start, end, lat = _load(out)[0]
    calls = rundir.load(run).calls()
    d = rundir.derived(calls[calls["nr"] == (1 if mode == "w" else 0)])
    return (start, end, lat), float(np.median(d["exec"])) if len(d["exec"]) else 0.0, _hot(run)


def raw(exe, mode: str, n: int, size: int, k: int, work: Path):
    out = work / "lat-raw.bin"
    req, resp = ((size + CALL_OVERHEAD, RESULT_EMPTY) if mode == "w"
                 else (CALL_EMPTY, size + RESULT_OVERHEAD))  # fmt: skip
    subprocess.run([str(exe["rawxfer"]), str(n), str(req), str(resp), str(k), str(out)],
                   check=True)  # fmt: skip
    return _load(out, k)


def _drain(cmd: list[str], env: dict | None = None) -> tuple[float, subprocess.Popen]:
    """Run ``cmd`` with its stdout a pipe read to the end here; wall ms from start to exit."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    while proc.stdout.read(1 << 20):
        pass
    _out, err = proc.communicate(timeout=600)
    if proc.returncode:
        sys.exit(f"{cmd[-2:]} failed: {err.decode().strip()}")
    return (time.monotonic() - t0) * 1e3, proc


def program(argv: list[str], endpoint: str | None, work: Path, tag: str,
            extra: tuple[str, ...] = ()) -> float:  # fmt: skip
    """Wall ms of a real program: natively (``endpoint`` None; start to exit as seen from
    here) or offloaded (run.json wall_s: the program's exec to its exit, the relay's
    start-up excluded).  Its stdout is a pipe this process drains."""
    if endpoint is None:
        return _drain(argv)[0]
    run = work / f"run-prog-{tag}"
    cmd = [sys.executable, "-m", "testbed", "run", "--quiet", "--delegate", endpoint,
           "--mode", "offload", "--offload-path", PREFIX, "-o", str(run), *extra,
           "--", *argv]  # fmt: skip
    _drain(cmd, _env(False))
    return float(json.loads((run / "run.json").read_text())["wall_s"]) * 1e3


def concurrent(exe, n: int, endpoint: str, work: Path, tag: str, k: int = 3):
    """k offloaded writers at once: their (start, end, lat) and the C path's share."""
    procs, outs, runs = [], [], []
    for i in range(k):
        out, run = work / f"lat-cc{i}.bin", work / f"run-cc{tag}{i}"
        cmd = _offload_cmd(exe, "w", n, MIB, endpoint, run, out, f"cc{i}")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      env=_env(False)))  # fmt: skip
        outs.append(out)
        runs.append(run)
    for p in procs:
        _o, err = p.communicate(timeout=600)
        if p.returncode:
            sys.exit(f"concurrent offloaded run failed: {err.decode().strip()}")
    return [_load(o)[0] for o in outs], min(_hot(r) for r in runs)


def local_concurrent(exe, n: int, work: Path, k: int = 3):
    procs, outs = [], []
    for i in range(k):
        out = work / f"lat-lc{i}.bin"
        procs.append(subprocess.Popen([str(exe["ioloop"]), "w", str(n), str(MIB),
                                       str(work / f"lc{i}"), str(out)]))  # fmt: skip
        outs.append(out)
    for p in procs:
        if p.wait(timeout=600):
            sys.exit("local concurrent run failed")
    return [_load(o)[0] for o in outs]


def aggregate_mbps(clients, size: int) -> float:
    """All bytes moved / (last end - first start)."""
    total = sum(len(lat) * size for _s, _e, lat in clients)
    span = max(e for _s, e, _l in clients) - min(s for s, _e, _l in clients)
    return total / span * 1e3  # bytes/ns -> MB/s


@contextlib.contextmanager
def delegate(root: Path, python: bool):
    old = os.environ.get("TESTBED_FASTPATH")
    if python:
        os.environ["TESTBED_FASTPATH"] = "0"
    try:
        with LocalDelegate(offload_root=root) as d:
            if old is None:
                os.environ.pop("TESTBED_FASTPATH", None)
            else:
                os.environ["TESTBED_FASTPATH"] = old
            yield d
    finally:
        if old is None:
            os.environ.pop("TESTBED_FASTPATH", None)
        else:
            os.environ["TESTBED_FASTPATH"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--no-python", action="store_true", help="skip the Python-path column")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the files live, local and offloaded (default /dev/shm: a tmpfs, "
                    "so the transport is measured, not the disk's writeback)")  # fmt: skip
    args = ap.parse_args()
    plan = [(4096, 2000), (MIB, 64)]
    kinds = ["local", "offl_c", "raw"] + ([] if args.no_python else ["offl_py"])
    res: dict[str, dict[str, list]] = {}
    extra: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="offload-bench-", dir=args.dir) as t:
        tmp = Path(t)
        exe = build(tmp)
        root_c, root_py = tmp / "root-c", tmp / "root-py"
        for root in (root_c, root_py):
            root.mkdir()
            with open(root / "src", "wb") as f:  # the 64 MiB copy's source, at the delegate
                f.write(os.urandom(64 * MIB))
        with open(tmp / "src", "wb") as f:
            f.write((root_c / "src").read_bytes())
        with delegate(root_c, False) as dc, delegate(root_py, True) as dp:
            for r in range(args.rounds):
                for size, n in plan:
                    for mode in ("w", "r"):  # read after write: the file exists
                        key = f"{'write' if mode == 'w' else 'read'} {size // 1024} KiB"
                        acc = res.setdefault(key, {k: [] for k in (*kinds, "exec", "hot")})
                        acc["local"].append(local(exe, mode, n, size, tmp)[2])
                        lat, ex, hot = offloaded(exe, mode, n, size, dc.endpoint, tmp,
                                                 f"c{r}{mode}{size}", False)  # fmt: skip
                        acc["offl_c"].append(lat[2])
                        acc["exec"].append(ex)
                        acc["hot"].append(hot)
                        acc["raw"].append(raw(exe, mode, n, size, 1, tmp)[0][2])
                        if not args.no_python:
                            lat, _ex, _h = offloaded(exe, mode, n, size, dp.endpoint, tmp,
                                                     f"p{r}{mode}{size}", True)  # fmt: skip
                            acc["offl_py"].append(lat[2])
                # 64 MiB copy inside the offloaded tree (src -> copy), and locally
                extra.setdefault("copy_local", []).append(
                    _span(local(exe, "c", 64, MIB, tmp, tmp / "src"))
                )
                lat, _ex, hot = offloaded(exe, "c", 64, MIB, dc.endpoint, tmp, f"cc{r}", False,
                                          src="src")  # fmt: skip
                extra.setdefault("copy_offl_c", []).append(_span(lat))
                extra.setdefault("copy_hot", []).append(hot)
                if not args.no_python:
                    lat, _ex, _h = offloaded(exe, "c", 64, MIB, dp.endpoint, tmp, f"pc{r}", True,
                                             src="src")  # fmt: skip
                    extra.setdefault("copy_offl_py", []).append(_span(lat))
                # real programs on the 64 MiB file: cp inside the tree (copy_file_range at
                # the delegate), cat into a pipe this process drains
                extra.setdefault("prog_cp_local", []).append(
                    program(["cp", str(tmp / "src"), str(tmp / "cp-dst")], None, tmp, "")
                )
                extra.setdefault("prog_cp_offl_c", []).append(program(
                    ["cp", f"{PREFIX}/src", f"{PREFIX}/cp-dst"], dc.endpoint, tmp, f"cp{r}"
                ))  # fmt: skip
                if (root_c / "cp-dst").read_bytes() != (root_c / "src").read_bytes():
                    sys.exit("the offloaded cp did not copy the file byte for byte")
                extra.setdefault("prog_cat_local", []).append(
                    program(["cat", str(tmp / "src")], None, tmp, "")
                )
                extra.setdefault("prog_cat_offl_c", []).append(
                    program(["cat", f"{PREFIX}/src"], dc.endpoint, tmp, f"cat{r}")
                )
                extra.setdefault("prog_cat_offl_ra", []).append(program(
                    ["cat", f"{PREFIX}/src"], dc.endpoint, tmp, f"catra{r}", READ_AHEAD
                ))  # fmt: skip
                # 3 concurrent clients, 64 x 1 MiB writes each
                clients, hot = concurrent(exe, 64, dc.endpoint, tmp, str(r))
                extra.setdefault("cc_offl_c", []).append(aggregate_mbps(clients, MIB))
                extra.setdefault("cc_hot", []).append(hot)
                extra.setdefault("cc_local", []).append(
                    aggregate_mbps(local_concurrent(exe, 64, tmp), MIB)
                )
                extra.setdefault("cc_raw", []).append(
                    aggregate_mbps(raw(exe, "w", 64, MIB, 3, tmp), MIB)
                )
    report(args, kinds, res, extra)


def _span(run) -> float:
    start, end, _lat = run
    return (end - start) / 1e6  # ms


def report(args, kinds: list[str], res: dict, extra: dict) -> None:
    out = {"host": host_metadata(), "rounds": args.rounds, "dir": args.dir, "rows": [], "copy": {},
           "concurrent": {}}  # fmt: skip
    label = {"local": "local", "offl_c": "offl C", "offl_py": "offl Py", "raw": "raw C"}
    print(
        f"offloaded I/O vs local vs the raw transport (loopback), {args.rounds} interleaved rounds"
    )
    print(f"per call: p50 µs [min-max of the rounds' p50]; MB/s = size / mean; files in {args.dir}")
    head = "".join(f"{label[k]:>22}" for k in kinds)
    print(f"{'call':<14}{head}{'C-raw µs':>10}{'C/raw MB/s':>11}{'C share':>8}{'exec µs':>9}")
    for key, acc in res.items():
        size = int(key.split()[1]) * 1024
        row: dict = {"call": key}
        cells = []
        for k in kinds:
            allv = np.concatenate(acc[k])
            per = [np.median(v) / 1e3 for v in acc[k]]
            row[f"{k}_p50_us"] = float(np.median(allv) / 1e3)
            row[f"{k}_p50_rounds_us"] = [float(x) for x in per]
            row[f"{k}_MBps"] = float(size / np.mean(allv) * 1e3)
            cells.append(f"{row[f'{k}_p50_us']:>8.1f} [{min(per):.0f}-{max(per):.0f}]"
                         f" {row[f'{k}_MBps']:>5.0f}")  # fmt: skip
        row["offl_c_minus_raw_us"] = row["offl_c_p50_us"] - row["raw_p50_us"]
        row["offl_c_over_raw_MBps"] = row["offl_c_MBps"] / row["raw_MBps"]
        row["c_share"] = float(np.mean(acc["hot"]))
        row["exec_p50_us"] = float(np.median(acc["exec"]) / 1e3)
        out["rows"].append(row)
        print(f"{key:<14}" + "".join(f"{c:>22}" for c in cells)
              + f"{row['offl_c_minus_raw_us']:>10.1f}{row['offl_c_over_raw_MBps']:>11.2f}"
              f"{row['c_share']:>8.2f}{row['exec_p50_us']:>9.1f}")  # fmt: skip
    w = next((r for r in out["rows"] if r["call"] == "write 1024 KiB"), None)
    rd = next((r for r in out["rows"] if r["call"] == "read 1024 KiB"), None)
    if w and rd:
        raw_ms = 64 * (1024 * 1024 / w["raw_MBps"] + 1024 * 1024 / rd["raw_MBps"]) / 1e3
        cp = {k: float(np.median(v)) for k, v in extra.items() if k.startswith("copy_")}
        cp["copy_raw_ms"] = raw_ms
        out["copy"] = cp
        line = (f"64 MiB copy (1 MiB read+write): local {cp['copy_local']:.1f} ms, "
                f"offl C {cp['copy_offl_c']:.1f} ms ({cp['copy_offl_c'] / cp['copy_local']:.2f}x local, "
                f"{cp['copy_offl_c'] / raw_ms:.2f}x raw {raw_ms:.1f} ms)")  # fmt: skip
        if "copy_offl_py" in cp:
            line += f", offl Py {cp['copy_offl_py']:.1f} ms"
        print(line + f", C share {cp['copy_hot']:.2f}")
        pr = {k: float(np.median(v)) for k, v in extra.items() if k.startswith("prog_")}
        read_raw_ms = 64 * 1024 * 1024 / rd["raw_MBps"] / 1e3  # the 64 MiB the cat moves
        pr["read_raw_64MiB_ms"] = read_raw_ms
        out["programs"] = pr
        if pr.get("prog_cp_local"):
            print(
                f"64 MiB cp inside the tree (copy_file_range at the delegate): local "
                f"{pr['prog_cp_local']:.1f} ms, offloaded {pr['prog_cp_offl_c']:.1f} ms "
                f"({pr['prog_cp_offl_c'] / pr['prog_cp_local']:.2f}x native; target <= 1.5)"
            )
            print(
                f"64 MiB cat into a pipe: local {pr['prog_cat_local']:.1f} ms, offloaded "
                f"{pr['prog_cat_offl_c']:.1f} ms ({pr['prog_cat_offl_c'] / read_raw_ms:.2f}x "
                f"the raw transport's {read_raw_ms:.1f} ms for the same bytes; target <= 2), "
                f"with {' '.join(READ_AHEAD)} {pr['prog_cat_offl_ra']:.1f} ms "
                f"({pr['prog_cat_offl_ra'] / read_raw_ms:.2f}x)"
            )
    cc = {k: float(np.median(v)) for k, v in extra.items() if k.startswith("cc_")}
    out["concurrent"] = cc
    if cc:
        print(f"3 concurrent clients, 64 x 1 MiB writes each (aggregate): local {cc['cc_local']:.0f} "
              f"MB/s, offl C {cc['cc_offl_c']:.0f} MB/s, raw {cc['cc_raw']:.0f} MB/s "
              f"(offl/raw {cc['cc_offl_c'] / cc['cc_raw']:.2f}), C share {cc['cc_hot']:.2f}")  # fmt: skip
    h = out["host"]
    print(f"host {h.get('hostname')} kernel {h.get('kernel')} cpu {h.get('cpu_model')} "
          f"x{h.get('cores')} load {os.getloadavg()[0]:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
