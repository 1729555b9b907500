"""VSA's checkpoint gates on an applied model: found, loaded, run per layer call, removed with the handle.

:func:`attach_gates` is what :func:`dit_accel.apply` calls once its hooks are installed. Where a layer
may run :class:`dit_accel.VSA`, it reads the ``to_gate_compress`` weights (:mod:`dit_accel.checkpoints.vsa_gates`)
from ``weights=`` or the folder each transformer was loaded from, and puts a forward pre-hook on each
attention module the checkpoint has a gate for: the hook makes ``gate = to_gate_compress(hidden_states)``
(the module's input, computed only if the VSA plan asks) the layer's pending gate for the duration of the
module's forward (:func:`dit_accel.plans.vsa.push_gate`). The projections are dit_accel's, not submodules
of the model, like SLA's: ``state_dict()`` sees the model unchanged, and ``save_pretrained`` while the handle is
active writes them beside the saved weights (:data:`~dit_accel.checkpoints.vsa_gates.GATES_FILE`), weights and gates in one
commit (:func:`~dit_accel.checkpoints.vsa_gates.save_with_gates`), so the saved folder runs the same gates when VSA is
applied to it again. Gates that are not finite, that match no block VSA runs, or that were saved with other
weights than the folder holds are refused; gates for blocks the model lacks are named in a warning.

Where no layer runs VSA and the transformer's checkpoint holds gates, it warns that they are unused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.vsa_gates import gate_keys, loaded_from, read_gates, transformer_folder
from ..methods import VSA
from ..plans.vsa import pop_gate, push_gate

__all__ = ["VSAGates", "attach_gates", "gates_folder", "trained_gates", "runs_vsa", "add_trainable_gates",
           "gate_state_dict"]

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def _has_vsa(method, layer: Optional[int] = None) -> bool:
    """Whether ``method`` may run VSA (on ``layer``, when given): a VSA config, a :class:`~dit_accel.PerHead` with a
    VSA head, or a plan (``SparsePlan.as_method()``) with such an entry in some phase (its VSA layers run the
    checkpoint's gates as apply(VSA) does, not without them)."""
    plan = getattr(method, "sparse_plan", None)
    if plan is not None:
        return any(_has_vsa(m) for m in (plan.methods() if layer is None else [p.method(layer) for p in plan.phases]))
    return isinstance(method, VSA) or any(isinstance(h, VSA) for h in getattr(method, "methods", ()))


def runs_vsa(schedule) -> bool:
    """Whether any layer of ``schedule`` may run VSA (on some heads, for a :class:`~dit_accel.PerHead`)."""
    return any(_has_vsa(m) for m in (schedule.method, *schedule.layer_methods.values()))


def gates_folder(method, layer_methods, weights) -> bool:
    """Whether ``weights=`` names a checkpoint folder whose VSA gates this module loads (rather than a
    dit_accel weights folder, which :func:`dit_accel.checkpoints.finetuned.load_into` loads): a VSA run, and a folder with
    gate tensors and no ``dit_accel_method.json``."""
    from ..checkpoints.finetuned import METHOD_FILE, RUN_FILE, _run_of_checkpoint

    if weights is None or not any(_has_vsa(m) for m in (method, *(layer_methods or {}).values())):
        return False
    folder = Path(weights)
    if (folder / METHOD_FILE).is_file():
        return False
    if not folder.is_dir():
        raise ValueError(f"weights={str(weights)!r} is not a folder; for VSA pass the transformer folder of a "
                         "sparse-distilled checkpoint (e.g. FastWan2.1-T2V-1.3B-Diffusers/transformer)")
    for candidate in (folder, folder / "transformer"):
        if candidate.is_dir() and gate_keys(candidate):
            return True
    if (folder / RUN_FILE).is_file() or _run_of_checkpoint(folder) is not None:
        return False  # an unfinished run or one of its checkpoints: load_into says which (before: "pass the
        # checkpoint's transformer folder", for the folder of a `finetune --method vsa` run)
    raise ValueError(f"weights={str(weights)!r} holds neither to_gate_compress gates (blocks.N.to_gate_compress."
                     "weight, in its *.safetensors or diffusion_pytorch_model*.bin or its transformer/ subfolder) "
                     "nor a dit-accel finetune output (dit_accel_method.json); pass the checkpoint's transformer "
                     "folder")


def trained_gates(method, layer_methods, weights):
    """``weights`` when it is a ``dit-accel finetune --method vsa`` output (``dit_accel_method.json`` naming a
    ``vsa_gates`` file) and a layer runs VSA: its gates load here, its LoRA through
    :func:`dit_accel.checkpoints.finetuned.load_into`. Else None."""
    from ..checkpoints.finetuned import METHOD_FILE, VSA_FILE

    if weights is None or not any(_has_vsa(m) for m in (method, *(layer_methods or {}).values())):
        return None
    folder = Path(weights)
    return weights if (folder / METHOD_FILE).is_file() and (folder / VSA_FILE).is_file() else None


class _TrainableGate(nn.Module):
    """A layer's ``to_gate_compress`` being trained: an fp32 Linear (model dim -> heads x head dim), applied in
    the input's dtype (autocast picks its own)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        nn.init.zeros_(self.proj.weight)  # zero gate: step 0 is training-free VSA (the fine branch alone)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(hidden_states.device.type):
            return self.proj(hidden_states)
        return F.linear(hidden_states, self.proj.weight.to(hidden_states.dtype),
                        self.proj.bias.to(hidden_states.dtype))


def add_trainable_gates(handle) -> Dict[str, nn.Module]:
    """Zero-initialised trainable gates on every layer of ``handle`` that may run VSA, installed like checkpoint
    gates (:class:`VSAGates`; ``remove()`` drops them). Returns ``{attention module name: gate module}``, the
    gate's parameters ``proj.weight`` and ``proj.bias`` (see :func:`gate_state_dict`)."""
    gates = getattr(handle, "_gates", None)
    if gates is None:
        raise ValueError("dit_accel: no layer of this handle runs VSA; trainable gates need dit_accel.VSA")
    made: Dict[str, nn.Module] = {}
    for hook in handle._hooks:
        for module, layer in zip(hook._modules, hook.layers):
            if layer.name in gates.layers:
                raise ValueError(f"dit_accel: {layer.name} already has a to_gate_compress gate (from "
                                 f"{gates.layers[layer.name]}); train from a model without gates")
            if not runs_vsa_layer(handle.schedule, layer.index):
                continue
            inner, dim = _dims(module)
            if inner is None or dim is None:
                raise ValueError(f"dit_accel: cannot size a VSA gate for {layer.name}: it has no to_q projection")
            ref = next(module.parameters())
            gate = _TrainableGate(dim, inner).to(ref.device)
            gates.add(layer.name, module, gate, "trained")
            made[layer.name] = gate
    handle.vsa_gates = dict(gates.layers)
    return made


def runs_vsa_layer(schedule, index: int) -> bool:
    """Whether layer ``index`` of ``schedule`` may run VSA (a dense layer does not)."""
    if index in schedule.dense_layers:
        return False
    return _has_vsa(schedule.layer_methods.get(index, schedule.method), index)


def gate_state_dict(gates: Dict[str, nn.Module]) -> Dict[str, torch.Tensor]:
    """Trained gates in FastVideo's Diffusers key layout: ``{"blocks.N.to_gate_compress.weight": ..., ".bias"}``
    (fp32 CPU copies), the layout :func:`dit_accel.checkpoints.vsa_gates.read_gates` reads back."""
    out: Dict[str, torch.Tensor] = {}
    for name, gate in gates.items():
        match = _BLOCK.search(name)
        if match is None:
            raise ValueError(f"dit_accel: {name} is not inside a transformer block (blocks.N): its gate has no "
                             "FastVideo key")
        for part in ("weight", "bias"):
            key = f"blocks.{match.group(1)}.to_gate_compress.{part}"
            if key in out:
                raise ValueError(f"dit_accel: two VSA gates map to {key} (one per block only)")
            out[key] = getattr(gate.proj, part).detach().float().cpu().contiguous()
    return out


class _Gate:
    """One layer's ``to_gate_compress`` (weight and bias), moved to the input's device and dtype once."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight, self.bias = weight, bias

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.weight.device != hidden_states.device or self.weight.dtype != hidden_states.dtype:
            self.weight = self.weight.to(hidden_states.device, hidden_states.dtype)
            self.bias = None if self.bias is None else self.bias.to(hidden_states.device, hidden_states.dtype)
        return F.linear(hidden_states, self.weight, self.bias)


class VSAGates:
    """The gates of one handle: ``layers`` ``{attention module name: source folder}``; :meth:`remove` drops them."""

    def __init__(self):
        self.layers: Dict[str, str] = {}
        self.projections: Dict[str, _Gate] = {}
        self.modules: Dict[str, nn.Module] = {}
        self._handles: List = []

    def add(self, name: str, module: nn.Module, gate: _Gate, source: str) -> None:
        def pre(mod, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            push_gate(None if not isinstance(hidden, torch.Tensor) else (lambda: gate(hidden)))

        def post(mod, args, kwargs, output):
            pop_gate()

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))
        self.layers[name] = source
        self.projections[name] = gate
        self.modules[name] = module

    def state_dict_of(self, transformer: nn.Module) -> Dict[str, torch.Tensor]:
        """The gates of ``transformer``'s layers in FastVideo's key layout (``blocks.N.to_gate_compress.*``, keys
        relative to ``transformer``), what ``save_pretrained`` writes beside its weights (empty: none)."""
        gated = {id(m): name for name, m in self.modules.items()}
        out: Dict[str, torch.Tensor] = {}
        for name, module in transformer.named_modules():
            match = _BLOCK.search(name) if id(module) in gated else None
            if match is None:
                continue
            gate = self.projections[gated[id(module)]]
            gate = getattr(gate, "proj", gate)  # (a gate being trained holds its Linear: saving it raised a raw error)
            out[f"blocks.{match.group(1)}.to_gate_compress.weight"] = gate.weight.detach().float()
            if gate.bias is not None:
                out[f"blocks.{match.group(1)}.to_gate_compress.bias"] = gate.bias.detach().float()
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.modules = {}

    def __len__(self) -> int:
        return len(self.layers)


def attach_gates(handle, targets, weights=None) -> Optional[VSAGates]:
    """Install the VSA gates of ``targets`` (``[(prefix, transformer, preset, [(name, module), ...])]``) for
    ``handle``; ``weights``: a checkpoint folder (see :func:`gates_folder`) read instead of the transformers'
    own folders. Says how many layers got a gate (``handle.warnings``); sets ``handle.vsa_gates``. Returns
    the gates (None when no layer runs VSA), whose ``remove()`` the handle calls."""
    log = handle._runtime.warnings
    if not runs_vsa(handle.schedule):
        for _, transformer, _, _ in targets:
            folder = transformer_folder(transformer)
            try:
                found = gate_keys(folder) if folder is not None else {}
            except (ValueError, OSError):  # an unreadable checkpoint is not this method's business: no warning
                found = {}
            if found:
                blocks = len({m.group(1) for m in map(re.compile(r"blocks\.(\d+)\.").search, found) if m})
                log.warn(f"dit_accel: {folder} holds VSA to_gate_compress gates for {blocks} blocks (a sparse-"
                         f"distilled checkpoint such as FastWan), which {handle.method.name} does not use: the model "
                         "runs without them, not as it was trained. Apply dit_accel.VSA(...) to run the gates",
                         key=("unused gates", str(folder)), stacklevel=4)
        handle.vsa_gates = {}
        return None
    gates = VSAGates()
    try:
        total = _load(gates, targets, weights, log)
    except BaseException:  # all or nothing: apply() undoes the rest
        gates.remove()
        raise
    handle.vsa_gates = dict(gates.layers)
    if len(gates) or weights is not None:  # (a model without a checkpoint folder: training-free VSA, nothing to say)
        where = ", ".join(sorted(set(gates.layers.values())))
        log.warn(f"dit_accel: VSA: to_gate_compress gates loaded for {len(gates)} of {total} attention layers from "
                 f"{where or weights}" + ("" if len(gates) == total else "; the others run with a zero gate (the "
                                                                         "fine branch alone)"),
                 key=("vsa gates", len(gates), where), stacklevel=4)
    return gates


def _load(gates: VSAGates, targets, weights, log) -> int:
    """Add the gate of every targeted layer its checkpoint has one for; the number of targeted layers."""
    total = 0
    if weights is not None and len(targets) > 1 and gate_keys(Path(weights)):
        names = ", ".join(prefix.rstrip(".") or "transformer" for prefix, *_ in targets)
        log.warn(f"dit_accel: VSA: weights={os.fspath(weights)!r} holds one transformer's to_gate_compress gates, and "
                 f"the pipeline runs VSA in {len(targets)} ({names}): each gets these same gates. If its experts were "
                 "trained apart (Wan 2.2 A14B), pass the pipeline folder, with a folder per transformer, so each "
                 "loads its own", key=("one folder, two transformers", os.fspath(weights)), stacklevel=5)
    for prefix, transformer, _, modules in targets:
        if weights is not None:
            folder = Path(weights)
            if not gate_keys(folder):  # a pipeline folder: each transformer's own (Wan 2.2: transformer_2/ too)
                folder = folder / (prefix.rstrip(".") or "transformer")
                folder = folder if folder.is_dir() else None
        else:
            folder = transformer_folder(transformer)
            name = loaded_from(transformer)
            if folder is None and name is not None:  # a hub id not in the local cache, a moved folder
                log.warn(f"dit_accel: VSA could not look for to_gate_compress gates: {type(transformer).__name__} was "
                         f"loaded from {name!r}, which is no folder on this machine. If it is a sparse-distilled "
                         "checkpoint (FastWan), pass weights=<its transformer folder> so its gates load; without "
                         "them VSA runs the fine branch alone", key=("no gate folder", name), stacklevel=5)
        tensors = read_gates(folder) if folder is not None else {}
        total += len(modules)
        blocks = {name: _BLOCK.search(name[len(prefix):]) for name, _ in modules}
        _check_blocks(folder, transformer, tensors, {int(m.group(1)) for m in blocks.values() if m}, log)
        for name, module in modules:
            match = blocks[name]
            parts = tensors.get(int(match.group(1))) if match else None
            if parts is None:
                continue
            weight, bias = parts["weight"], parts.get("bias")
            inner, dim = _dims(module)
            if (inner is not None and weight.shape[0] != inner) or (dim is not None and weight.shape[1] != dim):
                raise ValueError(f"dit_accel: {folder}: the to_gate_compress gate of {name} maps {weight.shape[1]} to "
                                 f"{weight.shape[0]} channels but the layer's attention maps {dim} to {inner} (model "
                                 "dim to heads x head dim): the gates belong to a model of another size")
            ref = next(module.parameters(), None)
            if ref is not None and ref.device.type != "meta":  # (offloaded models: moved at the first call)
                # The dtype of the module's first floating-point parameter of 16 bits or more (a norm's), as SLA's
                # projections take it: its first weight may be a storage dtype (float8 layerwise casting, packed
                # GGUF/bitsandbytes ints), which rounded the gates (0.016 off on tiny Wan) or truncated them.
                dtype = next((p.dtype for p in module.parameters() if p.is_floating_point() and p.dtype.itemsize > 1),
                             weight.dtype)
                weight = weight.to(ref.device, dtype)
                bias = None if bias is None else bias.to(ref.device, dtype)
            gates.add(name, module, _Gate(weight, bias), str(folder))
    return total


def _check_blocks(folder, transformer, tensors: dict, blocks: set, log) -> None:
    """The checkpoint's gates against the blocks whose attention VSA runs: gates for none of them are refused (the
    gates belong to another model, and VSA would run without a word of it); gates for blocks the model does not
    have are named in a warning."""
    if not tensors:
        return
    extra = sorted(set(tensors) - blocks)
    if not set(tensors) & blocks:
        raise ValueError(f"dit_accel: {folder} holds VSA to_gate_compress gates for blocks {_ranges(extra)}, but none "
                         f"of {type(transformer).__name__}'s VSA layers is in such a block (its blocks: "
                         f"{_ranges(sorted(blocks)) or 'none'}): the gates belong to another model. Pass that "
                         "model's folder, or remove the gates file to run VSA without gates")
    if extra:
        log.warn(f"dit_accel: {folder} holds VSA to_gate_compress gates for blocks {_ranges(extra)}, which "
                 f"{type(transformer).__name__} has no VSA layer in (its blocks: {_ranges(sorted(blocks))}): those "
                 "gates are not used; check that the checkpoint belongs to this model",
                 key=("extra gates", str(folder)), stacklevel=6)


def _ranges(numbers) -> str:
    """``0-3, 7`` for ``[0, 1, 2, 3, 7]``."""
    out, numbers = [], list(numbers)
    i = 0
    while i < len(numbers):
        j = i
        while j + 1 < len(numbers) and numbers[j + 1] == numbers[j] + 1:
            j += 1
        out.append(str(numbers[i]) if i == j else f"{numbers[i]}-{numbers[j]}")
        i = j + 1
    return ", ".join(out)


def _dims(module: nn.Module):
    """``(inner, dim)``: the module's query projection's output (heads x head dim) and input widths, or None."""
    for name in ("to_q", "to_query", "q_proj"):
        proj = getattr(module, name, None)
        out, inp = getattr(proj, "out_features", None), getattr(proj, "in_features", None)
        if isinstance(out, int):
            return out, inp if isinstance(inp, int) else None
    return None, None
