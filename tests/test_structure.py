"""The package's import graph has no cycles, lazy (function-level) imports included.

Every ``import``/``from ... import`` of a dit_accel module inside dit_accel counts, wherever it
stands: a cycle through a lazy import still ties the two modules together, and the renovation
removed them all (kernels, pipelines, training). ``from . import x`` counts as importing the
submodule ``x`` when ``x`` is one.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dit_accel"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                mod = node.module if node.level == 0 else ".".join(x for x in (base, node.module) if x)
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            for target in targets:
                while target and target not in modules:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                # A package's __init__ importing its own submodules is how packages expose them: not a cycle.
                if target and target != name and not (path.name == "__init__.py" and target.startswith(name + ".")):
                    edges[name].add(target)
    return edges


def _cycles(edges):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles():
    edges = _graph()
    assert len(edges) > 50 and sum(map(len, edges.values())) > 100  # the graph was read
    assert _cycles(edges) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_root_package_holds_a_handful_of_modules():
    loose = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__", "__main__", "_util", "atomic_files", "errors", "io", "methods", "videos"], loose


def test_moved_modules_import_under_their_old_names():
    """Plans and checkpoint readers moved into their packages; a user's old import path gives the same module."""
    import importlib

    import dit_accel

    for old, new in dit_accel._MOVED.items():
        moved = importlib.import_module(f"dit_accel.{new}")
        assert importlib.import_module(f"dit_accel.{old}") is moved
        assert getattr(dit_accel, old) is moved
        assert moved.__spec__.name == moved.__name__ == f"dit_accel.{new}"  # its own spec, not the alias's
    from dit_accel.plans import Plan
    from dit_accel.sparse_plan import SparsePlan
    from dit_accel.weights import load_method

    assert SparsePlan is dit_accel.SparsePlan and load_method is dit_accel.load_method
    assert Plan is importlib.import_module("dit_accel.plans.plan").Plan


def test_the_package_imports_moved_modules_by_their_new_names():
    """The old names are for users' code: inside the package, an import of one would hide the real dependency."""
    import dit_accel

    old = {f"dit_accel.{name}" for name in dit_accel._MOVED}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
                for _ in range(max(node.level - 1, 0)):
                    package = package.rpartition(".")[0]
                target = node.module if node.level == 0 else f"{package}.{node.module}"
                assert target not in old, f"{path.relative_to(PACKAGE.parent)}: imports {target}"


def test_every_relative_import_names_a_module_that_exists():
    """Lazy imports inside functions fail only when called: check that every relative import resolves."""
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    missing = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                target = ".".join(x for x in (package, node.module) if x)
                if target not in modules:
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {target}")
    assert not missing, missing


MAX_FUNCTION_LINES = 100


def _is_triton_kernel(node) -> bool:
    """``@triton.jit`` (or ``@jit``, ``@triton.jit(...)``, ``@triton.autotune(...)`` above one): a kernel."""
    def name(d):
        d = d.func if isinstance(d, ast.Call) else d
        return ast.unparse(d)
    return any(name(d) in ("triton.jit", "jit") for d in node.decorator_list)


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES):
    """``(file:line, name, lines)`` of every function (methods and nested ones included) of ``root``'s modules
    longer than ``limit`` lines, decorators aside and docstring included; Triton kernels excepted."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append((f"{path.relative_to(root.parent)}:{node.lineno}", node.name, lines))
    return found


def test_no_function_is_longer_than_100_lines():
    offenders = long_functions(PACKAGE)
    assert not offenders, "functions over 100 lines (split them at a seam): " + "; ".join(
        f"{where} {name} ({lines} lines)" for where, name, lines in offenders)


def test_the_length_check_finds_a_long_function_and_skips_a_kernel(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(100))
    (pkg / "m.py").write_text(f"import triton\n\n@triton.jit\ndef kernel():\n{body}\n\n\ndef long():\n{body}\n\n\n"
                              f"def short():\n    return 1\n")
    assert long_functions(pkg) == [("pkg/m.py:107", "long", 101)]


def test_no_file_is_longer_than_800_lines():
    """A file past 800 lines holds more than one thing: split it where a reader would look for the second."""
    offenders = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
                 if (n := len(p.read_text().splitlines())) > 800}
    assert not offenders, offenders


def test_every_file_compiles_without_a_warning():
    """An invalid escape sequence in a docstring (``Band`\\ s``) is a SyntaxWarning on Python 3.12+, printed to the
    user at the first import of the module (no cached bytecode: a fresh install, a read-only site-packages)."""
    import warnings

    root = PACKAGE.parent
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(root / "docs" / "scripts").glob("*.py"), *(root / "tests").rglob("*.py")]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compile(path.read_text(), str(path), "exec")
        found += [f"{path.relative_to(root)}:{w.lineno}: {w.message}" for w in caught]
    assert not found, found
