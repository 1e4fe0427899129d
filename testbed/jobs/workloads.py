"""The workload catalogue: real programs on generated, reproducible inputs.

One catalogue serves ``testbed experiment`` (each workload run natively and
delegated, stdout compared byte for byte) and the native profiles that ship
in ``analysis/data/profiles`` (``testbed.jobs.catalogue.profile_all``), so a
shipped profile is the profile of the workload an experiment runs.

Every workload reads inputs written beneath one directory by
:func:`prepare` from ``(size_mb, seed)``: ``input.txt``, ``size_mb`` MB of
compressible text (:func:`generate_input`), and, for some, files derived from
it.  Its argv is a template (``{input}`` the text file, ``{dir}`` the
directory) and its result goes to stdout, so native and delegated runs can be
compared.  Everything that can end up in the output has a fixed mtime.

    name        default MB  what it does                                  heavy on
    gzip        4           compress the text                             read/write
    bzip2       4           compress the text                             read/write
    xz          4           compress the text (one thread)                read/write
    cat         4           copy the text                                 read/write
    sha256sum   4           checksum the text                             read
    wc          4           count lines, words, bytes                     read
    tar         4           archive the text file                         read/write
    sqlite3     4           import the text's lines into a table          pwrite/pread
    tar-tree    2           archive the text cut into ~300 small files    openat/newfstatat/close
    sqlite3-tx  0.2         insert its lines, 50 per transaction (fresh   pwrite/fdatasync
                            database each run)
    python      1           import modules, count words, write JSON       openat/newfstatat/mmap
    gcc         0.01        compile and link three generated C files      multi-process (cc1, as, ld)

The shipped profiles are of bzip2, gzip, tar-tree, sqlite3-tx, python and gcc.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: Fixed mtime of every generated input file (gzip and tar record it).
INPUT_MTIME = 1_000_000_000
INPUT_NAME = "input.txt"
DEFAULT_SIZE_MB = 4.0

_WORDS = ["forward", "delegate", "kernel", "syscall", "network", "compute", "node", "relay",
          "zeromq", "msgpack", "seccomp", "module", "thread", "spin", "cost", "policy",
          "frequency", "latency", "model", "speedup", "plane", "data", "gain", "profile"]  # fmt: skip


def generate_input(path: Path, size_mb: float, seed: int) -> None:
    """Compressible, reproducible text of ``size_mb`` MB (kept if already there)."""
    path = Path(path)
    if path.exists() and path.stat().st_size == int(size_mb * 1e6):
        return
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(_WORDS) for _ in range(10)) + f" {rng.randrange(10**6)}\n"
        for _ in range(4096)
    ]
    block = "".join(lines).encode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = int(size_mb * 1e6)
        while left > 0:
            chunk = block[: min(left, len(block))]
            f.write(chunk)
            left -= len(chunk)
            block = block[len(block) // 3 :] + block[: len(block) // 3]  # vary the order
    os.replace(tmp, path)
    _stamp(path)


def _stamp(path: Path) -> None:
    os.utime(path, (INPUT_MTIME, INPUT_MTIME))


def _tree(d: Path, seed: int) -> None:
    """``tree/dir<k>/file<i>.txt``: the text cut into files of 2000 + 37·i bytes."""
    text = (d / INPUT_NAME).read_bytes()
    tree, done = d / "tree", d / ".tree-complete"
    if done.exists():
        return
    pos, i = 0, 0
    while pos < len(text):
        size = 2000 + 37 * (i % 300)
        sub = tree / f"dir{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        f = sub / f"file{i}.txt"
        f.write_bytes(text[pos : pos + size])
        _stamp(f)
        pos, i = pos + size, i + 1
    for sub in [*tree.iterdir(), tree]:
        _stamp(sub)
    done.touch()


def _sql(d: Path, seed: int) -> None:
    """``script.sql``: a table of the text's lines, 50 inserts per transaction."""
    lines = (d / INPUT_NAME).read_text().splitlines()
    out = ["CREATE TABLE t(id INTEGER PRIMARY KEY, line TEXT);"]
    for start in range(0, len(lines), 50):
        out.append("BEGIN;")
        out += [f"INSERT INTO t(line) VALUES ('{ln}');" for ln in lines[start : start + 50]]
        out.append("COMMIT;")
    out.append("SELECT count(*), sum(length(line)) FROM t;")
    (d / "script.sql").write_text("\n".join(out) + "\n")


