"""The handle :func:`~.apply.apply` returns: ``remove()``, statistics, steps, weights, and the guards it keeps on
the model while applied (``fuse_lora`` refused, ``save_pretrained`` writing the weights folder beside the model)."""

from __future__ import annotations

import contextlib
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .._util import run_each
from ..kernels.checks import check_flag
from ..methods import Method
from ..plans.plan import Plan
from ..checkpoints.finetuned import ADAPTER_NAME, load_into
from .apply_checks import (_check_grid, _check_int, _check_method, _check_weights, _check_weights_folder,
                           _saved_by_save_pretrained, refuse_foreign_adapter)
from .context import CallGate
from .hooks import Runtime, SparseAttnProcessor, TransformerHook
from .schedule import Schedule, StepSource

__all__ = ["AccelHandle"]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


class AccelHandle:
    """The installed configuration, returned by :func:`apply`.

    Methods: :meth:`remove` (also on leaving a ``with`` block), :meth:`stats`,
    :meth:`summary`, :meth:`reset_stats`, :meth:`sla_projections`, :meth:`set_step`, :meth:`plan`.
    Attributes: ``transformer`` (the first/only transformer), ``transformers``,
    ``method``, ``schedule``, ``backend``, ``removed``, ``warnings`` (every dit_accel warning so far).

    After :meth:`remove`, the methods that read or change the installed state (``stats``, ``summary``,
    ``set_step``, ``plan``, ``plans``, ``sla_projections``, ``load_weights``, ``bypassed``) raise
    RuntimeError naming the method; ``remove()`` again does nothing, and ``warnings`` stays readable.

    While the handle loaded LoRA adapters (``weights=``), ``transformer.fuse_lora()`` (and
    ``pipe.fuse_lora()``) over them is refused: the fused weights could not be restored bit for bit.
    ``lora_adapter`` names the PEFT adapter holding the ``weights=`` folder's LoRA (``"dit_accel"``, or the
    adapter ``pipe.load_lora_weights(DIR)`` loaded it as), None without one.

    While applied, ``transformer.save_pretrained(DIR)`` (and ``pipe.save_pretrained``) writes the base model
    (the weights under the LoRA layers, which ``from_pretrained`` reads) and, beside it in ``DIR``, a weights
    folder with the LoRA (``lora_adapter``, else the one active adapter), SLA projections and method: load it back
    with
    ``apply(pipe, load_method(DIR), weights=DIR)``, or its LoRA with ``pipe.load_lora_weights(DIR)``.
    ``copy.deepcopy`` and ``pickle`` of an applied model are refused in one line (remove, copy, apply again).
    """

    def __init__(self, hooks: List[TransformerHook], schedule: Schedule, runtime: Runtime, steps: StepSource,
                 gate: Optional[CallGate] = None):
        self._hooks, self.schedule, self._runtime, self._steps = hooks, schedule, runtime, steps
        self._gate = gate if gate is not None else (hooks[0].gate if hooks else CallGate())
        self.transformers = [h.transformer for h in hooks]
        self.transformer = self.transformers[0]
        self.method = schedule.method
        self.backend = runtime.backend
        self.removed = False
        # LoRA adapters that weights= loaded: (transformer, names, the LoRA state before, see _lora_state)
        self._adapters: List[Tuple[nn.Module, List[str], tuple]] = []
        # fuse_lora(): (layer, adapters, weight before, the adapters merged into it before)
        self._fused: List[Tuple[nn.Module, List[str], torch.Tensor, List[str]]] = []
        # layers of the user's fused LoRA that activating this handle's adapter unmerged (see _set_adapters)
        self._unmerged: List[Tuple[nn.Module, torch.Tensor, List[str]]] = []
        self._fuse_guards: List[nn.Module] = []  # transformers whose fuse_lora this handle refuses
        self._save_guards: List[nn.Module] = []  # transformers whose save_pretrained this handle wraps
        self.lora_adapter: Optional[str] = None
        self._released = False  # its adapters are gone (remove(), or a replacing apply() with weights=)
        self._thread = threading.current_thread()  # the thread that applied it (one live handle per model)
        self._blocks = 0  # `with` blocks of this handle entered and not left (apply() inside one is refused)
        for hook in hooks:
            hook.handle = self

    def _check_active(self, what: str) -> None:
        if self.removed:
            raise RuntimeError(f"dit_accel: handle.{what} was called on a removed handle ({self!r}); read stats() "
                               "and summary() before remove() (inside the with block), or apply() again")

    # --------------------------------------------------------------- lifecycle
    def remove(self) -> None:
        """Restore every wrapped processor, drop hooks, SLA projections and loaded LoRA adapters. Idempotent.

        Safe against other threads: calls in flight finish first, with dit_accel (remove() waits for
        them), and calls that start meanwhile wait, then run the original model, so no call runs half
        sparse and half dense. A call is a transformer call, and also a pipeline call that has begun
        denoising: remove() from another thread waits until that pipeline call returns
        (:class:`~.context.CallGate`). From the pipeline's own step callback (``callback_on_step_end``)
        it does not wait for its own call: the remaining steps run the original model. From inside a
        transformer call of this handle (an attention processor, a forward hook) it raises RuntimeError.

        Cut short (a KeyboardInterrupt, an error while unloading the LoRA), it still undoes every other part, then
        raises; the handle stays live (``removed`` False), and ``remove()`` again finishes the job.
        """
        if not self._gate.close("handle.remove()"):
            return
        done = False
        try:
            run_each([self._detach, self._release])
            done = True
        finally:
            if done:
                self.removed = True
                self._gate.finish()
            else:
                # Cut short (a KeyboardInterrupt, an error of peft's): every other step still ran, and the handle
                # stays live, so remove() again finishes the job (before: it was marked removed, and its
                # remaining wrappers, hooks or adapters stayed on the model for good)
                self._gate.reopen()

    def _detach(self) -> None:
        """Drop the hooks and put the original processors back (each transformer's, even when one fails)."""
        run_each([hook.remove for hook in self._hooks])

    def _release(self) -> None:
        """The irreversible part of :meth:`remove`: the fuse_lora guards and dit_accel's LoRA adapters. Each step
        runs even when one before it fails, and each forgets what it undid only once undone, so a second call
        finishes what an interrupted one left."""
        self._released = True
        run_each([self._unfuse, self._drop_gates, self._drop_guards, self._drop_adapters])

    def _drop_gates(self) -> None:
        if getattr(self, "_gates", None) is not None:  # VSA's checkpoint gates (pipelines/vsa_gates.py)
            self._gates.remove()

    def _drop_guards(self) -> None:
        while self._fuse_guards:
            _drop_fuse_guard(self._fuse_guards[-1], self)
            self._fuse_guards.pop()
        while self._save_guards:
            _drop_save_guard(self._save_guards[-1], self)
            self._save_guards.pop()

    def _drop_adapters(self) -> None:
        while self._adapters:
            transformer, names, state = self._adapters[0]
            if _unmerge(transformer, names):
                self._runtime.warnings.warn(
                    f"dit_accel: LoRA adapter {names} was merged into the weights of {type(transformer).__name__} "
                    "(not through fuse_lora, which dit_accel refuses): remove() unmerged it, which restores the "
                    "weights up to float rounding, not bit for bit")
            _unload_adapters(transformer, names, state)
            self._adapters.pop(0)
        _remerge(self._unmerged)

    def __enter__(self) -> "AccelHandle":
        # (before: a with block on a removed handle, e.g. the second `with handle:` of one apply(), ran the
        # original model, dense, without a word)
        if self.removed:
            raise RuntimeError(f"dit_accel: `with` on a removed handle ({self!r}): leaving a with block removes "
                               "the handle, so its block would run the original model. Use `with "
                               "dit_accel.apply(...)` for each block, or one with block around all the calls")
        self._blocks += 1
        return self

    def __exit__(self, *exc) -> bool:
        # the outermost block removes it (before: an inner `with handle:` did, and the rest of the outer block ran
        # the original, dense, model without a word)
        self._blocks = max(0, self._blocks - 1)
        if not self._blocks:
            self.remove()
        return False

    def __reduce_ex__(self, protocol):  # copy.copy, copy.deepcopy and pickle (before: a copy shared the hooks, and
        # its remove() left this handle reading as active over a dense model)
        raise TypeError(f"dit_accel: cannot copy or pickle {self!r}: it is the one record of what apply() installed on "
                        "a live model. Pass the handle itself around; to save the setting, keep the method config "
                        "(handle.summary()['config']) and dit_accel.apply() it again")

    def bypassed(self):
        """Context manager: inside it, this thread's attention calls run the original processors (dense
        attention, no SLA projection) without touching the model, e.g. for a dense teacher in distillation."""
        self._check_active("bypassed()")
        return self._runtime.bypass()

    def load_weights(self, folder) -> None:
        """Load a fine-tuned folder (``dit-accel finetune`` output); ``remove()`` unloads its LoRA too.

        All or nothing: when loading fails (a missing or truncated file, another model's weights), the
        LoRA adapters it loaded are unloaded again, the active adapters and the SLA projections are as
        before, and the error is raised. After :meth:`fuse_lora`, the fused LoRA is taken out of the weights
        before loading, and the handle's LoRA is fused again after it (the old one, when loading failed).
        """
        self._check_active("load_weights()")
        folder = _check_weights(folder, none=False)
        refuse_foreign_adapter(folder, self.transformers, [self])
        _check_weights_folder(folder, self.schedule, [(layer.name, module, layer.index) for hook in self._hooks
                                                      for module, layer in zip(hook._modules, hook.layers)])
        self._load_checked(folder)

    def _load_checked(self, folder) -> None:
        """:meth:`load_weights` of a folder already checked against this handle's layers (``apply(weights=)``
        checks it before the model changes: before, it was read and checked a second time here)."""
        before = [dict(getattr(t, "peft_config", None) or {}) for t in self.transformers]
        states = [_lora_state(t) for t in self.transformers]
        active = [_active_adapters(t) for t in self.transformers]
        projections = {name: {k: v.detach().clone() for k, v in p.state_dict().items()}
                       for name, p in self.sla_projections().items()}
        # A LoRA fused by fuse_lora() goes out of the weights first (exactly), and is fused again after: before, it
        # stayed in them under the newly loaded LoRA, which then ran on top of the old one without a word
        fused = bool(self._fused)
        self._unfuse()
        # load_into replaces the adapter of dit_accel's name (an earlier load_weights'): kept, to come back on failure
        kept = [_adapter_copy(t) for t in self.transformers]
        recorded, guarded, unmerged = list(self._adapters), list(self._fuse_guards), len(self._unmerged)
        try:
            with warnings.catch_warnings():  # peft's "multiple adapters" notice: composing them is the point
                warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
                with _keeping_merged(self.transformer, (ADAPTER_NAME,), self._unmerged):  # (it loads into this one)
                    load_into(self, folder)
            for transformer, old, users, state in zip(self.transformers, before, active, states):
                config = getattr(transformer, "peft_config", None) or {}
                new = sorted(a for a in config if a not in old or config[a] is not old[a])
                if not new:
                    continue
                self._adapters.append((transformer, new, state))
                # (an adapter the load replaced, an earlier load_weights' "dit_accel", is not one of the user's: before,
                # the warning below said it was loaded "beside the active adapters ['dit_accel']")
                users = [a for a in users if a not in new]
                if users:
                    # Loading activates only the new adapter; keep the user's active ones on beside it, at the
                    # weights the user gave them (set_adapters makes every weight 1.0), the new one at 1.0.
                    with _keeping_merged(transformer, new, self._unmerged):
                        transformer.set_adapters(users + [a for a in new if a not in users])
                    _restore_scales(transformer, state)
                    self._runtime.warnings.warn(
                        f"weights= loaded LoRA adapter {new} beside the active adapters {users}: both are active "
                        f"({new} at weight 1.0, {users} at the weights you set; change with "
                        f"transformer.set_adapters). remove() deletes {new} and leaves {users} active.")
                self._guard_fuse(transformer)
        except BaseException:
            self._adapters = recorded
            for transformer in self._fuse_guards[len(guarded):]:
                _drop_fuse_guard(transformer, self)
            self._fuse_guards = guarded
            _remerge(self._unmerged, unmerged)
            for transformer, old, users, state, copy in zip(self.transformers, before, active, states, kept):
                config = getattr(transformer, "peft_config", None) or {}
                new = [a for a in config if a not in old or config[a] is not old[a]]
                if new or _lora_state(transformer) != state:
                    _unload_adapters(transformer, new, state)
                    if copy is not None:  # (before: lost, so the handle ran without the LoRA it had loaded)
                        with _keeping_merged(transformer, (ADAPTER_NAME,), self._unmerged):
                            _add_adapter_copy(transformer, copy)
                    if users:
                        with _keeping_merged(transformer, (), self._unmerged):
                            transformer.set_adapters(users)
                        _restore_scales(transformer, state)
            with torch.no_grad():
                for name, proj in self.sla_projections().items():
                    for key, value in proj.state_dict().items():
                        value.copy_(projections[name][key])
            raise
        finally:  # the projections may have changed: read again which are still zero (compiled calls keep it)
            for hook in self._hooks:
                hook.refresh_inert()
            if fused:  # (the old LoRA after a failure, bit for bit as before: the same weights merged again)
                self.fuse_lora()

    def fuse_lora(self) -> int:
        """Fold the LoRA that ``weights=`` loaded into the weights under it, so calls run no LoRA matmuls (on a
        CPU they cost tiny-shapes-63 6-9% of its self-attention time). ``remove()`` puts back the weights as
        they were, bit for bit: a copy of each fused weight is kept until then. For inference between pipeline
        calls; ``transformer.fuse_lora`` stays refused for these adapters. Returns the number of layers fused
        (0 without a ``weights=`` LoRA, or when it is fused already)."""
        self._check_active("fuse_lora()")
        from peft.tuners.tuners_utils import BaseTunerLayer

        fused, before = 0, len(self._fused)
        try:
            for transformer, names, _ in self._adapters:
                for module in transformer.modules():
                    if not isinstance(module, BaseTunerLayer):
                        continue
                    merged = set(module.merged_adapters or ())
                    mine = [a for a in names if a in getattr(module, "lora_A", {}) and a not in merged]
                    if not mine:
                        continue
                    weight = module.get_base_layer().weight
                    self._fused.append((module, mine, weight.detach().clone(), sorted(merged)))
                    module.merge(adapter_names=mine)
                    fused += 1
        except BaseException:  # all or nothing (before: the layers fused so far stayed fused, the rest not)
            self._unfuse(before)
            raise
        return fused

    def _unfuse(self, keep: int = 0) -> None:
        """Undo :meth:`fuse_lora` exactly (the layers it fused after the first ``keep``): each fused layer gets its
        weight copy back. Adapters the user merged into it since (``transformer.fuse_lora(adapter_names=[...])`` of
        their own) are merged again onto that copy: the copy holds none of them, and peft would still count them
        merged (their LoRA lost without a word)."""
        while len(self._fused) > keep:
            module, names, weight, merged_before = self._fused[-1]
            later = [a for a in module.merged_adapters if a not in names and a not in merged_before]
            with torch.no_grad():
                module.get_base_layer().weight.copy_(weight)
            module.merged_adapters[:] = [a for a in module.merged_adapters if a not in names and a not in later]
            self._fused.pop()
            if later:
                module.merge(adapter_names=later)

    def _guard_fuse(self, transformer: nn.Module) -> None:
        """Refuse ``transformer.fuse_lora`` over this handle's adapters (an instance attribute, taken away by
        remove()): remove() deletes the adapters, and fused weights could not be restored exactly."""
        if transformer in self._fuse_guards or not hasattr(transformer, "fuse_lora"):
            return
        handle, fuse = self, transformer.fuse_lora

        def fuse_lora(lora_scale=1.0, safe_fusing=False, adapter_names=None, **kwargs):
            ours = sorted({a for t, names, *_ in handle._adapters if t is transformer for a in names})
            if ours and (adapter_names is None or set(ours) & set([adapter_names] if isinstance(
                    adapter_names, str) else adapter_names)):
                raise RuntimeError(
                    f"dit_accel: fuse_lora(adapter_names={adapter_names!r}) would fuse dit_accel's LoRA adapter "
                    f"{ours} into the weights of {type(transformer).__name__}, and handle.remove() could then not "
                    "restore the model. Call handle.remove() first, or fuse only your own adapters "
                    "(adapter_names=[...])")
            return fuse(lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs)

        fuse_lora._dit_accel_guard = handle
        transformer.__dict__["fuse_lora"] = fuse_lora
        self._fuse_guards.append(transformer)

    def _guard_save(self) -> None:
        """Wrap ``save_pretrained`` of every transformer (an instance attribute, taken away by remove()): the
        model Diffusers would save holds peft's ``base_layer``/``lora_`` keys, which ``from_pretrained`` cannot
        read, and not the SLA projections (they are not submodules)."""
        for transformer in self.transformers:
            if transformer in self._save_guards or not hasattr(transformer, "save_pretrained"):
                continue
            previous = transformer.__dict__.get("save_pretrained", _ABSENT)
            original = getattr(previous, "_dit_accel_original", previous)  # another handle's guard: its original
            if original is _ABSENT:
                original = transformer.save_pretrained
            handle = self

            def save_pretrained(save_directory, *args, _t=transformer, _original=original, **kwargs):
                return handle._save(_t, _original, save_directory, args, kwargs)

            save_pretrained._dit_accel_guard = handle
            save_pretrained._dit_accel_original = original
            save_pretrained._dit_accel_previous = previous
            transformer.__dict__["save_pretrained"] = save_pretrained
            self._save_guards.append(transformer)

    def _save(self, transformer: nn.Module, original, save_directory, args, kwargs):
        """``save_pretrained`` while applied: the base model, then (for the handle's first transformer) the
        weights folder of the handle beside it. Refused, before anything is written, when dit_accel's LoRA
        is merged into the weights (the base model could not be told from it)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        from ..checkpoints.finetuned import METHOD_FILE, save_trained_weights

        ours = self.lora_adapter if self.lora_adapter in (getattr(transformer, "peft_config", None) or {}) else None
        active = _active_adapters(transformer)
        if ours is None and len(active) == 1:  # the user's one active LoRA (load_lora_weights): the folder's LoRA
            ours = active[0]
        tuned = sorted(n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer))
        merged = sorted({a for n in tuned for a in (getattr(transformer.get_submodule(n), "merged_adapters", None)
                                                    or ())})
        cls = type(transformer).__name__
        if merged:
            raise RuntimeError(
                f"dit_accel: save_pretrained({str(save_directory)!r}) is refused: LoRA adapters {merged} are merged "
                f"into the weights of {cls}, so the base model cannot be saved apart from them. Unmerge them "
                "(transformer.unfuse_lora()) first; nothing was written")
        others = sorted(a for a in (getattr(transformer, "peft_config", None) or {}) if a != ours)
        first = transformer is self.transformer
        projections = self.sla_projections() if first else {}
        if others:
            self._runtime.warnings.warn(
                f"dit_accel: save_pretrained({str(save_directory)!r}) saves {cls}'s base model without the LoRA "
                f"adapters {others} (not dit_accel's): save them with the pipeline's save_lora_weights", stacklevel=4)
        base = _base_state(transformer, tuned) if tuned else None
        # The weights folder an earlier save_pretrained under dit_accel left in DIR (another model's LoRA and method)
        # is replaced too, by this handle's method alone: before, it stayed beside the new weights, and
        # apply(load_method(DIR), weights=DIR) ran that method and LoRA on this model without a word. (A
        # `dit-accel finetune` output is the user's own: left as it is.)
        stale = _saved_by_save_pretrained(Path(save_directory) / METHOD_FILE)
        main = kwargs.get("is_main_process", args[0] if args else True)
        with_folder = first and (ours or projections or stale) and main

        def save_model(folder):
            if base is not None:  # the weights under the LoRA layers, by their plain names: what from_pretrained reads
                transformer.__dict__["state_dict"] = lambda *a, **k: base
            try:
                return original(folder, *args, **kwargs)
            finally:
                transformer.__dict__.pop("state_dict", None)

        def save_folder(folder):
            save_trained_weights(
                folder, transformer=transformer, method=self.method,
                lora_config=transformer.peft_config[ours] if ours else None, sla_projections=projections or None,
                adapter_name=ours or "default", extra={"model": cls, "saved_by": "save_pretrained",
                                                        # (the layers that learned beside dense attention: the
                                                        # folder refuses to run them sparse, as finetune's does)
                                                        "dense_layers": sorted(self.schedule.dense_layers) or None})

        gates = self._gates.state_dict_of(transformer) if getattr(self, "_gates", None) is not None else {}
        if main and not kwargs.get("push_to_hub"):
            # The model, VSA's gates (which Diffusers does not save; FastVideo's layout) and the weights folder in one
            # commit: before, the folder came in a second one, which removed the gates the first had written (a
            # VSA model with a LoRA, saved, ran without its gates) and left a kill between the two a new model
            # beside the old LoRA
            from ..checkpoints.finetuned import LORA_FILE, SLA_FILE
            from ..checkpoints.vsa_gates import save_with_gates

            def save(folder):
                result = save_model(folder)
                if with_folder:
                    save_folder(folder)
                return result

            return save_with_gates(save_directory, save, gates,
                                   replaces=(LORA_FILE, SLA_FILE) if with_folder else ())
        result = save_model(save_directory)
        if gates and main:  # (pushed to the hub from the folder: the gates beside it, as before)
            from ..checkpoints.vsa_gates import write_gates

            write_gates(save_directory, gates)
        if with_folder:
            save_folder(save_directory)
        return result

    # ---------------------------------------------------------------- schedule
    def set_step(self, step: Optional[int], total: Optional[int] = None) -> None:
        """Tell a bare transformer which denoising step comes next (``0 <= step < total``).

        Needed for ``dense_steps``/``dense_last_steps`` when apply() got a bare
        transformer and no ``scheduler=``; overrides the scheduler when set. With ``dense_last_steps`` the
        ``total`` is needed too (ValueError without it).
        The step belongs to the calling thread: it applies to the transformer calls this thread makes
        until its next ``set_step``, and never to another thread's calls. ``set_step(None)`` hands this
        thread's calls back to the scheduler.
        """
        self._check_active("set_step()")
        if step is None:
            if total is not None:
                raise ValueError(f"total={total!r} is invalid with step=None: set_step(None) clears the step")
            self._steps.set(None)
            return
        step = _check_int("step", step)
        if total is None and self.schedule.dense_last_steps:  # (without it the last steps ran sparse, unsaid)
            raise ValueError(f"set_step({step}) has no total, but dense_last_steps={self.schedule.dense_last_steps} "
                             f"counts back from the run's last step: call set_step({step}, total)")
        if total is not None:
            total = _check_int("total", total, 1)
            if step >= total:
                raise ValueError(f"step={step} is invalid for total={total}: steps count 0 .. total - 1")
        self._steps.set((step, total))

    def _replace_method(self, method: Method) -> None:
        """Run ``method`` where the schedule ran its main one (``layer_methods`` and dense layers unchanged), from
        the next transformer call on: fine-tuning's VSA sparsity decay changes the sparsity per step."""
        import dataclasses

        self._check_active("_replace_method()")
        if self.schedule.method == method:
            return
        schedule = dataclasses.replace(self.schedule, method=method)
        self.schedule = schedule
        for hook in self._hooks:
            hook.set_schedule(schedule)

    def plan(self, method: Method, grid) -> Plan:
        """The plan ``method`` runs on ``grid`` (the one the attention calls use; built once per geometry): under
        ring context parallelism, the plan of its config for the ranks' shares (:meth:`Method.for_shares`)."""
        self._check_active("plan()")
        _check_method("method", method)
        items = _check_grid(grid)
        ring = self._ring_degree()
        return self._runtime.plans.get(method if ring == 1 else method.for_shares(items, ring), items)

    @property
    def plans(self) -> Dict[tuple, Plan]:
        """Every plan built so far, by ``(method, grid)``."""
        self._check_active("plans")
        return self._runtime.plans.items()

    # --------------------------------------------------------------- reporting
    @property
    def _layers(self) -> List[SparseAttnProcessor]:
        return [layer for hook in self._hooks for layer in hook.layers]

    @property
    def layers(self) -> List[str]:
        """Names of the wrapped attention modules, in layer order."""
        return [layer.name for layer in self._layers]

    @property
    def warnings(self) -> List[str]:
        return list(self._runtime.warnings.messages)

    def stats(self, all_ranks: bool = False) -> List[dict]:
        """Per attention layer (see :meth:`dit_accel.pipelines.stats.Stats.rows`).

        Under context parallelism each rank counts its own calls and the visited density of its
        own share; ``all_ranks=True`` (a collective: call it on every rank) returns every rank's
        rows, each with its ``rank``.
        """
        self._check_active("stats()")
        all_ranks = check_flag("all_ranks", all_ranks)
        methods = [self.schedule.layer_method(layer.index).name for layer in self._layers]
        rows = self._runtime.stats.rows(methods)
        if not all_ranks or not _distributed():
            return rows
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        return [{**row, "rank": rank} for rank, rank_rows in enumerate(gathered) for row in rank_rows]

    def reset_stats(self) -> None:
        """Forget the calls, densities and attention times counted so far: after a warm-up run, :meth:`stats` and
        :meth:`summary` then describe the next runs alone. Plans, kernels and choices already built stay."""
        self._check_active("reset_stats()")
        self._runtime.stats.reset()

    def summary(self, all_ranks: bool = False) -> dict:
        """Totals over layers (and over ranks with ``all_ranks``, a collective): calls, call-weighted mean
        density and sparsity, attention time, the settings: ``config`` as set, ``ran_on_grid`` as it ran on each
        token grid (:meth:`_ran_on_grid`)."""
        self._check_active("summary()")
        s = self.schedule
        return {"method": self.method.name, "config": self.method.ran_dict(), "ran_on_grid": self._ran_on_grid(),
                **self._runtime.stats.summarize(self.stats(all_ranks)), "dense_steps": s.dense_steps,
                "dense_last_steps": s.dense_last_steps, "dense_layers": sorted(s.dense_layers),
                "backend": self.backend, "warnings": self.warnings}

    def _ran_on_grid(self) -> Dict[str, dict]:
        """The method as it ran on each token grid of the calls since :meth:`reset_stats` (as the other summary
        keys count them), by ``"TxHxW"``: its plan's method, which for a ``fit=True`` Tile is the fitted tile and
        window (``config`` says the tile as set, the same on every grid), a ``fit=True`` GNA's clamped kernel
        (:func:`_as_ran`), and under ring context parallelism the config each rank's share ran
        (:meth:`~dit_accel.methods.Method.for_shares`: GNA's tile for one rank's slab); the config itself where the
        method has no plan of its own there (a per-step strategy or plan, or a plan dropped from the cache). Read
        from the plans already built, so no attention call pays for it. The method is the one running now: during
        fine-tuning's VSA sparsity decay, the decay's sparsity, not ``config``'s."""
        seen = set(self._runtime.stats.grids)
        ring = self._ring_degree()
        running = self.schedule.method  # (self.method is the config as set; the decay runs another sparsity)
        out: Dict[tuple, dict] = {}
        for (method, grid), plan in self._runtime.plans.items().items():
            if grid not in seen:
                continue
            if method == running or (ring > 1 and method == running.for_shares(grid, ring)):
                out[grid] = _as_ran(plan.method, grid)
            else:
                out.setdefault(grid, running.ran_dict())
        for grid in seen - set(out):
            out[grid] = running.ran_dict()
        return {"x".join(str(g) for g in grid): out[grid] for grid in sorted(out)}

    def _ring_degree(self) -> int:
        """The ring degree of the wrapped layers' context parallelism (1 without)."""
        from .parallel import Split

        for hook in self._hooks:
            for layer in hook.layers[:1]:
                split = Split.of(layer.parallel) if layer.parallel is not None else None
                if split is not None:
                    return split.ring
        return 1

    def sla_projections(self) -> Dict[str, nn.Linear]:
        """SLA output projections by attention module name (empty unless a layer runs SLA)."""
        self._check_active("sla_projections()")
        return {layer.name: layer.sla_proj for layer in self._layers if layer.sla_proj is not None}

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"AccelHandle({self.method!r}, layers={len(self._layers)}, backend={self.backend!r}, {state})"


