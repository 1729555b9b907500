"""The argument checks of :func:`~.apply.apply`: every argument, the model's layers, a plan's or a strategy
file's fit and the ``weights`` folder, checked before the model changes. Each failure is one line naming the
argument or file, what is allowed and what to do."""

from __future__ import annotations

import inspect
import os
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .._util import WarningLog, is_int
from ..checkpoints.finetuned import weights_folder
from ..kernels.backends import BACKENDS as _KERNEL_BACKENDS
from ..kernels.checks import check_flag as _check_bool
from ..methods import SLA, Method, registered_methods
from ..plans.sparse_plan import SparsePlan
from .context import TRANSFORMER_ATTRS, transformers_of
from .presets import check_pipeline
from .schedule import Schedule

__all__ = ["BACKENDS"]


BACKENDS = ("auto",) + _KERNEL_BACKENDS


def _check_int(name: str, value, minimum: int = 0) -> int:
    if not is_int(value) or value < minimum:
        raise (TypeError if not is_int(value) else ValueError)(
            f"{name}={value!r} is invalid: expected an int >= {minimum}")
    return int(value)


def _check_int_list(name: str, value) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.dim() <= 1 and not (value.is_floating_point() or value.is_complex()
                                                                     or value.dtype == torch.bool):
        value = value.tolist()  # (before: tensor([0, 1]) was "expected a list of non-negative ints")
    if is_int(value):
        value = [value]
    if isinstance(value, (str, bytes, dict)):  # (a str would be its characters, a dict its keys)
        raise TypeError(f"{name}={value!r} is invalid: expected a list of non-negative ints or None")
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name}={value!r} is invalid: expected a list of non-negative ints or None") from None
    if not all(is_int(i) and i >= 0 for i in items):
        raise ValueError(f"{name}={value!r} is invalid: expected a list of non-negative ints or None")
    return tuple(int(i) for i in items)


def _check_weights(weights, none: bool = True):
    """``weights``: a folder path (:func:`~dit_accel.checkpoints.finetuned.weights_folder`), or None where ``none``;
    returned as given, but with ``~`` expanded (before: ``weights="~/ft"`` was "not a folder")."""
    if weights is not None or not none:
        folder = weights_folder(weights)
        if os.fspath(weights).startswith("~"):
            return folder
    return weights


def _check_method(name: str, method) -> Method:
    if isinstance(method, type) and issubclass(method, Method):  # (before: "got type. Try dit_accel.Tile(...)")
        raise TypeError(f"{name}={method.__name__} is the method's class; pass a config made from it, "
                        f"dit_accel.{method.__name__}(...) (its defaults: dit_accel.{method.__name__}())")
    if not isinstance(method, Method):
        hint = f"dit_accel.method_from_name({method!r})" if isinstance(method, str) else "dit_accel.Tile(...)"
        if isinstance(method, (str, os.PathLike)) and os.fspath(method).lower().endswith(".json"):  # a plan's file
            hint = (f"dit_accel.SparsePlan.load({os.fspath(method)!r}) for a calibrated plan, or "
                    f"dit_accel.Tile.from_strategy({os.fspath(method)!r}) for a FastVideo STA strategy file")
        if isinstance(method, dict) and isinstance(method.get("method"), str):  # a record: summary()["config"]
            hint = (f"dit_accel.method_from_name(record.pop('method'), **record) to build the config this "
                    f"{method['method']!r} record describes")
        # the list comes from the registry, so a method added later is named too
        names = [f"{e.cls.__name__}(...)" for e in registered_methods().values()]
        raise TypeError(f"{name} must be a dit_accel method config (dit_accel.{', '.join(names[:-1])} or "
                        f"{names[-1]}); got {type(method).__name__}. Try {hint}")
    try:
        hash(method)  # configs key the plan caches at every new grid
    except TypeError:
        raise TypeError(f"{name}={method!r} is unhashable: a method config is a frozen dataclass "
                        "(@dataclasses.dataclass(frozen=True)) of hashable values (tuples, not lists)") from None
    return method


