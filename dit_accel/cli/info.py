"""``dit-accel info``: versions, device, kernel backends, supported models and methods.

Every section degrades to a one-line note when the module behind it is missing
or broken, so ``info`` is the command to run when something else fails.
``--model MODEL`` adds each method's published setting for that model (or
dit_accel's default where none is published), its density on the published
shape and its source.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from .. import _util
from .options import HelpFormatter

__all__ = ["register", "run", "collect_info", "model_settings", "plan_report"]

def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="versions, device, kernel backends, supported models and methods",
                              description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--device", default=None, help="device to check backends on (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="also list each method's published setting for this model, its density and source (a hub "
                        "id, a Diffusers folder, a tiny model, a transformer class or a family such as 'Wan 2.2')")
    p.add_argument("--clear", action="store_true",
                   help="forget this machine's stored autotune choices and kernel self-check verdicts (both are "
                        "measured again on next use) and exit")
    p.add_argument("--plan", default=None, metavar="FILE",
                   help="print only this SparsePlan (dit-accel calibrate's output): its one-line summary, provenance "
                        "and the method of every step range, layer and head")
    p.set_defaults(func=run, _parser=p)
    return p


def plan_report(path) -> dict:
    """What ``info --plan`` prints: the plan's summary line, content hash, profile and full table
    (ValueError, one line naming the file and the field, for a bad file)."""
    from ..plans.sparse_plan import SparsePlan

    plan = SparsePlan.load(path)
    return {"plan": str(path), "summary": plan.summary_line(), "content_sha256": plan.content_hash(),
            "profile": plan.profile(), "table": plan.table()}


def _run_plan(path, as_json: bool) -> int:
    try:
        report = plan_report(path)
    except ValueError as err:
        print(f"dit-accel info: --plan: {err}", file=sys.stderr)
        return 2
    if as_json:
        json.dump(report, sys.stdout, indent=2, default=str)
        print()
        return 0
    print(f"{report['plan']}:")
    for line in report["table"]:
        print(f"  {line}")
    return 0


def _safe(fn):
    try:
        return fn()
    except Exception as err:  # info must never crash: report the reason instead
        return f"unavailable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def _device_info(device):
    import torch

    cuda = torch.cuda.is_available()
    dev = device or ("cuda" if cuda else "cpu")
    out = {"selected": dev, "cuda_available": cuda, "cpu_threads": torch.get_num_threads()}
    from ..kernels.request import interpreting

    if interpreting():
        out["triton_mode"] = "interpreter (TRITON_INTERPRET=1: correct but slow, for tests on CPU)"
    if cuda:
        out["cuda_devices"] = [_gpu_line(i) for i in range(torch.cuda.device_count())]
        out["cuda_runtime"] = torch.version.cuda
    return out


def _gpu_line(index: int) -> str:
    """``"0: NVIDIA GeForce RTX 5090 (sm_120; Triton kernels: sm_89's configurations)"``: a GPU that is not a
    compiled target runs the configurations of the one whose shared memory it has (kernels.limits.config_target)."""
    import torch

    from ..kernels.limits import config_target

    major, minor = torch.cuda.get_device_capability(index)
    arch = major * 10 + minor
    target = config_target(arch)
    runs = "its own" if target == arch else f"sm_{target}'s"
    return f"{index}: {torch.cuda.get_device_name(index)} (sm_{major}{minor}; Triton kernels: {runs} configurations)"


def _backends(device):
    from ..kernels import available_backends  # noqa: F401  (raises here when the kernels cannot load)
    from ..kernels.backends import ENV_BACKEND, backend_reasons, env_backend

    # The in-repo backends (available_backends) and the vendor ones (fa4, cudnn, natten: optional packages).
    out = {name: ("usable" if why is None else f"not usable: {why}") for name, why in backend_reasons(device).items()}
    try:  # (first: a value that is no backend fails every call that would read it)
        forced = env_backend()
    except ValueError as exc:
        return {ENV_BACKEND: str(exc), **out}
    return {ENV_BACKEND: f"{forced}: calls that ask for auto run it"} | out if forced else out


def _models():
    from ..pipelines.presets import PRESETS

    return {name: f"refused: {p.refused}" if p.refused else f"{p.notes} (diffusers>={p.min_diffusers})"
            for name, p in PRESETS.items()}


def _methods():
    from ..methods import registered_methods

    return {name: entry.summary + ("" if entry.finetunable or name == "dense" else " (not fine-tunable)")
            for name, entry in registered_methods().items()}


def _tiny():
    from ..models.tiny import EMBEDDED_MODELS

    return dict(EMBEDDED_MODELS)


def _densities(method, grid):
    """``(visited block fraction, token-pair fraction or None)`` of ``method`` on ``grid`` (SLA: its
    critical-block fraction, and no token density: it picks blocks per input)."""
    from ..kernels import sla_density

    plan = method.plan(grid)
    if plan.density is None and hasattr(plan, "params"):
        return sla_density(math.prod(grid), plan.params), None
    return plan.density, plan.token_density


#: Who runs an embedded model's own method defaults (finetune builds the method from its flags alone).
_USED_BY = "generate and eval use it; finetune takes the method's own defaults"


def _runs_as(method, grid):
    """The fields a ``fit=True`` setting runs with on ``grid`` where they differ from the setting's own (Tile: the
    tile and window :func:`~dit_accel.patterns.tile.fit_tile` picks; GNA: a kernel clamped to the grid), else None.
    The density printed is that layout's: beside the setting alone it read as the setting's (Wan 2.2's Tile(6, 8, 8)
    on 20 frames printed the density of the (5, 8, 8) tile that runs)."""
    if not getattr(method, "fit", False):
        return None
    given = method.ran_dict()
    if method.name == "tile":  # (the choice Tile.plan makes, read from it: no second copy of its rule)
        fitted = method.fitted(grid)
        return None if fitted is None else {"tile": fitted[0], "window": fitted[1]}
    from ..pipelines.handle import _as_ran

    return {k: v for k, v in _as_ran(method, grid).items() if given.get(k) != v} or None


def _setting(method, apply_kwargs, grid, where: str, source: str) -> dict:
    out = {"config": method.to_dict(), "apply": apply_kwargs, "source": source}
    if grid is not None:
        density, token_density = _densities(method, grid)
        out.update(grid=list(grid), shape=where, density=round(density, 4))
        if token_density is not None:
            out["token_density"] = round(token_density, 4)
        runs_as = _runs_as(method, grid)
        if runs_as:
            out["runs_as"] = runs_as
    return out


def model_settings(model: str) -> dict:
    """Per registered method, the published settings for ``model`` (or dit_accel's preset default), each with
    its config, ``apply`` kwargs, density on the published grid and source."""
    from ..methods import registered_methods
    from ..pipelines.presets import PRESETS, published_settings, recommended
    from ..models.loading import index_error
    from ..pipelines.presets import model_family

    problem = index_error(model)  # ("Wan 2.3", a version of no family, is model_family's to refuse)
    if problem:  # (before: a folder without a transformer "has no dit_accel preset")
        raise ValueError(problem)
    class_name, family = model_family(model)
    preset = PRESETS[class_name]
    known = published_settings(class_name, family=family)
    grid, where = (known[0].grid, known[0].shape) if known else (None, None)
    methods = {}
    for name in registered_methods():
        found = published_settings(class_name, name, family)
        if found:
            methods[name] = [_setting(*p.build(), p.grid, p.shape, p.source) for p in found]
        elif name in preset.defaults:
            source = "dit_accel preset default (no published setting for this model)"
            methods[name] = [_setting(*recommended(class_name, name, family), grid, where, source)]
        elif name != "dense" and not preset.refused:  # (what generate runs: VSA on Wan was missing from the list)
            source = "the method's own defaults (no published setting or dit_accel preset default for this model)"
            try:
                methods[name] = [_setting(*recommended(class_name, name, family), grid, where, source)]
            except (TypeError, ValueError):  # (refused for the class, no default that runs: tile_strategy's file)
                continue
    from ..methods import method_from_name
    from ..models.tiny import TINY_METHOD_DEFAULTS
    from ..models.tiny_shapes import shapes_model

    shapes = shapes_model(model)
    # What generate and eval run on an embedded model, first: options sized to its grid, and a shapes model's
    # schedule (its dense warm-up steps). A random-weight tiny model's token grid needs the model built: no density.
    own = shapes.methods if shapes is not None else TINY_METHOD_DEFAULTS.get(model, {}) if isinstance(model, str) \
        else {}
    for name, options in reversed(list(own.items())):
        if shapes is not None:
            entry = _setting(method_from_name(name, **options), dict(shapes.schedule), shapes.grid,
                             f"{shapes.size()}, its size", f"dit_accel default for {model} ({_USED_BY})")
        else:
            entry = _setting(method_from_name(name, **options), {}, None, None,
                             f"dit_accel default for {model} at its default size ({_USED_BY})")
        methods[name] = [entry] + methods.get(name, [])
    methods = {name: methods[name] for name in [*own, *methods] if name in methods}
    out = {"model": model, "transformer": class_name, "family": family, "methods": methods}
    if preset.refused:  # (no settings: say why rather than print an empty table)
        out["refused"] = preset.refused
    return out


def collect_info(device=None) -> dict:
    """The ``info`` report as a dict (also used by the JSON sidecar of ``generate``)."""
    versions = {name: value or "not installed" for name, value in _util.versions().items()}
    info = {"versions": versions, "device": _safe(lambda: _device_info(device))}
    dev = device or (info["device"]["selected"] if isinstance(info["device"], dict) else "cpu")
    info["backends"] = _safe(lambda: _backends(dev))
    info["supported_models"] = _safe(_models)
    info["methods"] = _safe(_methods)
    info["tiny_models"] = _safe(_tiny)
    info["autotune"] = _safe(_autotune)
    info["selfcheck"] = _safe(_selfcheck)
    info["kernel_status"] = _safe(_kernel_status)
    return info


def _kernel_status() -> dict:
    """What the Triton kernels do with fp32 inputs, under torch.compile and in CUDA graphs, and which triton."""
    from ..kernels import _selfchecks
    from ..kernels.backends import TRITON_CHECKED, TRITON_FLOOR, triton_version, triton_version_reason
    from ..kernels.block_sparse.configs import LENGTHS_OFF_REASON, WS_OFF_REASON, lengths_enabled, ws_enabled

    floor = ".".join(map(str, TRITON_FLOOR))
    return {
        "triton": (f"{triton_version() or 'not installed'}: " + (triton_version_reason() or
                   f"ok (runs from {floor}; compile-time checks pinned to {TRITON_CHECKED})")),
        "fp32": _selfchecks.fp32_bounds_text(),
        "warp-specialized forward": _opt_in(ws_enabled, "on (DIT_ACCEL_WS=1), behind its self-check", WS_OFF_REASON),
        "length tiles": _opt_in(lengths_enabled, "on (DIT_ACCEL_LENGTHS=1), behind their self-check",
                                LENGTHS_OFF_REASON),
        "raster-order forward": _gather_status(),
        "SLA backward glue": _glue_status(),
        "torch.compile": ("a traced call reuses the backend an eager call of the same shape chose (autotuned, or "
                          "dense where measured faster); with no eager call first it runs the Triton kernel, "
                          "timing nothing"),
        "CUDA graphs": ("a captured call times nothing and runs no first-use check; CUDA layouts are static "
                        "graph inputs, and a tile plan first built inside a capture takes no host sync"),
    }


def _gather_status() -> str:
    """Whether Tile, GNA and VSA calls may let the kernels read raster order (block_sparse/gather.py,
    kernels/vsa/raster.py)."""
    from ..kernels.block_sparse.gather import ENV_GATHER, gather_forced

    return _switch_status(ENV_GATHER, gather_forced, "wherever the Triton forward runs, behind its self-check",
                          "Tile, GNA and VSA calls on a GPU (training ones in their backward too) "
                          "read q, k, v in raster order in the kernels instead of gathering them, where the "
                          "self-checks passed and it timed faster per shape class; a gated VSA call's gated term "
                          "is added by the fine launch (inference) and takes its backward in one launch, and the "
                          "cube means' gradients are added by the backward kernels (training; none yet run on a "
                          "GPU)")


def _glue_status() -> str:
    """Whether SLA's backward runs its glue in the Triton kernels of kernels/sla/glue.py."""
    try:
        from ..kernels.sla.glue import ENV_GLUE, glue_forced
    except ImportError:
        return "needs triton"
    return _switch_status(ENV_GLUE, glue_forced, "wherever the fused SLA backward runs, behind its self-check",
                          "a fused SLA backward with a projection on a GPU makes phi, the global sums' gradients and "
                          "phi's backward in four Triton kernels instead of PyTorch operators, where their self-check "
                          "passed (not yet run on a GPU)")


def _opt_in(read, on: str, off: str) -> str:
    """An ``info`` line for an opt-in switch (``read()``: whether it is on; its ValueError on a bad value)."""
    try:
        return on if read() else off
    except ValueError as exc:
        return str(exc)


def _switch_status(env: str, read, forced_on: str, default: str) -> str:
    """An ``info`` line for a three-way switch (``read()``: True, False or None from ``$env``)."""
    try:
        forced = read()
    except ValueError as exc:
        return str(exc)
    if forced is not None:
        return f"{'on' if forced else 'off'} ({env}={int(forced)})" + (f", {forced_on}" if forced else "")
    return f"{default}; {env}=0 turns it off"


def _selfcheck() -> dict:
    """The stored first-use self-check verdicts (:mod:`dit_accel.kernels.selfcheck`)."""
    from ..kernels import selfcheck

    out = {"cache": str(selfcheck.cache_path())}
    for row in selfcheck.cached_verdicts():
        name, arch, dtype, dims = row["key"].split("|")[:4]
        error = "no finite output" if row.get("error") is None else f"error {row['error']:.2e}"
        out[f"{name} {dtype} {dims} on {arch}"] = f"{'pass' if row['ok'] else 'FAIL'} ({error}, {row.get('date', '')})"
    if len(out) == 1:
        out["verdicts"] = "none yet (each kernel variant is checked on first use; `dit-accel selftest` checks all)"
    return out


def _autotune() -> dict:
    """The stored runtime choices of ``backend="auto"`` on CUDA (:mod:`dit_accel.kernels.autotune`)."""
    from ..kernels import autotune

    state = autotune.info()
    out = {"enabled": "yes (DIT_ACCEL_AUTOTUNE=0 turns it off)" if state["enabled"] else "no (DIT_ACCEL_AUTOTUNE=0)",
           "cache": state["cache"]}
    out.update(state["choices"] or {"stored choices": "none yet (the first CUDA call of a shape class times them)"})
    return out


def _print_section(title: str, body) -> None:
    print(f"{title}:")
    if isinstance(body, dict):
        width = max((len(str(k)) for k in body), default=0)
        for key, value in body.items():
            if isinstance(value, list):
                value = "; ".join(map(str, value))
            print(f"  {str(key):<{width}}  {value}")
    else:
        print(f"  {body}")


def _lone_flag_error(args):
    """Why ``--clear`` or ``--plan`` cannot take the other flags given (None when they can): each does one thing and
    exits, so a ``--model`` (or ``--plan``, ``--device``) beside it was dropped without a word (``--plan p.json
    --model m`` read as if the plan had been checked against ``m``)."""
    for flag, does in (("clear", "forgets the stored choices and verdicts, and exits"),
                       ("plan", "prints that plan alone")):
        if not getattr(args, flag, None):
            continue
        others = [f"--{name}" for name in ("model", "plan", "device")
                  if name != flag and getattr(args, name, None) is not None]
        if others:
            return (f"{' and '.join(others)} {'does' if len(others) == 1 else 'do'} not apply to --{flag} (it {does}): "
                    f"drop {'it' if len(others) == 1 else 'them'}, or run `dit-accel info` for them apart")
    return None


def run(args) -> int:
    from .checks import device_error

    device = getattr(args, "device", None)
    error = None if device is None else device_error(device)
    if error is not None:
        print(f"dit-accel info: {error}", file=sys.stderr)
        return 2
    problem = _lone_flag_error(args)
    if problem:
        print(f"dit-accel info: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "clear", False):
        from ..kernels import autotune, selfcheck

        autotune.clear()
        selfcheck.clear()
        if getattr(args, "json", False):  # a script reading --json gets JSON, not a sentence
            print(json.dumps({"cleared": {"autotune": str(autotune.cache_path()),
                                          "selfcheck": str(selfcheck.cache_path())}}))
            return 0
        print(f"dit-accel info: cleared the autotune choices ({autotune.cache_path()}) and the kernel self-check "
              f"verdicts ({selfcheck.cache_path()}); both are measured again on next use.")
        return 0
    if getattr(args, "plan", None) is not None:
        return _run_plan(args.plan, getattr(args, "json", False))
    info = collect_info(device)
    model = getattr(args, "model", None)
    if model is not None:
        try:
            info["model_settings"] = model_settings(model)
        except ValueError as err:
            print(f"dit-accel info: --model {model}: {err}", file=sys.stderr)
            return 2
    if getattr(args, "json", False):
        json.dump(info, sys.stdout, indent=2, default=str)
        print()
        return 0
    _print_section("versions", info["versions"])
    _print_section("device", info["device"])
    _print_section("kernel backends (auto: triton on CUDA, else torch; force with --backend or DIT_ACCEL_BACKEND)",
                   info["backends"])
    _print_section("supported transformer classes", info["supported_models"])
    _print_section("methods", info["methods"])
    from ..models.tiny_shapes import SHAPES_MODELS

    _print_section(f"embedded models ({', '.join(SHAPES_MODELS)}: tiny models trained on synthetic clips; the "
                   "other tiny-* models: RANDOM WEIGHTS, for smoke runs only)", info["tiny_models"])
    _print_section("kernel autotuning (CUDA, backend auto: Triton vs FlexAttention, timed once per shape class; "
                   "`dit-accel info --clear` forgets)", info["autotune"])
    _print_section("kernel self-check verdicts (first use; `dit-accel selftest` runs all)", info["selfcheck"])
    _print_section("kernel status (triton release, fp32, warp specialization, torch.compile, CUDA graphs)",
                   info["kernel_status"])
    if model is not None:
        _print_settings(info["model_settings"])
    return 0


def _print_settings(settings: dict) -> None:
    family = settings["family"] or settings["transformer"]
    if settings.get("refused"):
        print(f"settings for {settings['model']} ({family}): none, dit_accel refuses this class: {settings['refused']}")
        return
    print(f"settings for {settings['model']} ({family}; published by the methods' authors unless marked):")
    for name, entries in settings["methods"].items():
        for entry in entries:
            config = ", ".join(f"{k}={v}" for k, v in entry["config"].items() if k != "method")
            apply = ", ".join(f"{k}={v}" for k, v in entry["apply"].items())
            print(f"  {name}: {config}" + (f"; apply: {apply}" if apply else ""))
            if "density" in entry:
                grid = "x".join(map(str, entry["grid"]))
                tokens = (f", token density {entry['token_density']:.4f}" if entry.get("token_density") is not None
                          else "")
                print(f"      density {entry['density']:.4f} (visited blocks){tokens} on grid {grid} ({entry['shape']})")
            if entry.get("runs_as"):
                ran = ", ".join(f"{k}={v}" for k, v in entry["runs_as"].items())
                print(f"      runs there as {ran} (fit=True: fitted to the grid; the density is of that layout)")
            print(f"      source: {entry['source']}")
