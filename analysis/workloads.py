"""Small real workloads to profile (we have no SPEC CPU): inputs are generated.

Each workload function takes a scratch directory, writes its (seeded,
reproducible) input there and returns the argv to profile.  Sizes are chosen
so the whole set profiles in a few seconds on a 2-core machine; ``scale``
multiplies the input sizes.

    bzip2    compress ~2 MB of generated text        (few calls, read/write heavy)
    gzip     compress the same text
    tar      archive a tree of 300 small files       (open/close/fstat heavy)
    sqlite3  2000 inserts in 40 transactions         (pwrite/fsync heavy)
    python   import modules, compute, write files    (openat/newfstatat/mmap heavy)
    gcc      compile and link 3 small C files        (multi-process: gcc, cc1, as, ld)
"""

from __future__ import annotations

import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from testbed.errors import TestbedError

_WORDS = [
    "forward",
    "delegate",
    "kernel",
    "syscall",
    "network",
    "compute",
    "plane",
    "data",
    "latency",
    "gain",
    "model",
    "speedup",
    "profile",
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
]


def _text(path: Path, size: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    lines, total = [], 0
    while total < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(12)) + f" {rng.randrange(10**6)}\n"
        lines.append(line)
        total += len(line)
    path.write_text("".join(lines))
    return path


def bzip2(d: Path, scale: float = 1.0) -> list[str]:
    return ["bzip2", "-k", "-f", str(_text(d / "bzip2-input.txt", int(2e6 * scale)))]


def gzip(d: Path, scale: float = 1.0) -> list[str]:
    return ["gzip", "-k", "-f", str(_text(d / "gzip-input.txt", int(4e6 * scale)))]


def tar(d: Path, scale: float = 1.0) -> list[str]:
    tree = d / "tar-tree"
    for i in range(int(300 * scale)):
        sub = tree / f"dir{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        _text(sub / f"file{i}.txt", 2000 + 37 * i, seed=i)
    return ["tar", "-cf", str(d / "out.tar"), "-C", str(tree), "."]


def sqlite3(d: Path, scale: float = 1.0) -> list[str]:
    rows = int(2000 * scale)
    sql = ["CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT, v REAL);"]
    for start in range(0, rows, 50):
        sql.append("BEGIN;")
        sql += [
            f"INSERT INTO t(k, v) VALUES ('key{i}', {i * 0.5});" for i in range(start, start + 50)
        ]
        sql.append("COMMIT;")
    sql.append("SELECT count(*), sum(v) FROM t;")
    script = d / "sqlite3-script.sql"
    script.write_text("\n".join(sql) + "\n")
    db = d / "sqlite3.db"
    db.unlink(missing_ok=True)
    return ["sqlite3", str(db), f".read {script}"]


def python(d: Path, scale: float = 1.0) -> list[str]:
    code = (
        "import json, csv, decimal, email.parser, sys, pathlib\n"
        f"d = pathlib.Path({str(d)!r})\n"
        f"s = sum(i * i for i in range({int(300000 * scale)}))\n"
        "for i in range(200):\n"
        "    (d / f'py{i}.json').write_text(json.dumps({'i': i, 's': s}))\n"
        "print(s, file=open('/dev/null', 'w'))\n"
    )
    return [sys.executable, "-c", code]


def gcc(d: Path, scale: float = 1.0) -> list[str]:
    srcs = []
    for j in range(3):
        body = "\n".join(
            f"int f{j}_{i}(int x) {{ return x * {i} + {j}; }}" for i in range(int(60 * scale))
        )
        main = "int main(void) { return f0_1(0); }\n" if j == 0 else ""
        src = d / f"gcc-unit{j}.c"
        src.write_text(f"#include <stdio.h>\n{body}\n{main}")
        srcs.append(str(src))
    return ["gcc", "-O1", "-o", str(d / "gcc-prog"), *srcs]


WORKLOADS: dict[str, Callable[[Path, float], list[str]]] = {
    "bzip2": bzip2,
    "gzip": gzip,
    "tar": tar,
    "sqlite3": sqlite3,
    "python": python,
    "gcc": gcc,
}


def available(names=None) -> list[str]:
    """The workloads whose program is installed (all of ``WORKLOADS`` by default)."""
    out = []
    for name in names or WORKLOADS:
        if name not in WORKLOADS:
            raise TestbedError(f"unknown workload {name!r} (one of {', '.join(WORKLOADS)})")
        if name == "python" or shutil.which(name):
            out.append(name)
    return out


def prepare(name: str, scratch: Path, scale: float = 1.0) -> list[str]:
    """Write the input of workload ``name`` beneath ``scratch``; return its argv."""
    d = Path(scratch) / name
    d.mkdir(parents=True, exist_ok=True)
    return WORKLOADS[name](d, scale)


def profile_all(outdir: Path, scratch: Path, names=None, scale: float = 1.0, method: str = "auto"):
    """Profile each workload into ``outdir/<name>``; return the run directories."""
    from testbed.profile import profile

    paths = []
    for name in available(names):
        argv = prepare(name, scratch, scale)
        path, meta = profile(argv, Path(outdir) / name, method, extra={"workload": name})
        if meta["exit_status"] != 0:
            raise TestbedError(f"workload {name} exited with status {meta['exit_status']}")
        paths.append(path)
    return paths
