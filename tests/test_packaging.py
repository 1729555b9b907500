"""What a fresh install holds: every package the code and the tests import is declared.

CI installs into a fresh virtual environment (``.ci/run``), so a missing declaration fails there too; this
test names the missing package and the file that imports it, and also runs where packages installed by hand
would hide the gap. An import inside ``try: ... except ImportError`` (or ``pytest.importorskip``) is
optional by construction and not counted.
"""

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"dit_accel", "tests"}


def _optional_spans(tree: ast.AST):
    """Line spans of ``try`` bodies whose handlers catch ImportError/ModuleNotFoundError/Exception."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Try):
            names = set()
            for handler in node.handlers:
                kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
                names |= {k.id for k in kinds if isinstance(k, ast.Name)}
                if handler.type is None:
                    names.add("BaseException")
            if names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}:
                spans.append((node.body[0].lineno, node.body[-1].end_lineno))
    return spans


def imported_modules(paths, root=ROOT):
    """``{top-level module: first file importing it}`` over ``paths``, optional imports left out."""
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        spans = _optional_spans(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            if any(a <= node.lineno <= b for a, b in spans):
                continue
            for name in names:
                found.setdefault(name.split(".")[0], path.relative_to(root))
    return {m: p for m, p in found.items() if m not in LOCAL and m not in sys.stdlib_module_names}


def _requirement_name(text: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", text.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _declared(extras):
    """Distribution names (normalised) declared in pyproject.toml: dependencies plus ``extras``."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_requirement_name(r) for r in project["dependencies"]}
    for extra in extras:
        names |= {_requirement_name(r) for r in project["optional-dependencies"][extra]}
    return names


def _closure(names):
    """The declared distributions and everything they require (as installed here)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in requires if "extra ==" not in r]
    return seen


def _missing(modules, declared):
    owners = metadata.packages_distributions()
    closure = _closure(declared)
    missing = {}
    for module, where in modules.items():
        dists = {d.lower().replace("_", "-") for d in owners.get(module, [module])}
        if not dists & closure:
            missing[module] = (sorted(dists), str(where))
    return missing


def test_the_package_imports_only_its_dependencies():
    modules = imported_modules(sorted((ROOT / "dit_accel").rglob("*.py")))
    assert not _missing(modules, _declared([])), "declare these in [project] dependencies"


def test_the_test_extra_holds_every_package_the_tests_import():
    modules = imported_modules(sorted((ROOT / "tests").rglob("*.py")))
    assert not _missing(modules, _declared(["test"])), 'declare these in the "test" extra'


def test_the_check_finds_an_undeclared_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nimport yaml\ntry:\n    import not_a_real_package\nexcept ImportError:\n    pass\n")
    modules = imported_modules([probe], root=tmp_path)
    assert set(modules) == {"yaml"}  # the standard library and the guarded import do not count
    assert set(_missing(modules, {"torch"})) == {"yaml"}  # torch does not bring pyyaml
    assert not _missing(modules, {"pyyaml"})


@pytest.mark.parametrize("script", [".ci/run"])
def test_ci_installs_into_a_fresh_virtual_environment(script):
    text = (ROOT / script).read_text()
    assert re.search(r"rm -rf \"?\$venv\"?", text) and "-m venv" in text
    assert 'pip install -c constraints-cpu.txt -e ".[test]"' in text and "python -m pytest -q" in text
    # lint before the tests, with ruff from the test extra (the fresh venv has nothing else)
    assert text.index("ruff check dit_accel") < text.index("python -m pytest -q") and "ruff" in _declared(["test"])
    venv = re.search(r"venv=(\S+)", text).group(1)
    assert f"/{venv}/" in (ROOT / ".gitignore").read_text().split()
