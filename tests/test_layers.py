"""The layers of docs/architecture.md are checked, not described.

* import-linter (``[tool.importlinter]`` in pyproject.toml): arrows point down,
  ``analysis`` reads formats from ``testbed.core`` only, and no two sibling
  modules import each other (function-level imports count);
* a function-level import is there for a reason written beside it (a heavy
  or optional dependency kept off the start-up path), never to dodge a cycle;
* the module map of docs/architecture.md names every module, and only those.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("testbed", "analysis")


@pytest.mark.integration
def test_import_contracts_are_kept():
    import shutil
    import subprocess

    exe = shutil.which("lint-imports")
    assert exe, "lint-imports (import-linter) is not installed: bash .ci/setup"
    res = subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout and "3 kept" in res.stdout, res.stdout


def _function_level_imports():
    for root in PACKAGES:
        for path in sorted((REPO / root).rglob("*.py")):
            lines = path.read_text().splitlines()
            for fn in ast.walk(ast.parse("\n".join(lines))):
                if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import | ast.ImportFrom):
                        text = lines[node.lineno - 1 : node.end_lineno]
                        yield path.relative_to(REPO), node.lineno, text


@pytest.mark.unit
def test_every_function_level_import_says_why():
    """A trailing ``# lazy: <reason>`` on every import inside a function."""
    bare = [
        f"{p}:{n}: {' '.join(t.strip() for t in text)}"
        for p, n, text in _function_level_imports()
        if not any(re.search(r"#\s*lazy:\s*\S", t) for t in text)
    ]
    assert not bare, "function-level imports without '# lazy: <reason>':\n" + "\n".join(bare)


def _module_map() -> dict[str, set[str]]:
    """``package/ -> module stems`` from the fenced block under '## Module map'."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc.split("## Module map", 1)[1]
    block = section.split("```", 2)[1]
    out: dict[str, set[str]] = {}
    for line in block.splitlines():
        m = re.match(r"^((?:testbed|analysis)(?:/\w+)*/)\s+(.*)$", line.strip())
        if m:
            names = m.group(2).split("—", 1)[0].split()
            out[m.group(1)] = set(names)
    return out


def _actual_modules() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for root in PACKAGES:
        for path in (REPO / root).rglob("*.py"):
            rel = path.parent.relative_to(REPO).as_posix() + "/"
            if "/data/" in f"/{rel}" or path.stem in ("__init__", "__main__"):
                out.setdefault(rel, set())
                continue
            out.setdefault(rel, set()).add(path.stem)
    return out


@pytest.mark.unit
def test_architecture_doc_names_every_module():
    documented, actual = _module_map(), _actual_modules()
    actual = {k: v for k, v in actual.items() if "/data/" not in f"/{k}"}
    assert set(documented) == set(actual), (
        f"packages missing from the map: {sorted(set(actual) - set(documented))}; "
        f"in the map but not in the tree: {sorted(set(documented) - set(actual))}"
    )
    for pkg, mods in actual.items():
        assert documented[pkg] == mods, (
            f"{pkg}: missing from the map {sorted(mods - documented[pkg])}, "
            f"not in the tree {sorted(documented[pkg] - mods)}"
        )
