# ruff: noqa: F811  (the lab fixture of tests/test_offload.py is imported by name)
"""``--offload-write-behind``: writes answered at once, errors surfacing later (docs/offload.md).

Real programs in two network namespaces, as tests/test_offload.py.  The
error cases run against a second delegate whose offload root is a 256 KiB
tmpfs, so writes really fail (ENOSPC) after the program was told they
succeeded; each must surface at the fd's next call, at fsync or at close.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_offload import Lab, assert_same_tree, lab, offload  # noqa: F401 (fixture)
from tests.test_two_node import _start_delegate

pytestmark = [pytest.mark.root, pytest.mark.netns]

WB = ("--offload-write-behind", "4M")


def wb_meta(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["offload"]["write_behind"]


@contextlib.contextmanager
def tiny_root(lab: Lab, tmp_path: Path, port: int):
    """A delegate whose offload root is a 256 KiB tmpfs (and a native twin of it)."""
    root, native = tmp_path / "tiny-root", tmp_path / "tiny-native"
    for d in (root, native):
        d.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)], check=True)
    try:
        endpoint, proc = _start_delegate(lab.topo, port, "--offload-root", str(root),
                                         "--insecure")  # fmt: skip
        try:
            yield endpoint, root, native
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        for d in (root, native):
            subprocess.run(["umount", "-l", str(d)], check=False)


def test_programs_write_the_same_bytes_behind(lab, tmp_path):
    script = ("mkdir -p {P} && tar xf {tar} -C {P} && cd {P}/src && cat f5.bin f6.bin > cat.bin && "
              "python3 -c 'f = open(\"rw\", \"w+b\"); f.write(b\"abc\" * 5000); f.seek(0); "
              "print(len(f.read()))' && find . -type f | sort | xargs md5sum")  # fmt: skip
    fmt = {"tar": str(lab.base / "src.tar")}
    native = subprocess.run(["sh", "-c", script.format(P=lab.native / "wb", **fmt)],
                            capture_output=True, timeout=300)  # fmt: skip
    assert native.returncode == 0, native.stderr
    res = offload(lab, tmp_path / "run", ["sh", "-c", script.format(P=lab.prefix / "wb", **fmt)],
                  extra=WB)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == native.stdout and b"15000" in res.stdout
    assert_same_tree(lab, "wb")
    m = wb_meta(tmp_path / "run")
    assert m["async_writes"] > 100 and m["errors"] == 0 and m["unreported"] == []
    calls = json.loads((tmp_path / "run" / "run.json").read_text())
    assert calls["hot_path"]["why_python"].startswith("--offload-write-behind")


def test_an_error_behind_surfaces_at_fsync(lab, tmp_path):
    dd = "dd if=/dev/zero of={P}/big bs=64k count=16 conv=fsync status=none"
    with tiny_root(lab, tmp_path, 5611) as (endpoint, root, native):
        nat = subprocess.run(["sh", "-c", dd.format(P=native)], capture_output=True, timeout=60)
        assert nat.returncode != 0 and b"No space left on device" in nat.stderr
        res = offload(lab, tmp_path / "run", ["sh", "-c", dd.format(P=lab.prefix)],
                      endpoint=endpoint, extra=WB)  # fmt: skip
        assert res.returncode != 0
        assert b"No space left on device" in res.stderr, res.stderr.decode()
        m = wb_meta(tmp_path / "run")
        assert m["errors"] >= 1 and m["reported"] == 1 and m["unreported"] == []
        assert (root / "big").stat().st_size == (native / "big").stat().st_size


def test_an_error_behind_surfaces_at_the_next_call_or_at_close(lab, tmp_path):
    """Three 64 KiB writes fit, the fourth (128 KiB) stops short at the delegate: natively
    the program sees that short count; behind, it was told 128 KiB were written, so the
    fd's next call says ENOSPC: a further write (``more``) or, without one, ``close``."""
    py = ("import sys\nf = open(sys.argv[1], 'wb', buffering=0)\n"
          "for n in (65536, 65536, 65536, 131072):\n    print(f.write(b'x' * n))\n"
          "try:\n    (f.write(b'y') if sys.argv[2] == 'more' else None); f.close()\n"
          "except OSError as e:\n    print('error:', e.strerror); sys.exit(3)\n"
          "print('closed')\n")  # fmt: skip
    (tmp_path / "w.py").write_text(py)
    with tiny_root(lab, tmp_path, 5612) as (endpoint, root, native):
        nat = subprocess.run(["python3", str(tmp_path / "w.py"), str(native / "x"), "close"],
                             capture_output=True, timeout=60)  # fmt: skip
        written = (native / "x").stat().st_size
        assert nat.returncode == 0 and written < 4 * 65536 + 65536  # short, no error
        for how in ("more", "close"):
            run = tmp_path / f"run-{how}"
            res = offload(lab, run, ["python3", str(tmp_path / "w.py"), f"{lab.prefix}/{how}", how],
                          endpoint=endpoint, extra=WB)  # fmt: skip
            assert res.returncode == 3, res.stderr.decode()
            assert res.stdout.splitlines() == [b"65536", b"65536", b"65536", b"131072",
                                               b"error: No space left on device"]  # fmt: skip
            m = wb_meta(run)
            # the extra write goes behind too if it comes before the failed one's reply
            assert m["async_writes"] in ((4, 5) if how == "more" else (4,))
            assert m["errors"] == m["async_writes"] - 3  # every write behind the 3rd failed
            assert m["reported"] == 1
            assert m["unreported"] == []
            (root / how).unlink()  # room for the next


