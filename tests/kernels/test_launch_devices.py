"""Every Triton launch in the package runs with its inputs' GPU current (``occupancy.on_inputs_device``).

Triton launches on the current device: a launcher handed tensors on ``cuda:1`` while ``cuda:0`` is current (a
pipeline placed over two GPUs) would launch on the wrong one. Read from the source: each function that launches a
Triton kernel (``kernel[grid](...)``) is wrapped, or every caller in the package reaches it only from wrapped
launchers. (SLA's classification launches and VSA's coarse ones were not; the wrapper itself is tested in
``test_aot_launch.py``.)"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2] / "dit_accel" / "kernels"


def _scan(sources):
    """``{(module, name): (node, wrapped, launches)}`` of the top-level host functions of ``{module: source}``."""
    found = {}
    for module, source in sources.items():
        for fn in ast.parse(source).body:
            if not isinstance(fn, ast.FunctionDef):
                continue
            decorators = [ast.unparse(d) for d in fn.decorator_list]
            if any("jit" in d for d in decorators):
                continue
            launches = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                           and ("kernel" in ast.unparse(n.func.value).lower() or "KERNELS" in ast.unparse(n.func.value))
                           for n in ast.walk(fn))
            found[(module, fn.name)] = (fn, any("on_inputs_device" in d for d in decorators), launches)
    return found


def _functions():
    """:func:`_scan` of the kernels package."""
    return _scan({str(path.relative_to(ROOT)): path.read_text() for path in sorted(ROOT.rglob("*.py"))})


def _callers(functions, module: str, name: str):
    """The functions that call ``name`` (a private one: in its own module only)."""
    out = []
    for key, (node, _, _) in functions.items():
        if key == (module, name) or (name.startswith("_") and key[0] != module):
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.Call):
                callee = getattr(n.func, "id", None) or getattr(n.func, "attr", None)
                if callee == name:
                    out.append(key)
                    break
    return out


def _reached_wrapped(functions, key, seen=()) -> bool:
    if functions[key][1]:
        return True
    callers = [c for c in _callers(functions, *key) if c not in seen]
    return bool(callers) and all(_reached_wrapped(functions, c, seen + (key,)) for c in callers)


def test_every_launch_runs_on_its_inputs_gpu():
    functions = _functions()
    sites = [key for key, (_, _, launches) in functions.items() if launches]
    assert len(sites) >= 14, sites  # (the scan finds the launchers: forward, backward, SLA, VSA, glue)
    assert [key for key in sites if not _reached_wrapped(functions, key)] == []


def test_the_scan_finds_an_unwrapped_launch():
    src = ("import triton\n@triton.jit\ndef _fwd_kernel(x):\n    pass\n\n"
           "def launch(x):\n    _fwd_kernel[(1,)](x)\n\n"
           "@occupancy.on_inputs_device\ndef wrapped(x):\n    inner(x)\n\n"
           "def inner(x):\n    KERNELS['k'][(1,)](x)\n")
    functions = _scan({"m.py": src})
    assert {key for key, (_, _, launches) in functions.items() if launches} == {("m.py", "launch"), ("m.py", "inner")}
    assert not _reached_wrapped(functions, ("m.py", "launch"))
    assert _reached_wrapped(functions, ("m.py", "inner"))
