# ruff: noqa: F811  (the lab fixture of tests/test_offload.py is imported by name)
"""Working directories in offload mode follow the kernel's rules (docs/offload.md).

Real programs in two network namespaces, as tests/test_offload.py: every
script runs natively on a local directory and offloaded on PREFIX, from a
local working directory that must stay empty, and the trees the delegate
wrote are compared byte for byte with the native ones.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.test_offload import Lab, assert_same_tree, lab, offload  # noqa: F401 (fixture)

pytestmark = [pytest.mark.root, pytest.mark.netns]

C_MAIN = '#include <stdio.h>\n#include "util.h"\nint main(void) { printf("%d\\n", twice(21)); return 0; }\n'
C_UTIL = '#include "util.h"\nint twice(int x) { return 2 * x; }\n'
MAKEFILE = "all: prog\nprog: main.o util.o\n\tcc -o prog main.o util.o\n%.o: %.c util.h\n\tcc -c -o $@ $<\n"


def run_both(lab: Lab, tmp_path: Path, name: str, script: str, **fmt: str):
    """``sh -c script`` natively (P = a local dir) and offloaded (P = PREFIX/name),
    each from an empty local working directory; returns both results and that
    directory of the offloaded run."""
    here_native, here = tmp_path / "native-cwd", tmp_path / "cwd"
    here_native.mkdir()
    here.mkdir()
    native = subprocess.run(["sh", "-c", script.format(P=lab.native / name, **fmt)],
                            capture_output=True, timeout=300, cwd=here_native)  # fmt: skip
    assert native.returncode == 0, native.stderr.decode()
    res = offload(lab, tmp_path / "run", ["sh", "-c", script.format(P=lab.prefix / name, **fmt)],
                  cwd=here)  # fmt: skip
    return native, res, here


def same_output(lab: Lab, name: str, native, res, run: Path | None = None) -> None:
    if res.returncode != 0 and run is not None and (run / "run.json").exists():
        meta = json.loads((run / "run.json").read_text())  # say why, from the run's own record
        why = {k: meta.get(k) for k in ("calls", "offload")}
        raise AssertionError(f"{res.stderr.decode()}\nrun.json: {json.dumps(why)[:4000]}")
    assert res.returncode == 0, res.stderr.decode()
    assert b"Traceback" not in res.stderr
    want = native.stdout.replace(str(lab.native / name).encode(), b"P")
    assert res.stdout.replace(str(lab.prefix / name).encode(), b"P") == want


def offload_meta(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "run.json").read_text())["offload"]


def test_every_kind_of_child_inherits_the_offloaded_cwd(lab, tmp_path):
    py_spawn = textwrap.dedent("""
        import os, subprocess, threading
        subprocess.run(["sh", "-c", "echo b > b"], close_fds=True)      # fork, closefrom, exec
        subprocess.run(["sh", "-c", "echo c > c"], close_fds=False)     # posix_spawn / vfork
        t = threading.Thread(target=os.chdir, args=("sub",))           # a thread moves the process
        t.start(); t.join()
        open("d", "w").write("d\\n")
    """)
    script = (
        "mkdir -p {P} && cd {P} && mkdir sub && sh -c 'echo a > a' && "
        "python3 -c '{py}' && "
        "(cd sub && echo | xargs sh -c 'echo e > e') && "  # via xargs, which makes no call
        "env sh -c 'exec sh -c \"echo f > f\"' && "
        'python3 -c \'import os; os.closerange(3, 1 << 20); os.execvp("sh", ["sh", "-c", "echo g > g"])\' && '
        "python3 -c 'import os, fcntl; [fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC) "
        'for fd in range(3, 1024) if os.path.exists(f"/proc/self/fd/{{fd}}")]; '
        'os.execvp("sh", ["sh", "-c", "echo h > h"])\' && '
        "pwd && sh -c pwd && ls -R && cat sub/d sub/e"
    )
    native, res, here = run_both(lab, tmp_path, "inherit", script, py=py_spawn.replace("'", '"'))
    same_output(lab, "inherit", native, res, tmp_path / "run")
    assert_same_tree(lab, "inherit")
    assert sorted(p.name for p in (lab.root / "inherit").rglob("*")) == list("abcdefgh") + ["sub"]
    assert list(here.iterdir()) == [], "files were created in the local working directory"
    assert offload_meta(tmp_path)["eio"] == 0


def test_make_compiles_and_links_three_generations_deep(lab, tmp_path):
    src = tmp_path / "cproj" / "src"
    src.mkdir(parents=True)
    for name, text in (("main.c", C_MAIN), ("util.c", C_UTIL), ("util.h", "int twice(int);\n"),
                       ("Makefile", MAKEFILE)):  # fmt: skip
        (src / name).write_text(text)
    script = (
        "mkdir -p {P} && cp -r {src} {P}/proj && cd {P} && sh -c 'cd proj && sh -c \"make -s\"'"
    )
    native, res, here = run_both(lab, tmp_path, "make", script, src=str(src))
    same_output(lab, "make", native, res)
    assert_same_tree(lab, "make")  # objects and the linked program byte for byte
    assert (lab.root / "make" / "proj" / "prog").stat().st_size > 1000
    assert list(here.iterdir()) == []


def test_a_failed_local_chdir_leaves_the_process_where_it_was(lab, tmp_path):
    script = ("mkdir -p {P}/a && cd {P}/a && (cd /nonexistent-dir 2>/dev/null; echo x > x) && "
              "(cd / && cd {P} && echo y > y) && (cd /tmp && pwd) && pwd")  # fmt: skip
    native, res, here = run_both(lab, tmp_path, "fail", script)
    same_output(lab, "fail", native, res)
    assert_same_tree(lab, "fail")
    assert sorted(p.name for p in (lab.root / "fail").rglob("*")) == ["a", "x", "y"]
    assert list(here.iterdir()) == []


def test_what_the_kernel_would_resolve_elsewhere_fails_loudly(lab, tmp_path):
    here = tmp_path / "cwd"
    here.mkdir()
    (here / "hosts").write_text("local\n")
    # a relative path climbing out of the offloaded tree: the kernel would use the local cwd
    res = offload(lab, tmp_path / "r1", ["sh", "-c", f"mkdir -p {lab.prefix}/up && "
                                         f"cd {lab.prefix}/up && cat ../../cwd/hosts"],
                  cwd=here)  # fmt: skip
    assert res.returncode != 0 and res.stdout == b""
    assert b"leaves the offloaded tree" in res.stderr and b"EXDEV" in res.stderr
    # a program in the offloaded tree cannot be executed locally
    res = offload(lab, tmp_path / "r2", ["sh", "-c", f"mkdir -p {lab.prefix}/x && "
                                         f"cp /bin/true {lab.prefix}/x/t && cd {lab.prefix}/x && ./t"],
                  cwd=here)  # fmt: skip
    assert res.returncode == 126, res.stderr.decode()
    assert b"cannot run here" in res.stderr and b"EACCES" in res.stderr
    assert sorted(p.name for p in here.iterdir()) == ["hosts"]
    assert (lab.root / "x" / "t").read_bytes() == Path("/bin/true").read_bytes()
