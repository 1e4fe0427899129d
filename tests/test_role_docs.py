"""Each role's README documents exactly the variables the role uses.

Pure file reading (no processes, no Ansible): for every role in
``playbooks/roles/`` the variables of ``defaults/main.yml`` (and ``vars/``) and
every variable with a project prefix (``common_``, ``delegate_``,
``experiment_``, ``kmod_``) that its tasks, handlers, templates or defaults
reference -- inside ``{{ }}``/``{% %}`` or in a bare conditional such as
``when:`` -- must appear in the ``## Role variables`` tables of
``playbooks/roles/<role>/README.md``; and every variable listed there must
exist in the role.  The README's subsections are checked too: "Set by the
role" lists only facts and registered results the role sets, "Read from other
roles" only variables this role does not define but another role (or a
playbook) does, and the default column repeats each plain default of
``defaults/main.yml``.  So the READMEs cannot drift from the roles.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
PLAYBOOKS = REPO / "playbooks"
ROLES_DIR = PLAYBOOKS / "roles"
ROLES = ("common", "delegate", "experiment", "kmod")

#: A variable with one of the project's role prefixes.
PREFIXED = re.compile(r"\b(?:common|delegate|experiment|kmod)_[a-z0-9_]+\b")
IDENT = re.compile(r"(?<![\w.])[A-Za-z_][A-Za-z0-9_]*\b")
JINJA = re.compile(r"{{(.*?)}}|{%(.*?)%}", re.S)
JINJA_COMMENT = re.compile(r"{#.*?#}", re.S)
STRING_LITERAL = re.compile(r"'[^']*'|\"[^\"]*\"")
#: Task and module keys whose value is a bare Jinja expression.
CONDITIONALS = {"when", "that", "changed_when", "failed_when", "until"}
SET_FACT = {"set_fact", "ansible.builtin.set_fact"}
#: Identifiers of Jinja itself (operators, tests, literals), never variables.
JINJA_WORDS = {"and", "or", "not", "in", "is", "if", "else", "true", "false", "none"}
#: Filters (``| name``), tests (``is [not] name``) and calls (``name(``): not variables.
NOT_VARIABLES = re.compile(r"\|\s*\w+|\bis\s+(?:not\s+)?\w+|\w+\s*\(")


def _inventory_groups() -> set[str]:
    """Group names the playbooks target (``hosts: compute_nodes:delegate_nodes``).

    ``groups['delegate_nodes']`` carries a role prefix but names a group, not a variable.
    """
    names = set()
    for book in PLAYBOOKS.glob("*.yml"):
        for play in yaml.safe_load(book.read_text()) or []:
            names.update(re.split(r"[:,&!]", str(play.get("hosts", ""))))
    return names - {""}


GROUPS = _inventory_groups()


class RoleScan:
    """What one role defines and references."""

    def __init__(self, role: str):
        self.role = role
        self.dir = ROLES_DIR / role
        self.defaults: dict = {}
        self.set_by_role: set[str] = set()  # set_fact keys, register names, task vars
        self.prefixed_used: set[str] = set()  # prefixed names in Jinja, literals included
        self.identifiers: set[str] = set()  # names in Jinja code, literals stripped
        for path in sorted((self.dir / "defaults").glob("*.yml")) + sorted(
            (self.dir / "vars").glob("*.yml")
        ):
            data = yaml.safe_load(path.read_text()) or {}
            self.defaults.update(data)
            self._walk(data)
        for sub in ("tasks", "handlers"):
            for path in sorted((self.dir / sub).glob("*.yml")):
                self._walk(yaml.safe_load(path.read_text()) or [])
        for path in sorted((self.dir / "templates").glob("*")):
            self._text(path.read_text())

    def _expression(self, expr: str) -> None:
        self.prefixed_used.update(set(PREFIXED.findall(expr)) - GROUPS)
        code = NOT_VARIABLES.sub(" ", STRING_LITERAL.sub(" ", expr))
        self.identifiers.update(w for w in IDENT.findall(code) if w.lower() not in JINJA_WORDS)

    def _text(self, text: str) -> None:
        for a, b in JINJA.findall(JINJA_COMMENT.sub("", text)):
            self._expression(a or b)

    def _walk(self, node, conditional: bool = False) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in SET_FACT and isinstance(value, dict):
                    self.set_by_role.update(k for k in value if k != "cacheable")
                elif key == "register" and isinstance(value, str):
                    self.set_by_role.add(value)
                elif key == "vars" and isinstance(value, dict):
                    self.set_by_role.update(value)
                self._walk(value, conditional=key in CONDITIONALS)
        elif isinstance(node, list):
            for item in node:
                self._walk(item, conditional)
        elif isinstance(node, str):
            if conditional and "{{" not in node:
                self._expression(node)
            else:
                self._text(node)

    @property
    def defined(self) -> set[str]:
        return set(self.defaults) | self.set_by_role


def _readme_tables(role: str) -> dict[str, dict[str, list[str]]]:
    """{subsection heading: {variable: row cells}} of README's "## Role variables"."""
    text = (ROLES_DIR / role / "README.md").read_text()
    m = re.search(r"^## Role variables\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"{role}/README.md has no '## Role variables' section"
    tables: dict[str, dict[str, list[str]]] = {}
    heading = ""
    for line in m.group(1).splitlines():
        if line.startswith("### "):
            heading = line[4:].strip()
            continue
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if set(cells[0]) <= set("-: ") or cells[0].lower() == "variable":
            continue  # separator or header row
        for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[0]):
            tables.setdefault(heading, {})[name] = cells
    return tables