def _c_units(d: Path, seed: int) -> None:
    """``gcc-unit{0,1,2}.c``: small functions, together about the text's size."""
    size = (d / INPUT_NAME).stat().st_size
    per_unit = max(1, size // (3 * 45))
    for j in range(3):
        body = "\n".join(
            f"int f{j}_{i}(int x) {{ return x * {i} + {j + seed}; }}" for i in range(per_unit)
        )
        main = "int main(void) { return f0_0(0); }\n" if j == 0 else ""
        (d / f"gcc-unit{j}.c").write_text(f"#include <stdio.h>\n{body}\n{main}")


_PYTHON = (
    "import collections, csv, decimal, email.parser, json, pathlib, sys\n"
    "d = pathlib.Path(sys.argv[1]); out = d / 'py-out'; out.mkdir(exist_ok=True)\n"
    "words = collections.Counter()\n"
    "with open(d / 'input.txt') as f:\n"
    "    for i, line in enumerate(f):\n"
    "        words.update(line.split()[:-1])\n"
    "        if i % 200 == 199:\n"
    "            (out / f'py{i // 200 % 200}.json').write_text(json.dumps(words, sort_keys=True))\n"
    "print(sum(words.values()), len(words))\n"
)


@dataclass(frozen=True)
class Spec:
    """A catalogue entry: argv template, default input size, extra inputs."""

    argv: tuple[str, ...]
    size_mb: float
    about: str
    inputs: Callable[[Path, int], None] | None = None  # derives files from input.txt
    needs: str = ""  # the program it needs when argv[0] is a shell

    @property
    def program(self) -> str:
        """The program that must be installed."""
        return self.needs or self.argv[0]


_TAR_TREE = ("tar", "-cf", "-", "--sort=name", "--mtime=@0", "--owner=0", "--group=0",
             "--numeric-owner", "-C", "{dir}", "tree")  # fmt: skip
_SQLITE_IMPORT = ("sqlite3", "-cmd", "DROP TABLE IF EXISTS t", "-cmd", "CREATE TABLE t(line TEXT)",
                  "-cmd", ".import {input} t", "{dir}/workload.db",
                  "SELECT count(*), sum(length(line)) FROM t")  # fmt: skip
_SQLITE_TX = ': > "$1/workload.db" && exec sqlite3 "$1/workload.db" ".read $1/script.sql"'
_GCC = 'cd "$1" && gcc -O1 -o gcc-prog gcc-unit*.c && cat gcc-prog'

CATALOGUE: dict[str, Spec] = {
    "gzip": Spec(("gzip", "-c", "-6", "{input}"), 4.0, "compress the text"),
    "bzip2": Spec(("bzip2", "-c", "{input}"), 4.0, "compress the text"),
    "xz": Spec(("xz", "-c", "-T1", "-3", "{input}"), 4.0, "compress the text (one thread)"),
    "cat": Spec(("cat", "{input}"), 4.0, "copy the text"),
    "sha256sum": Spec(("sha256sum", "{input}"), 4.0, "checksum the text"),
    "wc": Spec(("wc", "{input}"), 4.0, "count lines, words and bytes"),
    "tar": Spec(
        ("tar", "-cf", "-", "--mtime=@0", "-C", "{dir}", "input.txt"), 4.0, "archive the text file"
    ),  # fmt: skip
    "sqlite3": Spec(_SQLITE_IMPORT, 4.0, "import the text's lines into a table"),
    "tar-tree": Spec(_TAR_TREE, 2.0, "archive the text cut into small files", _tree),
    "sqlite3-tx": Spec(
        ("sh", "-c", _SQLITE_TX, "sh", "{dir}"),
        0.2,
        "insert the text's lines, 50 per transaction",
        _sql,
        "sqlite3",
    ),  # fmt: skip
    "python": Spec(
        ("python3", "-c", _PYTHON, "{dir}"), 1.0, "import modules, count words, write JSON files"
    ),  # fmt: skip
    "gcc": Spec(
        ("sh", "-c", _GCC, "sh", "{dir}"),
        0.01,
        "compile and link three C files; the output is the program",
        _c_units,
        "gcc",
    ),  # fmt: skip
}

#: argv templates by name (the catalogue without its input makers).
WORKLOADS: dict[str, list[str]] = {name: list(s.argv) for name, s in CATALOGUE.items()}


def expand(argv: tuple[str, ...] | list[str], directory: Path) -> list[str]:
    """``argv`` with ``{input}`` and ``{dir}`` replaced for inputs in ``directory``."""
    d = str(directory)
    return [a.replace("{input}", f"{d}/{INPUT_NAME}").replace("{dir}", d) for a in argv]


def prepare(directory: Path, size_mb: float, seed: int = 1, name: str | None = None) -> Path:
    """Write the inputs of catalogue workload ``name`` (or just the text) into ``directory``.

    Returns the text input's path.  Idempotent: inputs already there are kept.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / INPUT_NAME
    generate_input(path, size_mb, seed)
    spec = CATALOGUE.get(name or "")
    if spec is not None and spec.inputs is not None:
        spec.inputs(d, seed)
    return path
