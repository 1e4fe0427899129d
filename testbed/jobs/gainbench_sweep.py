"""``testbed gainbench``: the gain benchmark's sweep over gamma and its report (Figs. 12-13).

The sweep is an experiment plan (:mod:`testbed.jobs.experiment`) of the
workload ``gainbench`` (:mod:`testbed.jobs.gainbench`) at each gain, natively
and forwarded under each set, natives interleaved; the report is
:func:`analysis.report.write_report` of its results.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from analysis.report import write_report
from testbed.jobs import experiment
from testbed.jobs.gainbench import DEFAULT_PHASES, DEFAULT_SAMPLES, WORKLOAD

#: The forwarded sets of the sweep: the paper's two policies and a read,write set.
DEFAULT_SETS = ("min-freq:20%", "max-freq:20%", "read,write")


def sweep_plan(
    gammas: list[int],
    repetitions: int = 3,
    phases: int = DEFAULT_PHASES,
    samples: int = DEFAULT_SAMPLES,
    sets: tuple[str, ...] | list[str] = DEFAULT_SETS,
    backend: str = "seccomp",
    pin: bool = False,
    name: str = "gamma",
) -> dict:
    """The plan (a mapping for ``testbed.jobs.experiment.parse_plan``) of the gain sweep."""
    forward = [s if ":" not in s else {"policy": s} for s in sets]
    return {
        "name": name,
        "repetitions": repetitions,
        "backend": backend,
        "pin": pin,
        "workloads": [
            {"name": WORKLOAD, "gamma": list(gammas), "phases": phases, "samples": samples}
        ],  # fmt: skip
        "forward": forward,
        "delegates": ["local"],
    }


def main_gainbench(
    gammas: list[int],
    *,
    repetitions: int = 3,
    phases: int = DEFAULT_PHASES,
    samples: int = DEFAULT_SAMPLES,
    forward: list[str] | None = None,
    backend: str = "seccomp",
    pin: bool = False,
    delegates: list[str] | None = None,
    output: str | os.PathLike = "results/gamma",
    report: str | None = "report-gamma",
    host_label: str | None = None,
    check: bool = False,
) -> int:
    """``testbed gainbench``: the whole gain sweep, then the report (Figs. 12-13).

    ``gammas`` as :func:`testbed.jobs.gainbench.parse_gammas` gives them;
    ``forward`` defaults to :data:`DEFAULT_SETS`, ``host_label`` to the host
    name; ``delegates`` (``NAME=ENDPOINT``) replace the local one; no report
    when ``report`` is empty.  With ``check`` only print the plan.  Exit
    status 1 if a cell failed.
    """
    data = sweep_plan(gammas, repetitions, phases, samples,
                      forward or DEFAULT_SETS, backend, pin)  # fmt: skip
    plan = experiment.parse_plan(data, "gamma", "testbed gainbench", delegates or None)
    results = Path(output).absolute()
    host = experiment.label(host_label or socket.gethostname())
    if check:
        print(json.dumps(plan.to_json(), indent=2))
        print(f"plan {plan.name}: valid, {len(experiment.cells(plan))} runs")
        return 0
    counts = experiment.run_plan(plan, results, host)
    print(f"gainbench sweep: ran={counts['ran']} skipped={counts['skipped']} "
          f"failed={counts['failed']} results={results}")  # fmt: skip
    if report:
        written = write_report([results], report)
        head = written.read_text().split("\n## ", 1)[0].splitlines()
        for line in head:
            if line.startswith(("**Model accuracy", "- ")):
                print(line.replace("**", ""))
        print(f"report: {written}")
    return 1 if counts["failed"] else 0