def _documented(role: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for table in _readme_tables(role).values():
        rows.update(table)
    return rows


SCANS = {role: RoleScan(role) for role in ROLES}


def test_every_role_is_covered():
    roles = sorted(p.name for p in ROLES_DIR.iterdir() if (p / "tasks").is_dir())
    assert roles == sorted(ROLES), "a new role needs a README.md and an entry in ROLES"
    for role in ROLES:
        scan = SCANS[role]
        assert scan.defaults and scan.prefixed_used, f"{role}: nothing parsed"
        assert (ROLES_DIR / role / "README.md").is_file()


@pytest.mark.parametrize("role", ROLES)
def test_readme_lists_every_variable_the_role_uses(role):
    scan = SCANS[role]
    needed = set(scan.defaults) | scan.prefixed_used
    missing = needed - set(_documented(role))
    assert not missing, f"{role}/README.md does not document {sorted(missing)}"


@pytest.mark.parametrize("role", ROLES)
def test_readme_lists_nothing_the_role_lacks(role):
    scan = SCANS[role]
    known = scan.defined | scan.prefixed_used | scan.identifiers
    extra = set(_documented(role)) - known
    assert not extra, f"{role}/README.md documents {sorted(extra)}, which the role does not use"


@pytest.mark.parametrize("role", ROLES)
def test_readme_subsections_say_where_each_variable_comes_from(role):
    scan = SCANS[role]
    elsewhere = set().union(*(s.defined for r, s in SCANS.items() if r != role))
    for heading, rows in _readme_tables(role).items():
        names = set(rows)
        if "set by the role" in heading.lower():
            wrong = names - scan.set_by_role
            assert not wrong, f"{role}: {sorted(wrong)} listed under {heading!r} are not set there"
        elif "other roles" in heading.lower():
            own = names & scan.defined
            assert not own, f"{role}: {sorted(own)} under {heading!r} are the role's own"
            orphan = {n for n in names if PREFIXED.fullmatch(n)} - elsewhere
            assert not orphan, f"{role}: no other role defines {sorted(orphan)}"
        else:
            facts = (names & scan.set_by_role) - set(scan.defaults)
            assert not facts, f"{role}: {sorted(facts)} are set by the role, not inputs"


def _rendered(value) -> list[str]:
    """How a plain default value must appear in the README's default column."""
    if isinstance(value, bool):
        return [f"`{str(value).lower()}`"]
    if isinstance(value, int | float):
        return [f"`{value}`"]
    if value == "":
        return ['`""`']
    if isinstance(value, str):
        return [f"`{value}`"]
    if isinstance(value, list | dict) and not value:
        return ["`[]`" if isinstance(value, list) else "`{}`"]
    if isinstance(value, list):  # every item named
        return [str(item) for item in value]
    return []


@pytest.mark.parametrize("role", ROLES)
def test_readme_defaults_match_defaults_main(role):
    scan = SCANS[role]
    rows = _documented(role)
    for name, value in scan.defaults.items():
        if "{{" in str(value) or name not in rows:
            continue  # computed (explained in words), or missing (reported above)
        cell = rows[name][1] if len(rows[name]) > 1 else ""
        for expected in _rendered(value):
            if "{{" in expected:
                continue
            assert expected in cell, f"{role}: default of {name} is {value!r}, README says {cell!r}"


def test_provisioning_doc_links_the_role_readmes():
    text = (REPO / "docs" / "provisioning.md").read_text()
    for role in ROLES:
        assert f"../playbooks/roles/{role}/README.md" in text, role
