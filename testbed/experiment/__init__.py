"""Experiment matrices: workloads x forwarded sets/policies x delegates x repetitions.

``testbed experiment PLAN`` runs a plan (YAML or JSON) on this machine, one
``testbed run`` per cell, with a progress display.  It is resumable: a cell
whose run directory is complete is skipped, half-written ones are redone.
``playbooks/experiment.yml`` runs the same command on every compute node with
the inventory's delegate nodes as delegates and fetches the results, so both
produce the same layout::

    RESULTS/
      plan.json                          the normalised plan
      <host>/
        native/<workload>.json           native run: wall time, output sha256
        profile-<workload>/              native profile (only for policy cells)
        <workload>.<forward>.<delegate>.r<N>/
          run.json calls.bin syscalls.csv   the run directory (docs/rundir.md)
          experiment.json                the cell, output checksum vs native,
                                         relay/delegate CPU time, CPUs used
        native/<workload>.<forward>.<delegate>.r<N>/
          run.json experiment.json       the native run made just before that cell
                                         (kind "native": wall/user/sys time)

A plan::

    name: gzip-lab                 # optional (default: the file name)
    repetitions: 2                 # default 1
    mode: cost                     # cost | offload (default cost)
    offload_path: /gpfs            # offload mode only: the offloaded prefix (docs/offload.md)
    backend: seccomp               # seccomp | kmod (default seccomp)
    timeout_s: 600                 # per run (default 600)
    workloads:                     # catalogue names (testbed/workloads.py), or maps with options
      - gzip
      - {name: xz, size_mb: 2}
      - {name: words, command: [wc, -w, "{input}"], size_mb: 1}
      - {name: gain, gamma: [1, 4], phases: 10, samples: 100000000}
    forward:                       # syscall sets or policies
      - read,write
      - [write]
      - {policy: "min-freq:20%"}
    delegates:                     # "local" starts one on loopback for the plan
      - local
      - {name: node3, endpoint: "tcp://10.213.47.3:5555"}
      - kthread                    # the mktrace module's kernel thread on this node
      - {name: kt20, kthread: {delay_us: 20, faithful: false}}
      - {name: ktf, kthread: {delay_us: 20, faithful: true, flush_caller_tlb: true}}
    pin: false                     # true: program, relay (and a local delegate)
                                   # on separate CPUs; refused with < 2 CPUs

A ``kthread`` delegate runs its cells with ``testbed run --backend kmod
--mode kthread`` (same-node, no network); it stays in the plan when
``--delegate`` replaces the network delegates, and on a node without the
module (``/dev/mktrace`` missing: seccomp-only) its cells are skipped with one
line saying so.

Every forwarded cell is preceded by a native run of the same workload
(native, forwarded, native, forwarded ...), so drift hits both alike.
The workload ``gain`` is the gain benchmark (testbed/gain.py); a list of
``gamma`` values makes one workload ``gain-g<GAMMA>`` per value.

Modules: ``plan`` (schema, validation, cells), ``runner`` (native
references, cells, resume, ``testbed experiment``); the workloads and their
inputs come from ``testbed.workloads``, the local delegate from
``testbed.localdelegate``.
"""

from __future__ import annotations

from testbed.experiment.plan import (
    GAIN_KEYS,
    PLAN_KEYS,
    Cell,
    DelegateSpec,
    Forward,
    Plan,
    PlanError,
    Workload,
    cells,
    label,
    load_plan,
    parse_plan,
)
from testbed.experiment.runner import (
    CHECK_JSON_VERSION,
    Runner,
    check_json,
    check_results_dir,
    kthread_unavailable,
    main_experiment,
    mechanism_args,
    run_plan,
)
from testbed.localdelegate import LocalDelegate, ping
from testbed.workloads import DEFAULT_SIZE_MB, INPUT_MTIME, WORKLOADS, generate_input

__all__ = [
    "CHECK_JSON_VERSION",
    "DEFAULT_SIZE_MB",
    "GAIN_KEYS",
    "INPUT_MTIME",
    "PLAN_KEYS",
    "WORKLOADS",
    "Cell",
    "DelegateSpec",
    "Forward",
    "LocalDelegate",
    "Plan",
    "PlanError",
    "Runner",
    "Workload",
    "cells",
    "check_json",
    "check_results_dir",
    "generate_input",
    "kthread_unavailable",
    "label",
    "load_plan",
    "main_experiment",
    "mechanism_args",
    "parse_plan",
    "ping",
    "run_plan",
]
