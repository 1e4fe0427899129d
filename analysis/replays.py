"""Replay runs (``testbed replay``) set against the real runs they predict.

A replay run (``mode`` ``replay``) predicts the wall time of its source's
program on the delegate it replayed against.  It is a prediction, not a
measurement: ``analysis.report`` keeps replay runs out of every fit and
accuracy table and shows them here, each beside

* the *measured* wall time: the median of the real runs in the same report on
  the same host, of the same experiment cell's workload and forwarded set (or
  command and forwarded calls), on the mechanism of the replay's target (the
  replay's mechanism with the source's backend), the source run itself never
  among them (a replay of the same configuration with no other real run is
  scored against the source: what it reproduces);
* the model's what-if for the same change (``run.json`` ``replay.model_wall_s``,
  :func:`analysis.model.t_d_with_delay`);
* the model's own cross-validated prediction of those same real runs (the
  headline's predictor and scheme, ``tables/model_accuracy.csv``): the second,
  independent way to predict, on the same runs.

None of these predictions is fitted on the runs it is compared with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.compare import DelegatedRun
from analysis.mechanisms import Section
from analysis.tables import markdown_table
from testbed.core import mechanisms


def is_replay(r: DelegatedRun) -> bool:
    return r.meta.get("mode") == "replay"


def target_mechanism(meta: dict) -> str:
    """The mechanism a replay predicts: its own, with the source's backend."""
    source = str((meta.get("replay") or {}).get("source_mechanism") or "")
    backend = source.split("/", 1)[0] or "seccomp"
    return mechanisms.mechanism({**meta, "backend": backend, "mode": "cost"})


def _key(r: DelegatedRun) -> tuple[str, ...]:
    """What a replay and a real run must share: the host, and the experiment cell's
    workload and forwarded set (else the command line and the forwarded calls)."""
    host = str((r.meta.get("host") or {}).get("hostname") or "")
    if r.cell.get("workload") and r.cell.get("forward"):
        return host, "cell", str(r.cell["workload"]), str(r.cell["forward"])
    forwarded = ",".join(sorted(r.meta.get("forwarded") or []))
    return host, "command", str(r.meta.get("command_line") or ""), forwarded


def _cv_predictions(acc: pd.DataFrame | None) -> dict[tuple[str, str, str], float]:
    """(host, run directory name, mechanism) -> the headline's cross-validated prediction."""
    if acc is None or not len(acc) or "predicted" not in acc:
        return {}
    return {
        (str(h), str(n), str(m)): float(p)
        for h, n, m, p in zip(acc["host"], acc["run"], acc["mechanism"], acc["predicted"],
                              strict=True)
        if p == p
    }  # fmt: skip