def test_a_slow_delegate_makes_the_fds_other_calls_wait_for_its_writes(lab, tmp_path):
    """With 20 ms per call at the delegate the writes are still in flight when the
    program seeks and reads back: those calls wait for them and see their bytes."""
    root = tmp_path / "slow-root"
    root.mkdir()
    endpoint, proc = _start_delegate(lab.topo, 5613, "--offload-root", str(root), "--insecure",
                                     "--delay-us", "20000")  # fmt: skip
    try:
        py = ("f = open('{P}/rw', 'w+b', buffering=0)\n"
              "for i in range(8):\n    f.write(bytes([65 + i]) * 4096)\n"
              "f.seek(0); print(f.read().count(b'H'), f.tell())\n")  # fmt: skip
        t0 = time.monotonic()
        res = offload(lab, tmp_path / "run", ["python3", "-c", py.format(P=lab.prefix)],
                      endpoint=endpoint, extra=WB)  # fmt: skip
        assert res.returncode == 0, res.stderr.decode()
        assert res.stdout == b"4096 32768\n"
        assert (root / "rw").read_bytes() == b"".join(bytes([65 + i]) * 4096 for i in range(8))
        m = wb_meta(tmp_path / "run")
        assert m["async_writes"] == 8 and m["waits"] >= 1 and m["peak_bytes"] > 4096
        assert time.monotonic() - t0 > 8 * 0.02  # the delay was real
    finally:
        proc.terminate()
        proc.wait(10)


def test_write_behind_is_refused_where_it_cannot_be_kept(lab, tmp_path):
    res = subprocess.run(
        ["python3", "-m", "testbed", "run", "--delegate", lab.endpoint, "--mode", "cost",
         "--forward", "write", "--offload-write-behind", "1M", "--", "true"],
        capture_output=True, timeout=60)  # fmt: skip
    assert res.returncode == 2 or b"only used with --mode offload" in res.stderr
    assert b"--offload-write-behind is only used with --mode offload" in res.stderr
    bad = subprocess.run(["python3", "-m", "testbed", "run", "--offload-write-behind", "4X",
                          "--", "true"], capture_output=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and b"is not a byte count" in bad.stderr
