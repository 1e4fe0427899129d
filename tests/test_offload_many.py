"""Many compute nodes, one I/O node: three network namespaces run an offloaded
workload at the same time against one delegate in a fourth (real TCP through a
hub), each output byte-identical to a native run; ``testbed analyze`` then
reports per-client and aggregate throughput from the delegate's clock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import compare
from analysis import offload as O
from testbed.cluster import netns
from tests.conftest import run_testbed, tb_argv
from tests.test_offload import snapshot
from tests.test_two_node import _start_delegate

pytestmark = [pytest.mark.root, pytest.mark.netns]

ok, why = netns.available()
if not ok:
    pytest.skip(f"offload tests need network namespaces: {why}", allow_module_level=True)

CLIENTS = ("compute", "compute2", "compute3")  # _start_delegate probes from "compute"

# Phase 1 (copy, compress), a barrier every client passes only when all have
# finished phase 1, then phase 2 (decompress, list): every client has calls at
# the delegate before and after the barrier, so all three spans overlap.
WORKLOAD = (
    "set -e; mkdir -p {P}; cp {src} {P}/in; gzip -n -c {P}/in > {P}/in.gz; "
    "touch {B}/{me}; n=0; while [ $(ls {B} | wc -l) -lt {N} ]; do "
    "n=$((n+1)); [ $n -lt 2400 ] || exit 9; sleep 0.05; done; "
    "gunzip -c {P}/in.gz > {P}/out; cmp {P}/in {P}/out; sha256sum < {P}/in.gz; ls -l {P} | wc -l"
)


def _source(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 5000, 400_000)
    text = "\n".join(f"line {i} word{w}" for i, w in enumerate(words)).encode()
    path.write_bytes(text + rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes())


def test_three_compute_nodes_offload_to_one_delegate_concurrently(tmp_path):
    root, prefix, native, barrier = (tmp_path / n for n in ("root", "mnt", "native", "barrier"))
    for d in (root, prefix, native, barrier / "native", barrier / "offload"):
        d.mkdir(parents=True)
    srcs = {c: tmp_path / f"src-{c}" for c in CLIENTS}
    for i, p in enumerate(srcs.values()):
        _source(p, i)

    def script(c: str, top: Path, b: Path) -> str:
        return WORKLOAD.format(P=top / c, src=srcs[c], B=b, me=c, N=len(CLIENTS))

    # native: the same three scripts, concurrently, on a local directory
    nat = [
        subprocess.Popen(
            ["sh", "-c", script(c, native, barrier / "native")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for c in CLIENTS
    ]
    nat_out = [p.communicate(timeout=300) for p in nat]
    assert all(p.returncode == 0 for p in nat), [e.decode() for _, e in nat_out]

    with netns.Topology([*CLIENTS, "delegate"]) as topo:
        endpoint, dproc = _start_delegate(topo, 5611, "--offload-root", str(root), "--insecure")
        runs = [tmp_path / f"run-{c}" for c in CLIENTS]
        procs = [
            topo.popen(
                c,
                tb_argv(
                    "run",
                    "--delegate",
                    endpoint,
                    "--mode",
                    "offload",
                    "--offload-path",
                    str(prefix),
                    "--quiet",
                    "-o",
                    str(run),
                    "--",
                    "sh",
                    "-c",
                    script(c, prefix, barrier / "offload"),
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for c, run in zip(CLIENTS, runs, strict=True)
        ]
        outs = [p.communicate(timeout=600) for p in procs]
        dproc.terminate()
        assert dproc.wait(10) == 0
    for p, (out, err), (nout, _) in zip(procs, outs, nat_out, strict=True):
        assert p.returncode == 0, err.decode()
        assert b"Traceback" not in err
        assert out == nout and len(out) > 64
    assert os_listdir(prefix) == [], "something was written to the local mount point"
    for c in CLIENTS:
        remote = snapshot(root / c)
        assert remote and remote == snapshot(native / c)  # type, mode, size, sha256

    # the analysis: one group of three concurrent clients of one delegate
    _, loaded = compare.load_runs(runs)
    assert {r.mechanism for r in loaded} == {"seccomp/tcp/remote/offload"}
    rows = O.run_rows(loaded, {})
    many = O.many_clients(rows)
    clients = many[many["client"] != "aggregate"]
    agg = many[many["client"] == "aggregate"]
    assert len(clients) == 3 and len(agg) == 1
    assert int(agg["clients"].iloc[0]) == 3 and float(agg["overlap_s"].iloc[0]) > 0
    assert int(agg["bytes_moved"].iloc[0]) == int(clients["bytes_moved"].sum())
    for c, r in zip(CLIENTS, runs, strict=True):
        moved = int(rows[rows["run"] == r.name]["bytes_moved"].iloc[0])
        # each client moved its source out and back several times (cp, gzip, gunzip, cmp)
        assert moved > 3 * srcs[c].stat().st_size
    # aggregate span covers every client's span
    assert float(agg["span_s"].iloc[0]) >= float(clients["span_s"].max())

    res = run_testbed("analyze", *map(str, runs), "-o", str(tmp_path / "report"), timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "### Many clients, one delegate" in md
    assert (tmp_path / "report" / "figures" / "offload.png").stat().st_size > 0
    table = pd.read_csv(tmp_path / "report" / "tables" / "offload_many_clients.csv")
    assert list(table["client"].astype(str)) == ["1", "2", "3", "aggregate"]
    print("\n" + many.to_string(index=False), file=sys.stderr)


def os_listdir(p: Path) -> list[str]:
    return sorted(x.name for x in p.iterdir())


def test_analyze_compares_local_io_cost_forwarding_and_offload(tmp_path):
    # The same workloads as two experiment plans (cost-mode forwarding of the
    # file I/O calls, then offload), each cell checked against its native run
    # by SHA-256; `testbed analyze` puts native, cost and offload side by side.
    common = "workloads:\n  - {name: cat, size_mb: 2}\n  - {name: gzip, size_mb: 1}\ndelegates: [local]\n"
    plans = {
        "cost": "name: cmp-cost\nforward: ['read,write,openat']\n" + common,
        "offload": "name: cmp-offload\nmode: offload\noffload_path: /tb-cmp-offload\n" + common,
    }
    results = []
    for mode, text in plans.items():
        plan = tmp_path / f"{mode}.yml"
        plan.write_text(text)
        results.append(tmp_path / f"results-{mode}")
        res = run_testbed("experiment", str(plan), "-o", str(results[-1]), "--host-label", "here",
                          timeout=600)  # fmt: skip
        assert res.returncode == 0, res.stderr.decode()
        assert b"failed=0" in res.stdout
    out = tmp_path / "report"
    res = run_testbed("analyze", *map(str, results), "-o", str(out), timeout=300)
    assert res.returncode == 0, res.stderr.decode()
    side = pd.read_csv(out / "tables" / "offload_side_by_side.csv")
    for w, size in (("cat", 2_000_000), ("gzip", 1_000_000)):
        rows = side[side["workload"] == w].set_index("how")
        assert list(rows.index) == ["native (local I/O)", "cost: seccomp/tcp/loopback [openat,read,write]",
                                    "offload: seccomp/tcp/loopback/offload"]  # fmt: skip
        nat, cost, off = (rows.iloc[i] for i in range(3))
        assert nat["slowdown"] == 1.0 and nat["wall_median_s"] > 0
        assert cost["slowdown"] > 0 and off["slowdown"] > 0
        assert cost["exec_median_s"] == 0  # cost mode: nothing executes at the delegate
        assert off["exec_median_s"] > 0
        # offload moves the input to the compute node (bytes_out of the reads);
        # cost mode only marshals the write buffers (the reads' buffers are outputs)
        assert off["bytes_moved_per_run"] >= size
        assert np.isfinite(off["alpha_s"]) and np.isfinite(off["beta_ns_per_byte"])
    md = (out / "report.md").read_text()
    assert "## Offload: local I/O, cost-mode forwarding and offload" in md
    assert "### Many clients" not in md  # the cells ran one after another
    assert not Path("/tb-cmp-offload").exists()