def rows(
    replays: list[DelegatedRun], runs: list[DelegatedRun], acc: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One row per replay run: its prediction, the replay's and the model's errors
    (``acc``: ``tables/model_accuracy.csv``'s rows, for the model's own predictions)."""
    cv = _cv_predictions(acc)
    real: dict[tuple[str, ...], list[DelegatedRun]] = {}
    for r in runs:
        real.setdefault((*_key(r), mechanisms.mechanism(r.meta)), []).append(r)
    out = []
    for rp in replays:
        info = rp.meta.get("replay") or {}
        source = Path(str(info.get("source") or "")).resolve()
        target = target_mechanism(rp.meta)
        measured = [
            r for r in real.get((*_key(rp), target), []) if Path(r.path).resolve() != source
        ]
        how = "other runs"
        if not measured and target == info.get("source_mechanism"):
            # same configuration: the recording itself is what the replay reproduces
            measured = [r for r in runs if Path(r.path).resolve() == source]
            how = "the recorded run"
        walls = [r.wall for r in measured]
        m = float(np.median(walls)) if walls else float("nan")
        cv_preds = [
            cv[k] for r in measured if (k := (r.host or "–", Path(r.path).name, r.mechanism)) in cv
        ]
        cv_wall = float(np.median(cv_preds)) if cv_preds and how == "other runs" else float("nan")
        model_wall = info.get("model_wall_s")
        model_wall = float(model_wall) if model_wall is not None else float("nan")
        out.append(
            {
                "replay": Path(rp.path).name,
                "command": str(rp.meta.get("command_line") or "")[:60],
                "source": source.name,
                "source_mechanism": info.get("source_mechanism"),
                "target_mechanism": target,
                "elide_compute": bool(info.get("elide_compute")),
                "calls": rp.forwarded_calls,
                "faults": int((rp.meta.get("calls") or {}).get("faults", 0)),
                "source_wall_s": info.get("source_wall_s"),
                "replay_wall_s": rp.wall,
                "measured_wall_s": m,
                "measured_runs": len(walls),
                "measured_from": how if walls else "",
                "replay_error": rp.wall / m - 1 if walls else float("nan"),
                "model_wall_s": model_wall,
                "model_error": model_wall / m - 1 if walls else float("nan"),
                "model_cv_wall_s": cv_wall,
                "model_cv_runs": len(cv_preds) if cv_wall == cv_wall else 0,
                "model_cv_error": cv_wall / m - 1 if walls else float("nan"),
            }
        )
    return pd.DataFrame(out)


def section(
    replays: list[DelegatedRun], runs: list[DelegatedRun], acc: pd.DataFrame | None = None
) -> Section:
    """The report's "Replay-predicted vs measured" section (empty without replay runs)."""
    if not replays:
        return Section()
    df = rows(replays, runs, acc)
    scored = df[df["measured_runs"] > 0]
    md = [
        "## Replay-predicted vs measured",
        "",
        "Each replay run (`testbed replay`) re-issued the forwarded calls of a recorded run "
        "against another delegate and predicts the program's wall time there (replay_wall_s). "
        "measured_wall_s is the median wall time of the real runs in this report on the same "
        "host of the same workload and forwarded set (experiment cell, else command) on the "
        "replay's target mechanism (never the recorded run itself); model_wall_s is the "
        "model's what-if where it has a term for the change, the delegate's added delay "
        "(`analysis.model.t_d_with_delay`: recorded wall + n × added delay; blank for a "
        "change of transport or place); model_cv_wall_s is the model's own prediction of the "
        "same measured runs: the median of their cross-validated predictions in "
        "`tables/model_accuracy.csv` (the headline's predictor and scheme, fitted on other "
        "runs; blank where that scheme predicts none of them). None is fitted on the "
        "measured runs. Replay runs take part in no fit and no other table.",
        "",
    ]
    if len(scored):
        model = scored["model_error"].abs().dropna()
        both = scored[scored["model_cv_error"].notna()]
        md += [
            f"Mean |error| over {len(scored)} replays with a measured target: replay "
            f"{scored['replay_error'].abs().mean():.1%}"
            + (f"; the model's what-if over {len(model)} of them: {model.mean():.1%}"
               if len(model) else "")
            + (f"; over the {len(both)} whose measured runs the model also predicted, replay "
               f"{both['replay_error'].abs().mean():.1%} against the model's own "
               f"{both['model_cv_error'].abs().mean():.1%}" if len(both) else "")
            + ".",
            "A replay of the same configuration is scored against the recorded run itself "
            "(measured_from) when no other run of it is given.",
            "",
        ]  # fmt: skip
    else:
        md += ["No real run of a replay's target is in this report: nothing to score.", ""]
    if (df["faults"] > 0).any():
        md += ["Replays with faults (calls without a reply) do not predict anything.", ""]
    shown = df.copy()
    for col in ("replay_error", "model_error", "model_cv_error"):
        shown[col] = shown[col].map(lambda v: "" if v != v else f"{v:+.1%}")
    md += [markdown_table(shown), ""]
    return Section(tables={"replay_vs_measured": df}, markdown=md)