def _find_transformers(obj) -> Tuple[List[Tuple[str, nn.Module]], object]:
    """[(prefix, transformer)], pipeline (None for a bare transformer)."""
    if isinstance(obj, nn.Module):
        found, pipe = [("", obj)], None
    else:
        pipe = obj
        check_pipeline(obj)
        # one module under two names (transformer_2 = transformer, to share the weights) is wrapped once: twice
        # would nest the wrappers, and remove() could not take the inner ones away
        found = [("" if attr == "transformer" else f"{attr}.", module) for attr, module in transformers_of(obj)]
        if not found:
            empty = [attr for attr in TRANSFORMER_ATTRS if attr in getattr(obj, "__dict__", {}) and
                     getattr(obj, attr) is None]
            if empty:  # (before: "needs a Diffusers pipeline ... got WanPipeline", of a Diffusers pipeline)
                raise ValueError(f"apply() got a {type(obj).__name__} whose {' and '.join(empty)} "
                                 f"{'are' if len(empty) > 1 else 'is'} None (not loaded): load the transformer "
                                 f"into the pipeline first (pipe.{empty[0]} = ...), or pass the transformer module")
            raise TypeError(f"apply() needs a Diffusers pipeline with a `transformer` or a transformer module; "
                            f"got {type(obj).__name__}")
    # torch.compile's wrapper (pipe.transformer = torch.compile(pipe.transformer), called or not): dit_accel goes on
    # the module it compiles, and the wrapper stays where the user put it. Dynamo guards on the processors and
    # hooks the graph read, so a graph built before apply() is not run after it: the next call recompiles (and
    # after remove() the first graph runs again). Before: refused, "apply to transformer._orig_mod instead".
    # DistributedDataParallel (accelerate's prepare()) calls the module it wraps, so dit_accel goes on that one too
    # (before: "does not support transformer class DistributedDataParallel; supported: ..." of a Wan model).
    unwrapped: List[Tuple[str, nn.Module]] = []
    for prefix, module in found:
        inner = module
        while isinstance(inner, nn.Module):
            module = inner
            inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else \
                getattr(module, "_orig_mod", None)
        if isinstance(module, nn.DataParallel):  # (its replicas, one per GPU and call, share the hooks: unchecked)
            raise ValueError(f"apply() got a DataParallel around {type(module.module).__name__}: dit_accel does not "
                             "run under its per-call replicas. Apply it to the module (model.module) and run that on "
                             "one GPU, or use DistributedDataParallel (one process per GPU)")
        if not any(module is m for _, m in unwrapped):  # (transformer_2 = torch.compile(transformer): once)
            unwrapped.append((prefix, module))
    return unwrapped, pipe


def refuse_foreign_adapter(folder, transformers, handles) -> None:
    """ValueError when the weights ``folder`` holds a LoRA and a transformer an adapter of dit_accel's adapter name
    that none of ``handles`` (AccelHandles) loaded (the user's: ``load_lora_weights(..., adapter_name="dit_accel")``).
    Loading the folder replaced that adapter and ``remove()`` deleted it: the user's LoRA was gone without a word."""
    from pathlib import Path

    from ..checkpoints.finetuned import ADAPTER_NAME, LORA_FILE

    if not (Path(folder) / LORA_FILE).is_file():
        return
    ours = {id(t) for h in handles for t, names, _ in h._adapters if ADAPTER_NAME in names}
    for transformer in transformers:
        if ADAPTER_NAME in (getattr(transformer, "peft_config", None) or {}) and id(transformer) not in ours:
            raise ValueError(f"weights={str(folder)!r}: {type(transformer).__name__} already holds a LoRA adapter "
                             f"named {ADAPTER_NAME!r} that dit_accel did not load; loading the weights folder would "
                             "replace it and remove() would delete it. Load your LoRA under another adapter name "
                             f"(pipe.load_lora_weights(..., adapter_name='mine')) or delete it "
                             f"(pipe.delete_adapters({ADAPTER_NAME!r})), then apply again")