def _as_ran(method: Method, grid) -> dict:
    """``method.ran_dict()``; for a ``fit=True`` GNA, with each kernel longer than its extent of ``grid`` as it ran
    there (:meth:`~dit_accel.methods.GNA._fitted_relations`: the whole extent, undilated, its stride at most that),
    which its plan's method does not say (it is the config itself). Per-head kernel sizes are clamped head by head:
    ``kernel_size`` one entry per head, and a stride or dilation that the clamp changed on some heads only, one per
    head too."""
    from ..patterns.checks import per_dim, per_head
    from ..patterns.gna import clamp_to_grid

    out = method.ran_dict()
    if method.name != "gna" or not getattr(method, "fit", False):
        return out
    names = ("kernel_size", "stride", "dilation")
    heads = per_head(method.kernel_size) or [method.kernel_size]
    rows = []  # per head: (kernel_size, stride, dilation) as given, and as it ran
    for kernel in heads:
        given = [per_dim("kernel_size", kernel, len(grid))] + [per_dim(k, getattr(method, k), len(grid))
                                                                for k in names[1:]]
        rows.append((given, clamp_to_grid(grid, *given) or tuple(given)))
    if all(tuple(g) == tuple(r) for g, r in rows):
        return out
    if per_head(method.kernel_size) is None:
        # (only what changed: a stride given as 1 that still is 1 everywhere stays written as given)
        return {**out, **{k: v for k, v, g in zip(names, rows[0][1], rows[0][0]) if v != g}}
    ran = {"kernel_size": [r[0] for _, r in rows]}
    for i, k in enumerate(names[1:], 1):
        values = [r[i] for _, r in rows]
        if any(v != rows[0][0][i] for v in values):
            ran[k] = values[0] if all(v == values[0] for v in values) else values
    return {**out, **ran}


