"""analysis.mechanisms on synthetic run directories with known answers.

Three mechanisms side by side (kthread same-node, a loopback relay, a remote
relay): f_c ratios recovered, predictions never fitted on the predicted run,
the paper's 40 µs never a data row, the emulation caveat when runs are stamped
as QEMU TCG.  The TLB experiment: a faithful variant whose runs pay a per-call
cost outside the forwarding overhead (TLB refills) shows error growth with γ
that the default does not, and the verdict says so; without that cost it says
the flushes do not explain it.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis import compare, mechanisms
from analysis.report import build_report, render_markdown
from analysis.synthetic import delegated_run, native_run

pytestmark = pytest.mark.unit

HOST = "guest"
#: one-way f_c per mechanism (s): kthread handoff, loopback relay, remote relay
TRUTH = {"kthread": 5e-6, "local": 400e-6, "host": 1000e-6}
ENDPOINT = {"local": "tcp://127.0.0.1:5555", "host": "tcp://10.0.2.100:5555"}


def _cell(workload: str, rep: int, delegate: str, gamma: int | None = None) -> dict:
    return {"workload": workload, "policy": None, "repetition": rep, "gamma": gamma,
            "host": HOST, "delegate": delegate}  # fmt: skip


def _stamp(path, *, kthread: dict | None = None, extra_wall: float = 0.0, emulated: bool) -> None:
    """Make a synthetic run a kthread run and/or stamp it as run under QEMU TCG."""
    p = path / "run.json"
    meta = json.loads(p.read_text())
    if kthread is not None:
        meta.update(backend="kmod", mode="kthread", endpoint=None)
        meta["delegate"] = {"kind": "kthread", "delay_us": 0.0, **kthread}
    meta["wall_s"] += extra_wall
    meta["host"]["virtualization"] = {"virtualised": True, "emulated": emulated}
    p.write_text(json.dumps(meta))


def _mechanism_tree(base, emulated: bool = True):
    i = 0
    for w, t_nd in (("cat", 0.5), ("gzip", 1.5)):
        for rep in (1, 2):
            for d, fc in TRUTH.items():
                i += 1
                cell = _cell(w, rep, d)
                n = native_run(base / f"n{i}", [w], t_nd, hostname=HOST, cell=cell)
                _stamp(n, emulated=emulated)
                r = delegated_run(base / f"d{i}", [w], {"read": 300, "write": 200}, fc, t_nd,
                                  backend="kmod", endpoint=ENDPOINT.get(d, ""), native=False,
                                  seed=i, call_noise=0.2, hostname=HOST, cell=cell)  # fmt: skip
                _stamp(r, kthread={"faithful": False} if d == "kthread" else None,
                       emulated=emulated)  # fmt: skip
    return base


def test_three_mechanisms_side_by_side(tmp_path):
    # the report's content; its rendering (CSV, Markdown, figures) is checked once, on
    # test_accuracy's shared report
    c = build_report([_mechanism_tree(tmp_path / "runs")])
    text = render_markdown(c, "now")
    side = c.tables["mechanisms_fc"]
    assert set(side["mechanism"]) == {
        "kmod-kthread/same-node",
        "kmod/libzmq-tcp/loopback",
        "kmod/libzmq-tcp/remote",
    }
    by = side.set_index("mechanism")
    assert by.loc["kmod-kthread/same-node", "median ratio"] == 1.0
    for mech, d in (("kmod/libzmq-tcp/loopback", "local"), ("kmod/libzmq-tcp/remote", "host")):
        want = TRUTH[d] / TRUTH["kthread"]
        assert by.loc[mech, "median ratio"] == pytest.approx(want, rel=0.1)
        assert by.loc[mech, "ratio lo"] <= by.loc[mech, "median ratio"] <= by.loc[mech, "ratio hi"]
        assert by.loc[mech, "median lo"] <= TRUTH[d] * 1e6 <= by.loc[mech, "median hi"] * 1.05
    # every prediction is made without the predicted run (leave one run out)
    pred = c.tables["mechanisms_predictions"]
    assert (pred["train_runs"] == 3).all()  # 4 runs per mechanism, the predicted one left out
    assert pred["rel_error"].abs().max() < 0.02
    per = c.tables["mechanisms_per_workload"]
    assert len(per) == 6 and (per["predicted_S_r"] < 1).all()
    assert per["predicted_S_r"].values == pytest.approx(per["measured_S"].values, rel=0.02)
    # the paper's 40 µs: only the figure's reference line, never a data row
    for name in ("mechanisms_fc", "same_node_vs_remote", "fc_per_mechanism"):
        tab = c.tables[name]
        assert not tab["mechanism"].str.contains("paper").any(), name
    assert "## Mechanisms side by side" in text
    assert "only ratios between mechanisms measured in one guest" in text.lower()
    assert text.index("Emulated CPU") < text.index("## Profiles")  # stated at the top too
    assert "fc_per_mechanism" in [f.name for f in c.figures]


def _load(base):
    _, runs, natives = compare.load_all(sorted(base.iterdir()))
    return runs, natives


def test_no_emulation_caveat_for_runs_not_stamped_as_emulated(tmp_path):
    runs, natives = _load(_mechanism_tree(tmp_path / "runs", emulated=False))
    fits = compare.fit_mechanisms(runs, {})
    text = "\n".join(mechanisms.mechanism_section(runs, natives, {}, fits).markdown)
    assert "## Mechanisms side by side" in text and "Emulated CPU" not in text


def _tlb_tree(base, refill_s: float):
    """Gain runs at γ 1, 4, 16 under kthread default and faithful+flushcaller."""
    C, G, n = 4.0, 0.2, 4000
    i = 0
    for g in (1, 4, 16):
        for rep in (1, 2):
            for name, faithful in (("kt", False), ("ktfc", True)):
                i += 1
                cell = _cell(f"gain-g{g}", rep, name, gamma=g)
                t_nd = C / g + G
                nat = native_run(base / f"n{i}", ["gb", str(g)], t_nd * (1 + 0.001 * rep),
                                 user_s=C / g, sys_s=G, hostname=HOST, cell=cell)  # fmt: skip
                _stamp(nat, emulated=True)
                r = delegated_run(base / f"d{i}", ["gb", str(g)], {"write": n}, 20e-6, t_nd,
                                  backend="kmod", native=False, seed=i, hostname=HOST,
                                  cell=cell)  # fmt: skip
                flags = {"faithful": faithful, "flush_caller_tlb": faithful}
                _stamp(r, kthread=flags, extra_wall=n * refill_s if faithful else 0.0,
                       emulated=True)  # fmt: skip
    return base


@pytest.mark.parametrize("refill_s, explains", [(50e-6, True), (0.0, False)])
def test_tlb_experiment_rows_and_verdict(tmp_path, refill_s, explains):
    _tlb_tree(tmp_path / "runs", refill_s)
    if explains:  # through the whole report once
        c = build_report([tmp_path / "runs"])
        text, t = render_markdown(c, "now"), c.tables["tlb_experiment"]
    else:
        sec = mechanisms.tlb_section(*_load(tmp_path / "runs"), {})
        text, t = "\n".join(sec.markdown), sec.tables["tlb_experiment"]
    assert set(t["mechanism"]) == {"kmod-kthread/same-node",
                                   "kmod-kthread-faithful-flushcaller/same-node"}  # fmt: skip
    assert sorted(set(t["gamma"])) == [1, 4, 16] and len(t) == 6
    assert (t["predicted_runs"] == 2).all()
    by = t.set_index(["mechanism", "gamma"])["mean_abs_error"]
    assert by[("kmod-kthread/same-node", 16)] < 0.01  # the default: the model holds
    faithful16 = by[("kmod-kthread-faithful-flushcaller/same-node", 16)]
    if explains:
        # refills outside the forwarding overhead: the error grows as C/γ shrinks
        assert faithful16 > by[("kmod-kthread-faithful-flushcaller/same-node", 1)] + 0.05
        assert "they explain that part of it here" in text
    else:
        assert faithful16 < 0.01
        assert "the flushes do not explain the error growth here" in text
    assert "## TLB experiment" in text and "What TCG cannot show" in text


def test_tlb_section_needs_a_faithful_variant(tmp_path):
    runs, natives = _load(_mechanism_tree(tmp_path / "runs"))
    assert mechanisms.tlb_section(runs, natives, {}).markdown == []


def _tlb_rows(errors: dict[str, list[float]], spread: float = 0.05) -> pd.DataFrame:
    rows = [{"mechanism": m, "gamma": g, "mean_abs_error": e, "native_spread": spread}
            for m, es in errors.items() for g, e in zip((1, 4, 16), es, strict=True)]  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    "default, faithful, says",
    [
        ([0.02, 0.03, 0.02], [0.02, 0.15, 0.40], "they explain that part of it here"),
        ([0.02, 0.20, 0.40], [0.02, 0.22, 0.41], "the default, which flushes nothing, grows"),
        # both shrink, the default more: no growth with the flushes, nothing to attribute
        ([3.50, 1.00, 0.18], [0.60, 0.40, 0.31], "with them the error does not grow"),
    ],
)  # fmt: skip
def test_tlb_verdict_attributes_only_growth_beyond_the_default(default, faithful, says):
    t = _tlb_rows({"kmod-kthread/same-node": default,
                   "kmod-kthread-faithful/same-node": faithful})  # fmt: skip
    (line,) = mechanisms.tlb_verdict(t)
    assert says in line
    assert ("do not explain" in line) == (says != "they explain that part of it here")


def test_offload_variants_are_their_own_mechanisms():
    from testbed.core import mechanisms

    base = {"backend": "seccomp", "mode": "offload", "endpoint": "tcp://127.0.0.1:5555",
            "transport": "zmtp"}  # fmt: skip
    assert mechanisms.mechanism(base) == "seccomp/tcp/loopback/offload"
    ra = {**base, "offload": {"read_ahead": {"depth": 4, "active": True}}}
    assert mechanisms.mechanism(ra) == "seccomp/tcp/loopback/offload+ra4"
    idle = {**base, "offload": {"read_ahead": {"depth": 4, "active": False}}}
    assert mechanisms.mechanism(idle) == "seccomp/tcp/loopback/offload"  # it did not run
    wb = {**base, "offload": {"write_behind": {"window_bytes": 4194304}}}
    assert mechanisms.mechanism(wb) == "seccomp/tcp/loopback/offload+wb4194304"
    for label in ("seccomp/tcp/loopback/offload", "seccomp/tcp/loopback/offload+ra4",
                  "seccomp/tcp/remote+200us/offload+wb4194304"):  # fmt: skip
        assert mechanisms.is_offload(label)
    assert not mechanisms.is_offload("seccomp/tcp/loopback")
    assert mechanisms.place("seccomp/tcp/loopback+200us/offload") == "loopback"
    assert mechanisms.place("seccomp/shm/same-node") == "same-node"