def _check_grid(grid) -> Tuple[int, ...]:
    """``handle.plan``'s token grid as a tuple of positive ints (a tuple, list, torch.Size or numpy array of them)."""
    items = tuple(grid) if isinstance(grid, (tuple, list)) or type(grid).__module__ == "numpy" else ()
    if not items or not all(is_int(g) and g >= 1 for g in items):
        raise ValueError(f"grid={grid!r} is invalid: expected the token grid, a tuple of positive ints such as "
                         "(T, H, W) for a video or (H, W) for an image")
    return tuple(int(g) for g in items)


def _saved_by_save_pretrained(method_file) -> bool:
    """Whether ``method_file`` is the method file of a weights folder that save_pretrained wrote while applied."""
    import json

    try:
        info = json.loads(method_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none, or unreadable: nothing of ours to replace
        return False
    return isinstance(info, dict) and info.get("saved_by") == "save_pretrained"


def _check_vendor_installed(backend: str) -> None:
    """A vendor backend (fa4, cudnn, natten) asked for by name whose package is not installed is refused here, not
    at the first attention call (minutes into a run, or ComfyUI's first sampling step). The device, dtype and
    layout it needs are judged per call: a model may still move to the GPU."""
    from ..kernels.backends import ENV_BACKEND, forced_backend
    from ..kernels.block_sparse.backends import NAMES, install_reason

    name = forced_backend(backend)  # (auto: the one $DIT_ACCEL_BACKEND forces, if any)
    why = install_reason(name) if name in NAMES else None
    if name == "triton":
        # Triton on no device of this machine (no usable GPU, no interpreter): refused here, not at the first
        # attention call after the model loaded and the prompt was encoded. A usable GPU leaves it to the call.
        from ..kernels.backends import triton_reason

        reasons = [triton_reason(device) for device in ("cuda", "cpu")]
        why = None if None in reasons else reasons[0 if torch.cuda.is_available() else 1]
    if why is not None:
        given = f"backend={backend!r}" if backend != "auto" else f"environment variable {ENV_BACKEND}={name!r}"
        raise ValueError(f"{given} cannot run in this environment: {why}")


def _check_apply_args(method, dense_steps, dense_last_steps, dense_layers, layer_methods, backend, capture_layers,
                      capture_steps, scheduler, weights, timing):
    method = _check_method("method", method)
    _check_weights(weights)
    _check_bool("timing", timing)
    dense_steps, dense_last_steps = _check_int("dense_steps", dense_steps), _check_int("dense_last_steps",
                                                                                       dense_last_steps)
    if dense_layers is not None and not is_int(dense_layers):
        dense_layers = _check_int_list("dense_layers", dense_layers)
    elif dense_layers is not None:
        dense_layers = _check_int("dense_layers", dense_layers)
    if layer_methods is not None and not isinstance(layer_methods, dict):
        raise TypeError(f"layer_methods must be a dict {{layer index: Method}}; got {type(layer_methods).__name__}")
    for i, m in (layer_methods or {}).items():
        if isinstance(m, SparsePlan) or isinstance(getattr(m, "sparse_plan", None), SparsePlan):
            # (as a layer's method its checks of the model, grid and steps would be skipped, and its layer numbers
            # would name other layers than the one it was given for)
            raise TypeError(f"layer_methods[{i!r}] is a SparsePlan: a plan is the schedule of every layer (its "
                            "phases name the layers and their methods); pass it as the method, "
                            "dit_accel.apply(pipe, plan), or give layer_methods a config such as dit_accel.Tile(...)")
    layer_methods = {_check_int("layer_methods key", i): _check_method(f"layer_methods[{i}]", m)
                     for i, m in (layer_methods or {}).items()}
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: choose one of {', '.join(BACKENDS)}")
    _check_vendor_installed(backend)
    if isinstance(scheduler, type):  # (before: "scheduler=type has no `timesteps`", naming no class)
        raise TypeError(f"scheduler={scheduler.__name__} is a class; pass the scheduler object that drives the "
                        "transformer's steps, e.g. scheduler=pipe.scheduler")
    if scheduler is not None and not hasattr(scheduler, "timesteps"):
        raise TypeError(f"scheduler={type(scheduler).__name__} has no `timesteps`; pass a Diffusers scheduler "
                        "object, e.g. scheduler=pipe.scheduler")
    return (method, dense_steps, dense_last_steps, dense_layers, layer_methods,
            _check_int_list("capture_layers", capture_layers), _check_int_list("capture_steps", capture_steps))


def _resolve_layers(schedule_args: dict, n_layers: int, capture_layers, warnings: WarningLog) -> Schedule:
    """The schedule with ``dense_layers`` as indices, every layer index checked against ``n_layers``."""
    dense_layers = schedule_args.pop("dense_layers")
    if is_int(dense_layers):
        dense_layers = frozenset(range(min(dense_layers, n_layers)))
    schedule = Schedule(dense_layers=frozenset(dense_layers or ()), **schedule_args)
    for name, indices in (("dense_layers", schedule.dense_layers), ("layer_methods", schedule.layer_methods),
                          ("capture_layers", capture_layers or ())):
        bad = sorted(i for i in indices if i >= n_layers)
        if bad:
            shown = ", ".join(map(str, bad[:6])) + (f", ... {bad[-1]} ({len(bad)} in all)" if len(bad) > 6 else "")
            raise ValueError(f"{name} has layer indices {shown} but the model has {n_layers} attention layers "
                             f"(0..{n_layers - 1})")
    # (before: the dense layer won without a word, and the method given for it never ran)
    clash = sorted(i for i, m in schedule.layer_methods.items() if i in schedule.dense_layers and m.name != "dense")
    if clash:
        shown = ", ".join(f"{i}: {schedule.layer_methods[i].name}" for i in clash[:6]) + (", ..." if len(clash) > 6
                                                                                          else "")
        raise ValueError(f"layer_methods gives layer{'s' * (len(clash) > 1)} {{{shown}}} a method, but dense_layers "
                         f"makes {'them' if len(clash) > 1 else 'it'} dense (dense_layers=N: layers 0..N-1), so that "
                         f"method would never run: drop layer{'s' * (len(clash) > 1)} {', '.join(map(str, clash))} "
                         "from dense_layers or from layer_methods")
    if n_layers and set(range(n_layers)) <= schedule.dense_layers and schedule.sparse:
        warnings.warn(f"dit_accel: dense_layers covers all {n_layers} attention layers: {schedule.method.name} "
                      "never runs and the model stays dense. Pass fewer layers (e.g. dense_layers=1)", stacklevel=5)
    return schedule


# Names Diffusers' attention modules give their query projection (fused q/k/v ones produce three times the
# inner dim) and their head count.
_QUERY_PROJECTIONS = (("to_q", 1), ("to_query", 1), ("q_proj", 1), ("query", 1), ("to_qkv", 3), ("qkv", 3))


_HEAD_COUNTS = ("heads", "num_heads", "num_attention_heads", "n_heads")


def _projection_dim(module: nn.Module) -> int:
    """The per-head dim D of SLA's ``Linear(D, D)``: the module's ``head_dim``, else its query projection's
    width over its head count (``to_q``, Kandinsky's ``to_query``, fused ``to_qkv`` / 3, ...). ValueError
    naming the class when neither can be read (apply leaves the model unchanged)."""
    head_dim = getattr(module, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    heads = next((getattr(module, n) for n in _HEAD_COUNTS if isinstance(getattr(module, n, None), int)), None)
    for name, parts in _QUERY_PROJECTIONS:
        proj = getattr(module, name, None)
        width = getattr(proj, "out_features", None)
        if isinstance(width, int) and heads and width % (parts * heads) == 0:
            return width // (parts * heads)
    raise ValueError(f"dit_accel: SLA cannot size its projection for {type(module).__name__}: the attention module "
                     "has no int head_dim and no query projection (to_q, to_query, q_proj, to_qkv) with a head "
                     "count (heads, num_heads) to read the per-head dim from. Use GNA, Tile or Radial on this "
                     "model, or register a preset whose attention modules expose head_dim")


def _check_weights_folder(folder, schedule: Schedule, layers) -> None:
    """What can be checked of a weights folder before the model is touched: the method file, the files it
    names, and the SLA projections' names and shapes against this model's layers (a truncated file fails
    here). :func:`dit_accel.checkpoints.finetuned.load_into` checks the rest; a failure there is undone too."""
    from pathlib import Path

    from ..checkpoints.finetuned import LORA_FILE, SLA_FILE, read_weights_info

    folder = Path(folder)
    info = read_weights_info(folder)
    if not isinstance(info, dict):
        raise ValueError(f"weights={str(folder)!r}: its dit_accel_method.json does not hold a JSON object")
    if (info.get("files") or {}).get("lora", LORA_FILE) is not None:
        path = folder / LORA_FILE
        if not path.is_file():
            raise ValueError(f"weights={str(folder)!r} is missing {LORA_FILE}.")
        from ..checkpoints.lora_checks import lora_module_name

        targets = {lora_module_name(key)[0] for key in _safetensors_keys(folder, path)}
        if targets and not any(t.startswith(name + ".") for t in targets for name, *_ in layers):
            # LoRA for modules other than these attention layers (another model, most likely): load_into
            # names the model it belongs to, before it loads anything
            return
    expected = {}
    for name, module, index in layers:  # (attention module name, module, its index in its transformer)
        if _runs_sla(schedule.layer_methods.get(index, schedule.method), index):
            d = _projection_dim(module)
            expected.update({f"{name}.weight": (d, d), f"{name}.bias": (d,)})
    saved = (info.get("method") or {}).get("method") if isinstance(info.get("method"), dict) else None
    # weights of another method (VSA's under SLA) or of a plan: say which to apply before asking for its files
    from ..checkpoints.finetuned import check_method_fits

    check_method_fits(folder, info["method"] if saved else {}, schedule.method)
    if saved == "sla" or expected:
        path = folder / SLA_FILE
        if not path.is_file():
            raise ValueError(f"weights={str(folder)!r} is missing {SLA_FILE} (the method is SLA).")
        shapes = _safetensors_keys(folder, path)
        if not expected:  # trained for SLA, applied with another method: load_into says so (method check)
            return
        missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        if shapes and not set(shapes) & set(expected):  # (dense_layers could not help: it names no layer here)
            raise ValueError(f"weights={str(folder)!r}: none of the {len(shapes)} tensors of {SLA_FILE} names an "
                             f"attention layer of this model (it holds e.g. {sorted(shapes)[0]}, the model's SLA "
                             f"layers are e.g. {sorted(expected)[0]}): it was trained on another model; load it into "
                             "that model, or fine-tune this one.")
        if missing or unexpected:
            raise ValueError(f"weights={str(folder)!r}: {SLA_FILE} does not match the model's SLA layers: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}; was it trained on a different model? It "
                             f"was trained with dense_layers={info.get('dense_layers')}; pass the same dense_layers "
                             "to apply().")
        for key, shape in expected.items():
            if tuple(shapes[key]) != shape:
                raise ValueError(f"weights={str(folder)!r}: {SLA_FILE} holds {key} of shape {tuple(shapes[key])}, "
                                 f"the model's layer needs {shape}")


def _safetensors_keys(folder, path) -> Dict[str, Tuple[int, ...]]:
    """``{key: shape}`` of a weights folder's safetensors file, from its header; ValueError naming the folder and
    the file when it is not a whole safetensors file (missing, empty, truncated, another format)."""
    from ..atomic_files import BadFileError, safetensors_shapes

    try:
        return safetensors_shapes(path, expected=f"a safetensors file of tensors ({path.name} as dit-accel "
                                                 "finetune writes it): write it again")
    except BadFileError as err:
        raise ValueError(f"weights={str(folder)!r}: {err}") from None


def _warn_unknown_strategy_layers(methods, n_layers: int, model: str, log: WarningLog) -> None:
    """A strategy file (TileStrategy) naming attention layers the model lacks (those entries never run), or leaving
    out layers it has (those run dense at every step; before, without a word): either usually means the file was
    made for another model. Said once, naming the file and the layers."""
    def listed(layers) -> str:
        return ", ".join(map(str, layers[:6])) + (", ..." if len(layers) > 6 else "")

    for method in methods:
        table = getattr(method, "_table", None)  # TileStrategy's {(step, layer): windows}, read from its file
        if not isinstance(table, dict) or not table:
            continue
        named = {layer for _, layer in table}
        missing, unnamed = sorted(x for x in named if x >= n_layers), sorted(set(range(n_layers)) - named)
        path = getattr(method, "path", "the strategy file")
        if missing:
            log.warn(f"dit_accel: {path} names attention layers {listed(missing)}, but {model} has {n_layers} "
                     f"(0..{n_layers - 1}): those entries never run. Was the file made for another model? Pass the "
                     "strategy of this one", stacklevel=5)
        if unnamed:
            log.warn(f"dit_accel: {path} names no window for attention layer(s) {listed(unnamed)} of {model}'s "
                     f"{n_layers} at any step: they run dense throughout. Was the file made for another model? Pass "
                     "the strategy of this one, or name them in it", stacklevel=5)


def _heads_of(module: nn.Module) -> Optional[int]:
    """The module's (query) head count: Diffusers' ``heads``, else ``num_heads`` and the like (Kandinsky 5/6, Krea 2,
    Ideogram 4), or None. Read by the checks of per-head settings and of a plan's ``num_heads``, which a model
    whose heads went unread would run unchecked."""
    heads = next((getattr(module, n) for n in _HEAD_COUNTS if is_int(getattr(module, n, None))), None)
    return int(heads) if heads is not None else None


def _plan_call_check(method: Method, allow_other_grid: bool, log: WarningLog):
    """What the pre-hook asks of each new call's grid and step count when ``method`` is a plan (else None)."""
    check = getattr(method, "check_call", None)
    if check is None:
        return None

    takes_step = "step" in inspect.signature(check).parameters  # (a registered method's check_call may not)

    def on_call(grid, total_steps, step=None) -> None:
        warning = check(grid, total_steps, allow_other_grid, **({"step": step} if takes_step else {}))
        if warning:
            log.warn(warning, key=("plan on another grid", tuple(grid)))

    return on_call


def _runs_sla(method: Method, layer: int) -> bool:
    """Whether ``method`` may run SLA on ``layer`` (plans and per-head configs say per layer)."""
    runs_sla = getattr(method, "runs_sla", None)
    return isinstance(method, SLA) or (runs_sla is not None and bool(runs_sla(layer)))


def inner_configs(method: Method):
    """``(config, which part runs it)`` for each config that ``method`` runs inside it: a plan's entries (defaults,
    layers, and their heads), a :class:`~dit_accel.plans.per_head.PerHead`'s heads; none for a plain config.
    apply() and ComfyUI's node check each against the model, not only the outer method."""
    plan = getattr(method, "sparse_plan", None)
    if isinstance(plan, SparsePlan):
        note = f"{f'plan {plan.source}' if plan.source else 'the plan'} runs it: calibrate a plan for this model"
        for entry in plan.methods():
            yield entry, note
            yield from ((head, note) for head in getattr(entry, "methods", ()))
    elif isinstance(getattr(method, "methods", None), tuple):  # PerHead
        yield from ((head, f"head {h} of the {type(method).__name__} config runs it")
                    for h, head in enumerate(method.methods))