def _unmerge(transformer: nn.Module, names: Sequence[str]) -> bool:
    """Unmerge ``names`` from every peft layer they were merged into (other merged adapters stay merged);
    whether any was."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = False
    for module in transformer.modules():
        merged = list(getattr(module, "merged_adapters", None) or ()) if isinstance(module, BaseTunerLayer) else []
        if any(a in names for a in merged):
            found = True
            module.unmerge()
            others = [a for a in merged if a not in names]
            if others:
                module.merge(adapter_names=others)
    return found


def _drop_fuse_guard(transformer: nn.Module, handle: AccelHandle) -> None:
    if getattr(transformer.__dict__.get("fuse_lora"), "_dit_accel_guard", None) is handle:
        del transformer.__dict__["fuse_lora"]


def _drop_save_guard(transformer: nn.Module, handle: AccelHandle) -> None:
    guard = transformer.__dict__.get("save_pretrained")
    if getattr(guard, "_dit_accel_guard", None) is not handle:
        return
    previous = guard._dit_accel_previous
    if previous is _ABSENT or hasattr(previous, "_dit_accel_guard"):  # none, or a removed handle's guard
        del transformer.__dict__["save_pretrained"]
    else:  # the user's own instance attribute
        transformer.__dict__["save_pretrained"] = previous


_PEFT_FLAG = "_hf_peft_config_loaded"  # Diffusers' "a LoRA was loaded" flag, set on the instance


_ABSENT = object()


def _lora_state(transformer: nn.Module) -> tuple:
    """What unloading must restore: (had LoRA, Diffusers' flag, the names of the modules that were peft layers, and
    each one's adapter scales: the weights ``set_adapters(names, weights)`` gave the user's adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    scales = {n: dict(getattr(m, "scaling", None) or {}) for n, m in layers.items()}
    return (bool(getattr(transformer, "peft_config", None)), transformer.__dict__.get(_PEFT_FLAG, _ABSENT),
            frozenset(layers), scales)


def _restore_scales(transformer: nn.Module, state: tuple) -> None:
    """The adapter scales of ``state`` back on the adapters still there: ``set_adapters(names)`` (which activating
    the user's adapters beside dit_accel's, or again without it, takes) sets every weight to 1.0, so an adapter the
    user ran at 0.5 ran at 1.0 while applied and after remove()."""
    for name, scales in state[3].items():
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            continue
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            scaling.update({a: s for a, s in scales.items() if a in scaling})


def _unload_adapters(transformer: nn.Module, names: Sequence[str], state: tuple) -> None:
    """Delete the LoRA adapters ``names`` (those still there) and put the model back in ``state``
    (:func:`_lora_state`): modules that were plain layers are their own base layers again."""
    had_lora, flag, tuned, _ = state
    now = _lora_state(transformer)  # (the user's adapters keep the weights they run at: set_adapters resets them)
    others = [a for a in (getattr(transformer, "peft_config", None) or {}) if a not in names]
    # No LoRA before and none of anyone else's now: take the peft layers out entirely (the base layers are the
    # originals). An adapter the user loaded since (pipe.load_lora_weights after apply) stays: below, only ours go.
    if not had_lora and not others:
        if getattr(transformer, "peft_config", None) is not None:
            transformer.unload_lora()
        else:  # the user deleted it (delete_adapters): its emptied peft layers stayed, with base_layer keys
            _unwrap_empty(transformer, tuned)
        if flag is _ABSENT:
            transformer.__dict__.pop(_PEFT_FLAG, None)
        else:
            transformer.__dict__[_PEFT_FLAG] = flag
        return
    present = [a for a in names if a in (getattr(transformer, "peft_config", None) or {})]
    users = [a for a in _active_adapters(transformer) if a not in present]
    with _keeping_merged(transformer, (), []):
        if present:
            with warnings.catch_warnings():  # peft notes that the active set changes: that is intended
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                transformer.delete_adapters(present)
        _unwrap_empty(transformer, tuned)
        if users and present:
            transformer.set_adapters(users)
    _restore_scales(transformer, now)


def _unwrap_empty(transformer: nn.Module, tuned) -> None:
    """Each peft layer that only dit_accel's LoRA made (not in ``tuned``, the peft layers before it), now without
    adapters: the plain layer again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(transformer.named_modules()):
        if isinstance(module, BaseTunerLayer) and name not in tuned and not any(
                len(getattr(module, attr, None) or ()) for attr in module.adapter_layer_names):
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent) if parent else transformer, child, module.get_base_layer())


@contextlib.contextmanager
def _keeping_merged(transformer: nn.Module, ours: Sequence[str], unmerged: list):
    """Layers the user fused (``fuse_lora``) stay fused inside (peft's injection and ``set_adapters`` unmerged them all:
    after remove() their LoRA stayed unfused, and ``unload_lora_weights()`` dropped it); after, one where an adapter of
    ``ours`` is active, unmerged (peft's forward would skip it), is unmerged, its weight kept for :func:`_remerge`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    kept = [(m, list(m.merged_adapters)) for m in transformer.modules()
            if isinstance(m, BaseTunerLayer) and m.merged_adapters]
    for module, _ in kept:
        module.merged_adapters.clear()
    try:
        yield
    finally:
        for module, merged in kept:
            module.merged_adapters[:] = merged
            if any(a in module.active_adapters and a not in merged and any(
                    a in (getattr(module, n, None) or {}) for n in module.adapter_layer_names) for a in ours):
                unmerged.append((module, module.get_base_layer().weight.detach().clone(), merged))
                module.unmerge()


def _remerge(unmerged: list, keep: int = 0) -> None:
    """Undo :func:`_keeping_merged`'s unmerging (after the first ``keep``): weights and merged adapters as they were."""
    with torch.no_grad():
        while len(unmerged) > keep:
            module, weight, merged = unmerged[-1]
            module.get_base_layer().weight.copy_(weight)
            module.merged_adapters[:] = merged
            unmerged.pop()


def _base_state(transformer: nn.Module, tuned: Sequence[str]) -> dict:
    """The transformer's state dict with the LoRA layers' base weights under their plain names (what
    ``from_pretrained`` reads) and without the LoRA tensors."""
    base = {}
    for key, value in type(transformer).state_dict(transformer).items():
        owner = next((n for n in tuned if key.startswith(n + ".")), None)
        if owner is None:
            base[key] = value
        elif key.startswith(owner + ".base_layer."):
            base[owner + "." + key[len(owner) + len(".base_layer."):]] = value
    return base


def _adapter_copy(transformer: nn.Module):
    """``(config, tensors)`` of the transformer's adapter of dit_accel's name (copies), or None without one."""
    config = (getattr(transformer, "peft_config", None) or {}).get(ADAPTER_NAME)
    if config is None:
        return None
    from peft.utils import get_peft_model_state_dict

    tensors = get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME)
    return config, {k: v.detach().clone() for k, v in tensors.items()}


def _add_adapter_copy(transformer: nn.Module, copy) -> None:
    """The adapter :func:`_adapter_copy` kept, back in ``transformer`` (its config, its tensors bit for bit)."""
    from peft.utils import set_peft_model_state_dict

    config, tensors = copy
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    set_peft_model_state_dict(transformer, tensors, adapter_name=ADAPTER_NAME)


def _active_adapters(transformer) -> List[str]:
    """The transformer's active LoRA adapters ([] without peft layers)."""
    if not getattr(transformer, "peft_config", None):
        return []
    try:
        return list(transformer.active_adapters())
    except (ValueError, AttributeError):
        return []
