"""``dit_accel.apply``: make a Diffusers pipeline's self-attention sparse, and undo it.

See :mod:`dit_accel.pipelines.processor` for the mechanism (wrapped processors and
a scoped SDPA interceptor) and :mod:`dit_accel.pipelines.presets` for per-model data.
All state (plans, statistics, the current step and grid) lives in the
:class:`AccelHandle`; nothing is stored on classes or modules beyond the wrapped
processors, one forward pre-hook per transformer and, for SLA, one projection
submodule per attention layer, all of which :meth:`AccelHandle.remove` takes away.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..methods import SLA, Dense, Method
from .plans import Plan, build_plan
from .presets import GridInfo, Preset, preset_for
from .processor import SDPAInterceptor, SparseAttnProcessor, _native_scope, _Timer

__all__ = ["apply", "AccelHandle"]

BACKENDS = ("auto", "triton", "torch", "flex")
_SLA_ATTR = "dit_accel_sla_proj"  # submodule name of the SLA projection on each attention module


@dataclass
class _LayerStats:
    sparse_calls: int = 0
    dense_calls: int = 0
    densities: list = field(default_factory=list)
    time_ms: float = 0.0
    timed_calls: int = 0
    events: list = field(default_factory=list)  # CUDA (start, end) pairs, read lazily


@dataclass
class _Call:
    info: GridInfo
    step: int
    total: Optional[int]


@dataclass(eq=False)
class _Transformer:
    module: nn.Module
    prefix: str  # "" or e.g. "transformer_2." for stats names
    preset: Preset
    signature: inspect.Signature
    hook: object = None
    current: Optional[_Call] = None


@dataclass(eq=False)
class _Layer:
    index: int
    name: str
    module: nn.Module
    original: object
    state: _Transformer
    stats: _LayerStats = field(default_factory=_LayerStats)
    sla_proj: Optional[nn.Module] = None

    @property
    def preset(self) -> Preset:
        return self.state.preset


def _as_floats(values) -> List[float]:
    """Floats and 0-d tensors -> Python floats, one device sync per device (not one per call).

    SLA densities stay on the device during generation (no host sync on the attention
    path); thousands of per-call ``float(t)`` reads in stats() would each wait for the GPU.
    """
    out: List[float] = []
    by_device: Dict[torch.device, list] = {}
    for v in values:
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(v.detach().float().reshape(()))
        elif v is not None:
            out.append(float(v))
    for tensors in by_device.values():
        out.extend(torch.stack(tensors).cpu().tolist())
    return out


def _check_int(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= {minimum}")
    return value


def _check_int_list(name: str, value) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name}={value!r} is invalid: expected a list of non-negative ints or None") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise ValueError(f"{name}={value!r} is invalid: expected a list of non-negative ints or None")
    return items


def _check_capture_dir(capture) -> str:
    """The capture folder, created now: a bad path fails here, not in the middle of a generation."""
    if not isinstance(capture, (str, os.PathLike)):
        raise TypeError(f"capture must be a folder path (str or os.PathLike); got {type(capture).__name__}")
    path = os.fspath(capture)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"capture={path!r} is a file; pass a folder for the layerLLL_stepSSS.pt captures")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"capture={path!r}: cannot create the folder ({exc.strerror or exc}); "
                         "pass a writable folder") from None
    return path


def _check_method(name: str, method) -> Method:
    if not isinstance(method, Method):
        hint = f"dit_accel.method_from_name({method!r})" if isinstance(method, str) else "dit_accel.Tile(...)"
        raise TypeError(f"{name} must be a dit_accel method config (dit_accel.Dense(), GNA(...), Tile(...), "
                        f"Radial(...) or SLA(...)); got {type(method).__name__}. Try {hint}")
    return method


def _head_dim(module: nn.Module) -> int:
    if isinstance(getattr(module, "head_dim", None), int):
        return module.head_dim
    heads = getattr(module, "heads")
    return module.to_q.out_features // heads


def _find_transformers(obj) -> Tuple[List[Tuple[str, nn.Module]], object]:
    """[(prefix, transformer)], scheduler for a pipeline or a bare transformer."""
    if isinstance(obj, nn.Module):
        found, pipe = [("", obj)], None
    else:
        found, pipe = [], obj
        for attr in ("transformer", "transformer_2"):  # Wan 2.2 A14B has a second (low-noise) expert
            module = getattr(obj, attr, None)
            if isinstance(module, nn.Module):
                found.append(("" if attr == "transformer" else f"{attr}.", module))
        if not found:
            raise TypeError(f"apply() needs a Diffusers pipeline with a `transformer` or a transformer module; "
                            f"got {type(obj).__name__}")
    for _, module in found:
        if hasattr(module, "_orig_mod"):  # torch.compile wrapper: the graph would not see the new processors
            raise ValueError("apply() got a torch.compile'd transformer (OptimizedModule); apply dit_accel to the "
                             "uncompiled module (transformer._orig_mod) instead")
    return found, pipe


class AccelHandle:
    """The installed configuration. Returned by :func:`apply`.

    Methods: :meth:`remove` (also on leaving a ``with`` block), :meth:`stats`,
    :meth:`summary`, :meth:`sla_projections`, :meth:`set_step`.
    Attributes: ``transformer`` (the first/only transformer), ``transformers``,
    ``method``, ``backend``, ``measure_time`` (set True to time attention calls).
    """

    def __init__(self, pipe_or_transformer, method: Method, *, dense_steps: int, dense_last_steps: int,
                 dense_layers, layer_methods, backend: str, capture, capture_layers, capture_steps,
                 scheduler, timing: bool):
        self.method = method
        self.backend = backend
        self.dense_steps, self.dense_last_steps = dense_steps, dense_last_steps
        self.layer_methods: Dict[int, Method] = dict(layer_methods or {})
        self.capture_dir = None if capture is None else os.fspath(capture)
        self.capture_layers, self.capture_steps = capture_layers, capture_steps
        self.measure_time = bool(timing)
        found, pipe = _find_transformers(pipe_or_transformer)
        self._pipe = pipe
        self._scheduler = scheduler
        self._manual_step: Optional[Tuple[int, Optional[int]]] = None
        self._plans: Dict[tuple, Plan] = {}
        self._captured = set()
        self._warned = set()
        self.removed = False
        self._adapters: List[Tuple[nn.Module, List[str], bool]] = []  # LoRA adapters loaded by weights=
        self.transformers: List[nn.Module] = [m for _, m in found]
        self.transformer = self.transformers[0]
        self._states: List[_Transformer] = []
        self._layers: List[_Layer] = []
        self._dense_layer_spec = dense_layers
        try:
            for prefix, module in found:
                self._install(prefix, module)
        except Exception:
            self.remove()
            raise
        n_layers = max((sum(1 for l in self._layers if l.state is s) for s in self._states), default=0)
        if isinstance(dense_layers, int) and not isinstance(dense_layers, bool):
            self.dense_layers = frozenset(range(min(dense_layers, n_layers)))
        else:
            self.dense_layers = frozenset(dense_layers or ())
        for name, indices in (("dense_layers", self.dense_layers), ("layer_methods", self.layer_methods),
                              ("capture_layers", self.capture_layers or ())):
            bad = sorted(i for i in indices if i >= n_layers)
            if bad:
                self.remove()
                raise ValueError(f"{name} has layer indices {bad} but the model has {n_layers} attention layers "
                                 f"(0..{n_layers - 1})")
        if n_layers and set(range(n_layers)) <= self.dense_layers and not isinstance(method, Dense):
            warnings.warn(f"dense_layers covers all {n_layers} attention layers: {method.name} never runs and the "
                          "model stays dense. Pass fewer layers (e.g. dense_layers=1)", stacklevel=3)

    # ----------------------------------------------------------------- install
    def _install(self, prefix: str, transformer: nn.Module) -> None:
        preset = preset_for(transformer)
        for module in transformer.modules():  # apply() twice: the previous handle goes first
            proc = getattr(module, "processor", None)
            if isinstance(proc, SparseAttnProcessor) and proc.handle is not self:
                proc.handle.remove()
        state = _Transformer(transformer, prefix, preset, inspect.signature(type(transformer).forward))
        self._states.append(state)
        index = 0
        for name, module in transformer.named_modules():
            if not preset.matches(name):
                continue
            original = getattr(module, "processor", None)
            if original is None:
                continue
            if isinstance(original, nn.Module):
                raise ValueError(f"{prefix}{name} uses a trainable attention processor ({type(original).__name__}, "
                                 "e.g. IP-Adapter); dit_accel wraps plain processors only. Unload it first")
            backend = getattr(original, "_attention_backend", None)
            if backend is not None and str(getattr(backend, "value", backend)) != "native":
                raise ValueError(f"{prefix}{name} uses the Diffusers attention backend {backend!r}; dit_accel "
                                 "intercepts the native backend. Call transformer.reset_attention_backend() "
                                 "(or set_attention_backend('native')) before dit_accel.apply()")
            if getattr(original, "_parallel_config", None) is not None:
                raise ValueError(f"{prefix}{name} runs context-parallel attention; dit_accel does not support "
                                 "context parallelism. Disable it before dit_accel.apply()")
            layer = _Layer(index, prefix + name, module, original, state)
            if isinstance(self.layer_methods.get(index, self.method), SLA):
                layer.sla_proj = self._new_projection(module)
                module.add_module(_SLA_ATTR, layer.sla_proj)
            module.processor = SparseAttnProcessor(original, self, layer)
            self._layers.append(layer)
            index += 1
        if index == 0:
            raise ValueError(f"found no attention modules matching {preset.attention} in {type(transformer).__name__}")
        state.hook = transformer.register_forward_pre_hook(
            lambda module, args, kwargs, _s=state: self._pre_hook(_s, args, kwargs), with_kwargs=True)

    @staticmethod
    def _new_projection(module: nn.Module) -> nn.Linear:
        d = _head_dim(module)
        ref = next(module.parameters())
        proj = nn.Linear(d, d, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(proj.weight)  # zero: SLA starts as plain top-k sparse attention
        nn.init.zeros_(proj.bias)
        return proj

    def remove(self) -> None:
        """Restore every wrapped processor, drop hooks and SLA projections. Idempotent."""
        for layer in self._layers:
            if isinstance(getattr(layer.module, "processor", None), SparseAttnProcessor) and \
                    layer.module.processor.handle is self:
                layer.module.processor = layer.original
            if layer.sla_proj is not None and getattr(layer.module, _SLA_ATTR, None) is layer.sla_proj:
                delattr(layer.module, _SLA_ATTR)
        for transformer, names, had_lora in self._adapters:
            if had_lora:
                transformer.delete_adapters(names)
            else:  # no LoRA before apply(): take the peft layers out entirely
                transformer.unload_lora()
        self._adapters = []
        for state in self._states:
            if state.hook is not None:
                state.hook.remove()
                state.hook = None
            state.current = None
        self.removed = True

    def __enter__(self) -> "AccelHandle":
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    # ---------------------------------------------------------------- schedule
    def set_step(self, step: int, total: Optional[int] = None) -> None:
        """Tell a bare transformer which denoising step comes next (``0 <= step < total``).

        Needed for ``dense_steps``/``dense_last_steps`` when apply() got a bare
        transformer and no ``scheduler=``; overrides the scheduler when set.
        """
        _check_int("step", step)
        if total is not None:
            _check_int("total", total, 1)
        self._manual_step = (step, total)

    def _step(self, args: dict) -> Tuple[int, Optional[int]]:
        if self._manual_step is not None:
            return self._manual_step
        scheduler = self._scheduler if self._scheduler is not None else getattr(self._pipe, "scheduler", None)
        if scheduler is None:
            if self.dense_steps or self.dense_last_steps:
                raise ValueError("dense_steps/dense_last_steps need the denoising step: apply() got a bare "
                                 "transformer, so pass scheduler=pipe.scheduler to apply() or call "
                                 "handle.set_step(i, total) before each transformer call")
            return 0, None
        order = max(int(getattr(scheduler, "order", 1) or 1), 1)
        timesteps = getattr(scheduler, "timesteps", None)
        total = len(timesteps) // order if timesteps is not None else None
        if not hasattr(scheduler, "step_index"):
            # DDIM-style schedulers (CogVideoX's DDIM and DPM among them) keep no step counter:
            # the position is where this call's timestep sits in the schedule.
            return self._timestep_position(scheduler, timesteps, args), total
        index = scheduler.step_index
        if index is None:  # before the first scheduler.step() of this run
            index = getattr(scheduler, "begin_index", None) or 0
        return int(index) // order, total

    def _timestep_position(self, scheduler, timesteps, args: dict) -> int:
        t = args.get("timestep")
        if timesteps is not None and len(timesteps) and t is not None:
            # One host sync per transformer call, only for schedulers without step_index.
            t = torch.as_tensor(t).reshape(-1)[:1].to(device=timesteps.device, dtype=torch.float64)
            hits = torch.isclose(timesteps.to(torch.float64), t).nonzero()
            if hits.numel():
                return int(hits[0, 0])
        if self.dense_steps or self.dense_last_steps or self.capture_steps is not None:
            self._warn_once(f"dit_accel: {type(scheduler).__name__} has no step_index and this call's timestep is "
                            "not in scheduler.timesteps; every call counts as step 0 for dense_steps/"
                            "dense_last_steps/capture_steps (use handle.set_step(i, total) to say which step runs)")
        return 0

    def _method_for(self, layer: _Layer, step: int, total: Optional[int]) -> Optional[Method]:
        """The method a layer runs at this step, or None when the schedule makes it dense."""
        if layer.index in self.dense_layers or step < self.dense_steps:
            return None
        if self.dense_last_steps and total is not None and step >= total - self.dense_last_steps:
            return None
        return self.layer_methods.get(layer.index, self.method)

    def _plan(self, method: Method, grid) -> Plan:
        key = (method, tuple(grid))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build_plan(method, grid)
        return plan

    def _pre_hook(self, state: _Transformer, args, kwargs) -> None:
        bound = state.signature.bind_partial(state.module, *args, **kwargs).arguments
        info = state.preset.read_grid(state.module, bound)
        step, total = self._step(bound)
        # Build (and so validate) every plan this grid needs before any attention runs.
        for method in {self.method, *self.layer_methods.values()}:
            self._plan(method, info.grid)
        sparse = any(not isinstance(m, Dense) for m in (self.method, *self.layer_methods.values()))
        if sparse and total is not None and self.dense_steps + self.dense_last_steps >= total:
            self._warn_once(f"dit_accel: dense_steps={self.dense_steps} + dense_last_steps={self.dense_last_steps} "
                            f"cover all {total} denoising steps: every step runs dense. Lower them or raise the "
                            "number of steps")
        state.current = _Call(info, step, total)

    # ------------------------------------------------------------------- calls
    def _wants_capture(self, layer: _Layer, step: int) -> bool:
        if self.capture_dir is None:
            return False
        if self.capture_layers is not None and layer.index not in self.capture_layers:
            return False
        if self.capture_steps is not None and step not in self.capture_steps:
            return False
        return (layer.index, step) not in self._captured

    def _run_processor(self, layer: _Layer, attn, args, kwargs):
        call = layer.state.current
        if call is None:  # called outside the transformer's forward: nothing known about the grid
            self._warn_once("dit_accel: attention called outside the transformer forward; running dense")
            layer.stats.dense_calls += 1
            return layer.original(attn, *args, **kwargs)
        method = self._method_for(layer, call.step, call.total)
        capture = self._wants_capture(layer, call.step)
        if method is None:
            if not (capture or self.measure_time):
                layer.stats.dense_calls += 1
                return layer.original(attn, *args, **kwargs)
            method = Dense()
        plan = self._plan(method, call.info.grid)
        with _native_scope(), SDPAInterceptor(self, layer, plan, capture):
            return layer.original(attn, *args, **kwargs)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    def _timer(self, layer: _Layer, device):
        return _Timer(layer.stats, device) if self.measure_time else contextlib.nullcontext()

    def _capture(self, layer: _Layer, call: _Call, q, k, v) -> None:
        key = (layer.index, call.step)
        if key in self._captured:
            return
        self._captured.add(key)
        os.makedirs(self.capture_dir, exist_ok=True)
        # clone(): a slice would otherwise save the whole joint sequence's storage.
        data = {name: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                for name, t in (("q", q), ("k", k), ("v", v))}
        data.update(grid=tuple(call.info.grid), layer=layer.index, layer_name=layer.name, step=call.step)
        torch.save(data, os.path.join(self.capture_dir, f"layer{layer.index:03d}_step{call.step:03d}.pt"))

    # -------------------------------------------------------------- reporting
    def _layer_method(self, layer: _Layer) -> Method:
        return Dense() if layer.index in self.dense_layers else self.layer_methods.get(layer.index, self.method)

    def stats(self) -> List[dict]:
        """Per attention layer: ``layer`` (module name), ``index``, ``method``, ``density``
        (mean visited block fraction of the video-video part over sparse calls; None if
        none ran sparse), ``sparse_calls``, ``dense_calls``, ``time_ms`` (total attention
        time of measured calls, None unless ``measure_time``/``timing=True``)."""
        if any(l.stats.events for l in self._layers) and torch.cuda.is_available():
            torch.cuda.synchronize()
        rows = []
        for layer in self._layers:
            s = layer.stats
            for start, end in s.events:
                s.time_ms += start.elapsed_time(end)
            s.events.clear()
            values = _as_floats(s.densities)
            rows.append({
                "layer": layer.name,
                "index": layer.index,
                "method": self._layer_method(layer).name,
                "density": sum(values) / len(values) if values else None,
                "sparse_calls": s.sparse_calls,
                "dense_calls": s.dense_calls,
                "time_ms": s.time_ms if s.timed_calls else None,
            })
        return rows

    def summary(self) -> dict:
        """Totals over layers: calls, call-weighted mean density / sparsity, attention time."""
        rows = self.stats()
        sparse = sum(r["sparse_calls"] for r in rows)
        weighted = [(r["density"], r["sparse_calls"]) for r in rows if r["density"] is not None]
        mean = sum(d * n for d, n in weighted) / sum(n for _, n in weighted) if weighted else None
        times = [r["time_ms"] for r in rows if r["time_ms"] is not None]
        return {
            "method": self.method.name,
            "config": self.method.to_dict(),
            "layers": len(rows),
            "sparse_layers": sum(1 for r in rows if r["sparse_calls"]),
            "sparse_calls": sparse,
            "dense_calls": sum(r["dense_calls"] for r in rows),
            "mean_density": mean,
            "sparsity": None if mean is None else 1.0 - mean,
            "time_ms": sum(times) if times else None,
            "dense_steps": self.dense_steps,
            "dense_last_steps": self.dense_last_steps,
            "dense_layers": sorted(self.dense_layers),
            "backend": self.backend,
        }

    def sla_projections(self) -> Dict[str, nn.Linear]:
        """SLA output projections by attention module name (empty unless a layer runs SLA)."""
        return {l.name: l.sla_proj for l in self._layers if l.sla_proj is not None}

    @property
    def layers(self) -> List[str]:
        """Names of the wrapped attention modules, in layer-index order."""
        return [l.name for l in self._layers]

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"AccelHandle({self.method!r}, layers={len(self._layers)}, backend={self.backend!r}, {state})"


def apply(pipe_or_transformer, method: Method, *, dense_steps: int = 0, dense_last_steps: int = 0,
          dense_layers: Union[int, Sequence[int], None] = None, layer_methods: Optional[Dict[int, Method]] = None,
          backend: str = "auto", weights=None, capture=None, capture_layers: Optional[Iterable[int]] = None,
          capture_steps: Optional[Iterable[int]] = None, scheduler=None, timing: bool = False) -> AccelHandle:
    """Make a Diffusers pipeline's (or transformer's) self-attention sparse.

    Only self-attention among video/image tokens changes; cross-attention stays
    dense, and in joint attention (HunyuanVideo, FLUX, CogVideoX, Mochi) text
    tokens attend and are attended to densely (video queries: sparse over video
    keys + dense over valid text keys, merged exactly by log-sum-exp).

    Args:
        pipe_or_transformer: a pipeline (its ``transformer`` and, for Wan 2.2,
            ``transformer_2`` are wrapped) or a transformer of a supported class
            (:data:`dit_accel.pipelines.presets.SUPPORTED`).
        method: ``dit_accel.Dense()``, ``GNA(...)``, ``Tile(...)``, ``Radial(...)`` or ``SLA(...)``.
        dense_steps: run the first N denoising steps dense.
        dense_last_steps: run the last N denoising steps dense.
        dense_layers: int N (the first N attention layers dense) or a list of layer indices.
        layer_methods: ``{layer index: Method}`` overrides of ``method`` per layer.
        backend: kernel backend, one of ``"auto"``, ``"triton"``, ``"torch"``, ``"flex"``.
        weights: folder of fine-tuned weights (SLA projections) to load after installing.
        capture: folder; saves video q/k/v of attention calls as
            ``layer{L:03d}_step{S:03d}.pt`` (first call per layer and step).
        capture_layers, capture_steps: restrict capture to these indices (None = all).
        scheduler: the scheduler that drives a *bare* transformer (the step index
            comes from ``scheduler.step_index``). Without it, a bare transformer with
            ``dense_steps``/``dense_last_steps`` needs ``handle.set_step(i, total)``
            before each call. Pipelines use ``pipe.scheduler`` automatically.
        timing: measure attention time per layer (CUDA events / perf_counter),
            reported as ``time_ms`` in :meth:`AccelHandle.stats`.

    The step index comes from the scheduler position, so classifier-free guidance
    (two transformer calls per step) counts one step. Layer indices count the
    wrapped attention modules in model order (HunyuanVideo/FLUX: double-stream
    blocks, then single-stream blocks).

    Returns:
        :class:`AccelHandle`; ``handle.remove()`` (or leaving ``with``) restores the
        model exactly. Calling apply() again on the same model replaces the first handle.

    Example::

        handle = dit_accel.apply(pipe, dit_accel.Radial(decay=0.95), dense_steps=12, dense_layers=1)
        video = pipe(prompt="a red panda", num_frames=81).frames[0]
        print(handle.summary()["mean_density"])
        handle.remove()
    """
    method = _check_method("method", method)
    _check_int("dense_steps", dense_steps)
    _check_int("dense_last_steps", dense_last_steps)
    if dense_layers is not None:
        if isinstance(dense_layers, int) and not isinstance(dense_layers, bool):
            _check_int("dense_layers", dense_layers)
        else:
            dense_layers = _check_int_list("dense_layers", dense_layers)
    if layer_methods is not None:
        if not isinstance(layer_methods, dict):
            raise ValueError(f"layer_methods must be a dict {{layer index: Method}}; got {type(layer_methods).__name__}")
        for i, m in layer_methods.items():
            _check_int("layer_methods key", i)
            _check_method(f"layer_methods[{i}]", m)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: choose one of {', '.join(BACKENDS)}")
    if capture is not None:
        capture = _check_capture_dir(capture)
    capture_layers = _check_int_list("capture_layers", capture_layers)
    capture_steps = _check_int_list("capture_steps", capture_steps)
    if scheduler is not None and not hasattr(scheduler, "timesteps"):
        raise ValueError(f"scheduler={type(scheduler).__name__} has no `timesteps`; pass a Diffusers scheduler")
    handle = AccelHandle(pipe_or_transformer, method, dense_steps=dense_steps, dense_last_steps=dense_last_steps,
                         dense_layers=dense_layers, layer_methods=layer_methods, backend=backend, capture=capture,
                         capture_layers=capture_layers, capture_steps=capture_steps, scheduler=scheduler,
                         timing=timing)
    if weights is not None:
        try:
            from ..training.weights import load_trained_weights

            before = [set(getattr(t, "peft_config", None) or {}) for t in handle.transformers]
            load_trained_weights(handle, weights)
            # remove() must also take away the LoRA that the weights brought in.
            for t, old in zip(handle.transformers, before):
                new = sorted(set(getattr(t, "peft_config", None) or {}) - old)
                if new:
                    handle._adapters.append((t, new, bool(old)))
        except Exception:
            handle.remove()
            raise
    return handle
