"""Experiment matrices: workloads x forwarded sets/policies x delegates x repetitions.

``testbed experiment PLAN`` runs a plan (YAML or JSON) on this machine, one
``testbed run`` per cell, with a progress display.  It is resumable: a cell
whose run directory is complete is skipped, half-written ones are redone.
``playbooks/experiment.yml`` runs the same command on every compute node with
the inventory's delegate nodes as delegates and fetches the results, so both
produce the same layout::

    RESULTS/
      plan.json                          the normalised plan
      policies.json                      the plan's policies resolved once (sets per
                                         workload; which host's profile they came from)
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
    workloads:                     # catalogue names (testbed/jobs/workloads.py), or maps with options
      - gzip
      - {name: xz, size_mb: 2}
      - {name: words, command: [wc, -w, "{input}"], size_mb: 1}
      - {name: gainbench, gamma: [1, 4], phases: 10, samples: 100000000}
    forward:                       # syscall sets or policies
      - read,write
      - [write]
      - {policy: "min-freq:20%"}
    resolve: once                  # policies only: once (default) | per-host
    predictor: size                # optional: the report's headline predictor, declared
                                   # before any data (else chosen by nested cross-validation)
    delegates:                     # "local" starts one on loopback for the plan
      - local                      # replaced by --delegate (experiment.yml's delegate nodes)
      - {name: shm, local: shm}    # a delegate on this node over tcp, ipc or shm: kept
      - {name: slow, local: tcp, delay_us: 200}   # ... spinning 200 us per call
      - {name: node3, endpoint: "tcp://10.213.47.3:5555"}
      - kthread                    # the mktrace module's kernel thread on this node
      - {name: kt20, kthread: {delay_us: 20, faithful: false}}
      - {name: ktf, kthread: {delay_us: 20, faithful: true, flush_caller_tlb: true}}
    pin: false                     # true: program, relay (and a local delegate)
                                   # on separate CPUs; refused with < 2 CPUs
    replay: {from: shm}            # cost mode: after the cells, replay each cell run on
                                   # delegate shm against every other delegate
                                   # (elide_compute: true for --elide-compute;
                                   # docs/whatif.md), into
                                   # <workload>.<forward>.<target>.r<N>.replayed-from-shm/

A ``kthread`` delegate runs its cells with ``testbed run --backend kmod
--mode kthread`` (same-node, no network); it stays in the plan when
``--delegate`` replaces the network delegates, and on a node without the
module (``/dev/mktrace`` missing: seccomp-only) its cells are skipped with one
line saying so.

A policy is resolved **once** per experiment: from the native profiles of
the machine that resolves it, before the first cell, into ``policies.json``;
every cell then forwards that explicit set (``experiment.json``
``resolution``: how, on which host, from which profile, the set).  Under
Ansible the controller resolves (``testbed experiment PLAN --resolve-policies
-o RESULTS``) and every node runs with ``--policies RESULTS/policies.json``,
so all nodes forward the same set.  ``resolve: per-host`` keeps each node
resolving from its own profile (sets may then differ between nodes, and the
report will not pool them).

Every forwarded cell is preceded by a native run of the same workload
(native, forwarded, native, forwarded ...), so drift hits both alike.
The workload ``gainbench`` is the gain benchmark (testbed/jobs/gainbench.py); a
list of ``gamma`` values makes one workload ``gainbench-g<GAMMA>`` per value.  Its
old name ``gain`` is still accepted and keeps the old run names ``gain-g<GAMMA>``.

Modules: ``plan`` (schema, validation, cells), ``runner`` (native
references, cells, resume, ``testbed experiment``); the workloads and their
inputs come from ``testbed.jobs.workloads``, the local delegate from
``testbed.jobs.localdelegate``.
"""

from __future__ import annotations

from testbed.jobs.experiment.plan import (
    GAINBENCH_KEYS,
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
from testbed.jobs.experiment.runner import (
    CHECK_JSON_VERSION,
    Runner,
    check_json,
    check_results_dir,
    kthread_unavailable,
    main_experiment,
    read_policies,
    resolve_only,
    run_plan,
)
from testbed.jobs.localdelegate import LocalDelegate, ping
from testbed.jobs.workloads import DEFAULT_SIZE_MB, INPUT_MTIME, WORKLOADS, generate_input

__all__ = [
    "CHECK_JSON_VERSION",
    "DEFAULT_SIZE_MB",
    "GAINBENCH_KEYS",
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
    "parse_plan",
    "ping",
    "read_policies",
    "resolve_only",
    "run_plan",
]
