"""``testbed provision``: run one of the project's Ansible playbooks via ansible-runner.

    testbed provision -i INVENTORY [PLAYBOOK] [-e KEY=VALUE | -e @FILE | -e JSON]...

PLAYBOOK is a name from ``playbooks/`` (``site.yml`` by default,
``experiment.yml``, ``teardown.yml``) or a path.  Progress is streamed one line
per task and host; the end is a per-host summary (ok / changed / failed /
unreachable / skipped).  A failed or unreachable host makes the command fail
with one line naming the host and the reason.  ansible-runner's private data
directory is a temporary directory, removed afterwards unless the run failed
or ``--keep-artifacts`` is given.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.core.errors import TestbedError
from testbed.core.procs import testbed_env

PLAYBOOKS_DIR = Path(
    os.environ.get("TESTBED_PLAYBOOKS") or Path(__file__).resolve().parents[2] / "playbooks"
)

#: Extra variables holding controller paths: made absolute before the run,
#: because Ansible runs with the playbook directory as working directory.
PATH_VARS = ("experiment_plan", "experiment_results_dir", "experiment_results_root")
#: Extra variables holding a list of controller paths (or one comma-separated string).
PATH_LIST_VARS = ("experiment_plans",)

_STAT_KEYS = (("ok", "ok"), ("changed", "changed"), ("failures", "failed"), ("dark", "unreachable"),
              ("skipped", "skipped"), ("rescued", "rescued"), ("ignored", "ignored"))  # fmt: skip


class ProvisionError(TestbedError):
    """Bad inventory, playbook or extra variables, or a failed play."""


@dataclass
class ProvisionResult:
    """Outcome of one playbook run."""

    status: str
    rc: int
    hosts: dict[str, dict[str, int]] = field(default_factory=dict)
    problems: dict[str, str] = field(
        default_factory=dict
    )  # host -> first failure / unreachable msg
    artifacts: Path | None = None

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.problems and bool(self.hosts)

    def total(self, key: str) -> int:
        return sum(h.get(key, 0) for h in self.hosts.values())


def resolve_playbook(name: str) -> Path:
    """A playbook name from playbooks/ or a path to one."""
    p = Path(name)
    if p.is_file():
        return p.absolute()
    candidate = PLAYBOOKS_DIR / name
    if candidate.is_file() and candidate.suffix in (".yml", ".yaml"):
        return candidate
    known = sorted(x.name for x in PLAYBOOKS_DIR.glob("*.yml"))
    raise ProvisionError(
        f"playbook {name!r} not found (known: {', '.join(known) or 'none'}; or give a path)"
    )


def check_inventory(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ProvisionError(f"inventory {path}: no such file or directory")
    if p.is_dir() and not any(x for x in p.iterdir() if not x.name.startswith(".")):
        raise ProvisionError(
            f"inventory {path}: empty directory (expected hosts.ini and group_vars/)"
        )
    return p.absolute()


def parse_extra_vars(items: list[str]) -> dict[str, Any]:
    """``-e`` values as Ansible takes them: KEY=VALUE pairs, JSON/YAML maps or @FILE."""

    import yaml  # lazy: PyYAML (16 ms), --extra-vars files only

    out: dict[str, Any] = {}
    for item in items:
        text = item.strip()
        if text.startswith("@"):
            try:
                data = yaml.safe_load(Path(text[1:]).read_text())
            except OSError as exc:
                raise ProvisionError(f"extra vars file {text[1:]}: {exc.strerror}") from None
            except yaml.YAMLError:
                raise ProvisionError(f"extra vars file {text[1:]}: not valid YAML/JSON") from None
            if not isinstance(data, dict):
                raise ProvisionError(f"extra vars file {text[1:]}: not a mapping")
            out.update(data)
        elif text.startswith("{"):
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError:
                data = None
            if not isinstance(data, dict):
                raise ProvisionError(f"extra vars {text!r}: not a valid JSON/YAML mapping")
            out.update(data)
        else:
            key = None
            for token in shlex.split(text):
                name, sep, value = token.partition("=")
                if sep and name.isidentifier():
                    key = name
                    out[key] = value
                elif key is not None:  # a value with spaces: KEY=/a/{{ host }}/b
                    out[key] += " " + token
                else:
                    raise ProvisionError(f"extra vars {token!r}: expected KEY=VALUE")
    for key in PATH_VARS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = str(Path(out[key]).expanduser().absolute())
    for key in PATH_LIST_VARS:
        items = out.get(key)
        if isinstance(items, str):
            items = [x for x in items.split(",") if x]
        if isinstance(items, list):
            out[key] = [str(Path(x).expanduser().absolute()) if isinstance(x, str) else x
                        for x in items]  # fmt: skip
    return out


class _Printer:
    """Streams ansible-runner events as one line per task result."""

    def __init__(self, out=sys.stdout):
        self.out = out
        self.problems: dict[str, str] = {}

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event", "")
        data = event.get("event_data") or {}
        host = data.get("host", "")
        task = data.get("task", "")
        if kind == "playbook_on_play_start":
            self._say(f"PLAY  {data.get('play', '')}")
        elif kind == "runner_on_ok":
            res = data.get("res") or {}
            word = "changed" if res.get("changed") else "ok"
            self._say(f"  {word:<11} {host:<12} {task}")
            if task.startswith("Report") and isinstance(res.get("msg"), str):
                self._say(f"  {'':<11} {host:<12}   {res['msg']}")
        elif kind == "runner_on_failed" and not data.get("ignore_errors"):
            msg = _reason(data.get("res") or {})
            self.problems.setdefault(host, f"task '{task}' failed: {msg}")
            self._say(f"  {'FAILED':<11} {host:<12} {task}: {msg}")
        elif kind == "runner_on_unreachable":
            msg = _reason(data.get("res") or {})
            self.problems.setdefault(host, f"unreachable: {msg}")
            self._say(f"  {'UNREACHABLE':<11} {host:<12} {msg}")
        return True

    def _say(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def _reason(res: dict[str, Any]) -> str:
    msg = res.get("msg") or res.get("stderr") or res.get("stdout") or "no message"
    if isinstance(msg, list):
        msg = " ".join(str(m) for m in msg)
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    stderr = (res.get("stderr") or "").strip().splitlines()
    text = lines[-1] if lines else "no message"
    if stderr and stderr[-1].strip() not in text and "non-zero return code" in text:
        text = f"{text}: {stderr[-1].strip()}"
    return text[:500]


def run_playbook(
    inventory: str,
    playbook: str = "site.yml",
    extra_vars: dict[str, Any] | None = None,
    limit: str | None = None,
    verbosity: int = 0,
    keep_artifacts: bool = False,
    out=sys.stdout,
) -> ProvisionResult:
    """Run ``playbook`` against ``inventory`` through ansible-runner; stream and summarise."""
    try:
        import ansible_runner  # lazy: ansible-runner (57 ms), playbook runs only
    except ImportError:
        raise ProvisionError(
            "ansible-runner is not installed (pip install 'delegation-testbed[provision]')"
        ) from None
    inv = check_inventory(inventory)
    book = resolve_playbook(playbook)
    private = Path(tempfile.mkdtemp(prefix="testbed-provision-"))
    bindir = str(Path(sys.executable).parent)
    envvars = {
        "PATH": bindir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        # controller-side tasks (the plan check) run this checkout, as the lab's nodes do
        "PYTHONPATH": testbed_env()["PYTHONPATH"],
        "ANSIBLE_ROLES_PATH": str(PLAYBOOKS_DIR / "roles"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_TIMEOUT": "10",
        "ANSIBLE_DEPRECATION_WARNINGS": "0",
        "ANSIBLE_LOCALHOST_WARNING": "0",
        "ANSIBLE_SSH_RETRIES": "1",
        "ANSIBLE_PIPELINING": "1",
    }
    printer = _Printer(out)
    print(f"provision: {book.name} on {inv}", file=out, flush=True)
    try:
        runner = ansible_runner.run(
            private_data_dir=str(private),
            project_dir=str(book.parent),
            playbook=book.name,
            inventory=str(inv),
            extravars=extra_vars or {},
            envvars=envvars,
            limit=limit,
            verbosity=verbosity,
            quiet=True,
            event_handler=printer,
            settings={"suppress_ansible_output": True},
        )
    except Exception as exc:
        shutil.rmtree(private, ignore_errors=True)
        raise ProvisionError(f"ansible-runner could not start: {exc}") from None
    stats = runner.stats or {}
    hosts: dict[str, dict[str, int]] = {}
    for key, name in _STAT_KEYS:
        for host, n in (stats.get(key) or {}).items():
            hosts.setdefault(host, {k: 0 for _, k in _STAT_KEYS})[name] = n
    result = ProvisionResult(runner.status, runner.rc, hosts, printer.problems, private)
    if not result.hosts and runner.rc != 0:
        result.problems.setdefault(
            "-", _first_error(runner) or f"ansible-playbook exited {runner.rc}"
        )
    if keep_artifacts or not result.ok:
        result.artifacts = private
    else:
        shutil.rmtree(private, ignore_errors=True)
        result.artifacts = None
    return result


def _first_error(runner: Any) -> str:
    try:
        text = runner.stdout.read()
    except Exception:
        return ""
    for line in text.splitlines():
        if "ERROR!" in line or "[ERROR]" in line:
            return line.split("ERROR", 1)[1].lstrip("!]: ").strip()
    return ""


def summary_lines(result: ProvisionResult) -> list[str]:
    lines = ["summary:"]
    for host in sorted(result.hosts):
        h = result.hosts[host]
        lines.append(
            f"  {host:<12} ok={h['ok']:<3} changed={h['changed']:<3} failed={h['failed']:<3} "
            f"unreachable={h['unreachable']:<3} skipped={h['skipped']}"
        )
    return lines


def main_provision(
    inventory: str,
    playbook: str = "site.yml",
    *,
    extra_vars: list[str] | None = None,
    limit: str | None = None,
    verbose: int = 0,
    keep_artifacts: bool = False,
    json_path: str | None = None,
) -> int:
    """``testbed provision``: run ``playbook``, print the per-host summary, fail on a problem.

    ``extra_vars`` are ``-e`` values (:func:`parse_extra_vars`); ``json_path``
    also gets the summary as JSON.
    """
    extra = parse_extra_vars(extra_vars or [])
    result = run_playbook(
        inventory, playbook, extra, limit=limit, verbosity=verbose,
        keep_artifacts=keep_artifacts,
    )  # fmt: skip
    for line in summary_lines(result):
        print(line)
    if json_path:
        Path(json_path).write_text(
            json.dumps(
                {
                    "status": result.status,
                    "rc": result.rc,
                    "hosts": result.hosts,
                    "problems": result.problems,
                },
                indent=2,
            )
            + "\n"  # fmt: skip
        )
    if result.artifacts is not None:
        print(f"ansible-runner artifacts: {result.artifacts}")
    if not result.hosts and not result.problems:
        raise ProvisionError(f"no host of {inventory} matched the plays of {playbook}")
    if result.problems:
        host, why = next(iter(sorted(result.problems.items())))
        more = len(result.problems) - 1
        where = "" if host == "-" else f"{host} "
        raise ProvisionError(f"{where}{why}" + (f" (and {more} more host(s))" if more else ""))
    if result.rc != 0:
        raise ProvisionError(f"ansible-playbook exited with status {result.rc}")
    return 0
