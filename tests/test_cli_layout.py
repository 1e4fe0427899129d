"""The command line is one package, ``testbed/cli``, and the only place that sees argparse.

Below it (``testbed.core``, ``compute``, ``delegate``, ``jobs``, ``cluster``
and ``analysis``) functions take typed keyword arguments, never a parsed
``argparse.Namespace``; ``benchmarks/`` are scripts with command lines of their
own and exempt.  Each verb module has ``add_parser(sub)``; every verb and
subverb answers ``--help``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.cli import VERBS, build_parser, main
from tests.conftest import run_testbed

REPO = Path(__file__).resolve().parent.parent
CLI = REPO / "testbed" / "cli"
#: Modules of testbed/cli that are not verb modules.
NOT_VERBS = {"__init__", "options"}


def _imports_argparse(path: Path) -> list[int]:
    """Lines of ``path`` that import argparse (``import argparse``, ``from argparse import``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(alias.name.split(".")[0] == "argparse" for alias in node.names):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").split(".")[0] == "argparse":
                lines.append(node.lineno)
        elif isinstance(node, ast.Call):  # importlib.import_module("argparse"), __import__
            args = node.args
            if args and isinstance(args[0], ast.Constant) and args[0].value == "argparse":
                lines.append(node.lineno)
    return lines


@pytest.mark.unit
def test_only_the_cli_imports_argparse():
    offenders = []
    for top in ("testbed", "analysis"):
        for path in sorted((REPO / top).rglob("*.py")):
            if CLI in path.parents:
                continue
            offenders += [f"{path.relative_to(REPO)}:{n}" for n in _imports_argparse(path)]
    assert not offenders, "argparse imported outside testbed/cli: " + ", ".join(offenders)


@pytest.mark.unit
def test_the_scan_finds_argparse(tmp_path):
    """The scan above is not vacuous: it sees each way of importing argparse."""
    for text in ("import argparse\n", "import os, argparse as ap\n",
                 "from argparse import Namespace\n", "def f():\n    import argparse\n",
                 "import importlib\nimportlib.import_module('argparse')\n"):  # fmt: skip
        path = tmp_path / "m.py"
        path.write_text(text)
        assert _imports_argparse(path), text
    path.write_text("import argparse_extra\nfrom .argparse import x\n")
    assert not _imports_argparse(path)


def _verb_modules() -> list[str]:
    return sorted(p.stem for p in CLI.glob("*.py") if p.stem not in NOT_VERBS)


@pytest.mark.unit
@pytest.mark.parametrize("name", _verb_modules())
def test_each_verb_module_adds_its_parser(name):
    module = importlib.import_module(f"testbed.cli.{name}")
    assert callable(getattr(module, "add_parser", None)), f"testbed/cli/{name}.py: no add_parser"
    assert name in VERBS.values(), f"testbed/cli/{name}.py is not assembled by build_parser"


@pytest.mark.unit
@pytest.mark.parametrize("verb", sorted(VERBS))
def test_a_verb_is_parsed_by_its_module_alone(verb):
    """``main`` builds the parser of the verb it runs only (start-up), with the same options."""

    def verbs(parser):
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return sub.choices

    alone, full = verbs(build_parser(verb)), verbs(build_parser())
    assert verb in alone and set(alone) <= set(full)
    assert alone[verb].format_help() == full[verb].format_help()


def _commands(parser: argparse.ArgumentParser, path=()):
    """``(path, parser)`` of the parser, its verbs and their subverbs."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = [path for path, _ in _commands(build_parser())]


@pytest.mark.unit
def test_every_verb_runs_a_cli_function():
    """Each verb's ``func`` is a function of a verb module (the CLI prints, not the layers below)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, verb in sub.choices.items():
        func = verb.get_default("func")
        assert func is not None and func.__module__.startswith("testbed.cli."), (name, func)


@pytest.mark.unit
@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "testbed")
def test_help_of_every_verb(path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(('testbed', *path))} ")
    parser = dict(_commands(build_parser()))[path]
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            assert action.help and len(action.help.split()) >= 2, (path, action.dest)


def test_help_through_the_entry_point():
    res = run_testbed("--help", text=True)
    assert res.returncode == 0 and res.stderr == ""
    for path in COMMANDS:
        if len(path) == 1:
            assert f"    {path[0]}" in res.stdout


def test_building_the_parser_imports_nothing_heavy():
    """``testbed --help`` stays fast: the jobs are imported by the verb that runs them."""
    code = (
        "import sys\n"
        "from testbed.cli import build_parser\n"
        "build_parser()\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    loaded = set(res.stdout.split())
    heavy = ("analysis", "zmq", "pandas", "matplotlib", "scipy", "yaml", "testbed.compute",
             "testbed.delegate", "testbed.cluster")  # fmt: skip
    found = sorted(m for m in loaded if m.split(".")[0] in heavy or m.startswith(heavy))
    assert not found, found
