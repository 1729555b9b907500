"""ComfyUI's attention calls turned into the plan calls of the Diffusers path.

Two pieces, both owned by one :class:`Patch` (one ``patch_model`` call):

- :meth:`Patch.wrapper`, a ComfyUI ``diffusion_model`` wrapper (``apply_model`` for a family whose forward runs
  none: ``Family.hook``): per model call it reads the token grid from the latent and the denoising step (the
  sampler's loop index, else the call's place in ``transformer_options``' ``sample_sigmas``), checks a
  :class:`~dit_accel.SparsePlan` against them, and keeps them for the calls below (a context variable: threads
  and nested calls never see each other's);
- :class:`AttentionOverride`, set as ``transformer_options["optimized_attention_override"]``: a call made by one
  of the family's self-attention modules (found on the caller's stack: the override receives no module) runs
  ``Plan.run`` of the layer's method for this step, the same plans (``method.plan(grid)``), kernels and
  self-checks as ``dit_accel.apply``. Every other call (cross-attention, the text refiner, dense steps and
  layers, calls that do not match the grid) goes to the override that was set before, or to ComfyUI's own
  attention.

Settings that leave the method unrun are said once in ComfyUI's log, as ``dit_accel.apply`` warns of them: dense
steps, a per-step strategy or a dense_above_sigma covering a sampler's steps, a plan that is dense (or visits every
key block) at a call's grid, and a model call none of whose self-attention calls reached the override (another
node's, set after it).
"""

from __future__ import annotations

import collections
import contextvars
import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

import torch

from .._util import WarningLog
from ..pipelines.processor import PlanCache
from ..pipelines.schedule import Schedule
from ..pipelines.transformer_hook import warn_unreached_strategy
from .families import Family
from .steps import SEARCH_STEPS, Places, step_of

__all__ = ["Patch", "AttentionOverride", "CallState", "attention_spaces", "replaced_attention"]

LOG = logging.getLogger("dit_accel.comfyui")

# optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False)
_ARGS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")

# Frames between the override and the module that made the call: ComfyUI's wrap_attn wrapper, then at most a
# helper such as comfy.ldm.flux.math.attention (HunyuanVideo's blocks) before the module's forward.
_STACK_DEPTH = 6
#: What sets a custom sampler's step count, in a refusal of a plan's steps (the plan's own hint names a KSampler)
_CUSTOM_STEPS = ("the steps of the scheduler node whose sigmas the custom sampler takes, e.g. BasicScheduler's; "
                 "sigmas written by hand count as a whole schedule of their own")
# Frames between the override and ComfyUI's wrap_attn wrapper: those of overrides set after this one that hand the
# call on to it (ComfyUI's sparse-attention node, a chain of decorators), none where it is the last one set.
_CHAIN_DEPTH = 32


@dataclass(frozen=True)
class CallState:
    """What one diffusion-model call knows: its token grid, its step ``(step, total)`` and sigma if sampled, the
    exact number of tokens off the grid its self-attention calls hold (None: any number, as text), and of those the
    reference tokens on the grid's other side from the text (``Family.references``: after the grid when text
    leads, before it when text trails)."""

    grid: Tuple[int, ...]
    step: Optional[int]
    total: Optional[int]
    sigma: Optional[float]
    off_grid: Optional[int] = None
    references: int = 0

    @property
    def num_video(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n


class Report:
    """What ran, per diffusion-model call: logged when it changes (method, density, backend), kept for
    :meth:`Patch.summary`."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.calls: Dict[int, tuple] = {}  # layer -> (method name, density, backend) or ("dense", reason, None)
        self.last_line: Optional[tuple] = None
        self.lines: Deque[str] = collections.deque(maxlen=1000)  # the latest model calls (a long session is bounded)

    def sparse(self, layer: int, method, density, backend: str, token_density: Optional[float] = None) -> None:
        self.calls[layer] = (method, density, backend, token_density)

    def dense(self, layer: int, reason: str) -> None:
        self.calls[layer] = ("dense", reason, None)

    def flush(self, state: CallState) -> bool:
        """Log the call's layers; False when no layer made a call."""
        if not self.calls:
            return False
        calls, self.calls = self.calls, {}
        sparse = [c for c in calls.values() if c[0] != "dense"]
        dense = [c for c in calls.values() if c[0] == "dense"]
        head = f"dit_accel: {self.model_name} grid {tuple(state.grid)}"
        if state.references:
            head += f" + {state.references} reference tokens (dense)"
        parts = []
        if sparse:
            densities = [float(c[1]) for c in sparse if c[1] is not None]
            methods = sorted({repr(c[0]) for c in sparse})
            density = f"{sum(densities) / len(densities):.3f}" if densities else "per call"
            tokens = [c[3] for c in sparse if c[3] is not None]
            # the kernel visits whole blocks; the pattern's own density is this, said only where every sparse layer
            # has one (before: a PerHead's layer, which has none, was left out of the "mean", as Diffusers' stats do)
            if tokens and len(tokens) == len(sparse):
                density += f" (tokens {sum(tokens) / len(tokens):.3f})"
            parts.append(f"{len(sparse)} layers sparse ({'; '.join(methods)}), mean density {density}, backend "
                         f"{'/'.join(sorted({c[2] for c in sparse}))}")
        if dense:
            parts.append(f"{len(dense)} layers dense ({'; '.join(sorted({str(c[1]) for c in dense}))})")
        body = ", ".join(parts)
        step = "" if state.step is None else f" step {state.step}/{state.total}"
        self.lines.append(f"{head}{step}: {body}")
        if (head, body) != self.last_line:  # one line per change, not one per step
            self.last_line = (head, body)
            LOG.info(self.lines[-1])
        return True


class Patch:
    """The state of one ``patch_model``: family, layers, schedule, plans, report. Shared by the wrapper and the
    override (and by clones of the patched model: ComfyUI's clone deep-copies the override, which keeps this)."""

    def __init__(self, family: Family, model: torch.nn.Module, layers: List[torch.nn.Module], schedule: Schedule,
                 backend: str, dense_above_sigma: Optional[float], call_check):
        self.family, self.schedule, self.backend = family, schedule, backend
        self.dense_above_sigma = dense_above_sigma
        self.call_check = call_check  # (grid, total steps) -> None: a SparsePlan's checks (raises on a mismatch)
        self.model_name = type(model).__name__
        self.layer_of = {id(m): i for i, m in enumerate(layers)}
        self.num_layers = len(layers)
        # the layers whose calls hold the grid alone (Family.alone): no token off it
        self.alone = frozenset(self.layer_of[id(m)] for m in (family.alone(model) if family.alone else ()))
        self.plans = PlanCache()
        self.projections: Dict[int, torch.nn.Module] = {}  # layer -> SLA projection (fine-tuned weights)
        self.report = Report(self.model_name)
        self.warnings = WarningLog(emit=LOG.warning)  # said in ComfyUI's log, once each
        self._sigmas_seen = None  # the last schedule dense_above_sigma was checked against
        self._places = Places()  # where a custom sampler's sigmas sit in a whole schedule (once per sampling run)
        self.expert = None  # which of Wan 2.2 A14B's experts this MODEL was said to be, where the weights hold both
        self._expert_seen = None  # the last schedule the expert was checked against
        self._model = model
        self._attention_spaces = attention_spaces(model)  # (where its code finds ComfyUI's attention functions)
        self._call: contextvars.ContextVar = contextvars.ContextVar(f"dit_accel_comfyui_{id(self)}", default=None)

    # ---------------------------------------------------------------- the diffusion_model wrapper
    def wrapper(self, executor, x, *args, **kwargs):
        """ComfyUI ``WrappersMP.DIFFUSION_MODEL`` wrapper (``WrappersMP.APPLY_MODEL`` for a family whose hook is
        ``apply_model``): the call's grid and step, for the attention calls."""
        owner = getattr(executor, "class_obj", None)
        apply_model = self.family.hook == "apply_model"
        model = getattr(owner, "diffusion_model", None) if apply_model else owner
        model = getattr(model, "_orig_mod", model)  # (TorchCompileModel swaps in torch.compile's module around it)
        if model is not self._model:  # another diffusion model run with these options: not ours to change
            return executor(x, *args, **kwargs)
        options = kwargs.get("transformer_options")
        if not isinstance(options, dict):
            options = next((a for a in reversed(args) if isinstance(a, dict)), {})
        at = step_of(options, sys._getframe(1), self._places, search=self._counts_steps())
        step, total, sigma, first = at.step, at.total, at.sigma, at.first
        if not at.placed:
            self._warn_unplaced(options.get("sample_sigmas"), total)
        if self.expert is not None:
            self._warn_expert(options.get("sample_sigmas"), first)
        if at.sampler is not None and total is not None:
            self._warn_unlooped(at.sampler, options.get("sample_sigmas"), total)
        call = _named(executor, x, args, kwargs)
        if apply_model:
            call = _as_model_call(model, call)
        family = self.family
        grid = family.grid(model, x, call)
        off_grid = None if family.off_grid is None else family.off_grid(model, x, call, grid)
        references = 0 if family.references is None else family.references(model, x, call, grid)
        if off_grid is not None:
            off_grid += references
        state = CallState(grid, step, total, sigma, off_grid, references)
        if self.call_check is not None:
            self._check_call(state.grid, total, options.get("sample_sigmas"), first, options.get("context_window"),
                             at.custom)
        if total is not None:
            self._warn_steps(total, options.get("sample_sigmas"), first)
        token = self._call.set(state)
        try:
            out = executor(x, *args, **kwargs)
        finally:
            self._call.reset(token)
            reached = self.report.flush(state)
        if not reached and self.num_layers:
            self._warn_unreached(options)
        return out

    def _check_call(self, grid, total: Optional[int], sigmas, first: int, window=None, custom: bool = False) -> None:
        """A plan's checks of the call (:func:`~.patch._call_check`); a refused step count of a sampler running part
        of a schedule says which part, and what its step count is (the KSampler's steps is not, at denoise < 1); a
        refused grid of a call that ComfyUI's context windows made (``window``) says that the model runs a window of
        the latent, not the latent the user sized (whose size the plan may well have)."""
        try:
            self.call_check(grid, total)
        except ValueError as err:
            if custom and "the KSampler's steps" in str(err):  # (a custom sampler has none: its sigmas set the steps)
                err = ValueError(str(err).replace("the KSampler's steps", _CUSTOM_STEPS))
            length = getattr(window, "context_length", None)
            if length is not None and "token grid" in str(err):
                raise ValueError(f"{err} (this call is one of ComfyUI's context windows, set by a Context Windows "
                                 f"node: the model runs {length} latent entries of dim {getattr(window, 'dim', '?')} at "
                                 f"a time, not the whole latent, so this grid is the window's: calibrate the plan at "
                                 "the window's size, or leave the context windows out)") from None
            count = sigmas.numel() - 1 if isinstance(sigmas, torch.Tensor) else None
            if total is None or count is None or count >= total or "steps" not in str(err):
                raise err from None
            raise ValueError(f"{err} (this sampler runs steps {first}-{first + count - 1} of the {total}-step schedule: "
                             "denoise below 1 runs the last steps of int(steps / denoise), KSamplerAdvanced's start/end "
                             "steps or SplitSigmas a part of its steps; a plan's steps are the whole schedule's)") from None

    def _warn_steps(self, total: int, sigmas, first: int = 0) -> None:
        """As ``dit_accel.apply`` says them, once per step count: dense steps or a per-step strategy that leave
        no step of this sampler's ``total`` sparse (a 4-step run with the dense_steps of a 30-step one); and, once
        per schedule, a dense_above_sigma below every step's sigma (flow models' sigmas stay high: Wan's last step
        of 30 starts near 0.2), or at or above every one of a schedule run from its top (a sigma of another model's
        scale: SD's 14.6 on a flow model, whose sigmas run from 1), where no step runs dense."""
        schedule = self.schedule
        if schedule.sparse and schedule.dense_steps + schedule.dense_last_steps >= total:
            self.warnings.warn(f"dit_accel: dense_steps={schedule.dense_steps} + dense_last_steps="
                               f"{schedule.dense_last_steps} cover all {total} sampling steps of this sampler: every "
                               "step runs dense. Lower them or raise the number of steps",
                               key=("dense steps", total))
        elif schedule.sparse and isinstance(sigmas, torch.Tensor) and sigmas.numel() - 1 < total:
            self._warn_dense_part(total, first, sigmas.numel() - 1)
        for method in schedule.methods():
            warn_unreached_strategy(method, total, self.warnings)
        threshold = self.dense_above_sigma
        if (schedule.sparse and threshold is not None and isinstance(sigmas, torch.Tensor)
                and sigmas.numel() > 1 and sigmas is not self._sigmas_seen):
            self._sigmas_seen = sigmas  # (one host sync per schedule, not per model call)
            column = sigmas.detach().reshape(-1)[:-1]  # (this sampler's steps: a part's too)
            lowest, highest = float(column.min()), float(column.max())
            if lowest > threshold:
                self.warnings.warn(f"dit_accel: dense_above_sigma={threshold:g} is below the sigma of every step of "
                                   f"this sampler (the last starts at {lowest:.4g}): every step runs dense. Raise it "
                                   "(calls above it run dense), or set 0 (off)", key=("dense sigma", threshold, lowest))
            elif first == 0 and highest <= threshold:  # (a later part of a schedule may lie below it all: its own)
                self.warnings.warn(f"dit_accel: dense_above_sigma={threshold:g} is at or above the sigma of every "
                                   f"step of this sampler (the first starts at {highest:.4g}, the top of this model's "
                                   "schedule): no step runs dense. Lower it below that (calls above it run dense; a "
                                   "flow model's sigmas, Wan's, FLUX's, run from 1 down), or set 0 (off)",
                                   key=("dense sigma", threshold, highest))

    def _warn_dense_part(self, total: int, first: int, count: int) -> None:
        """Once per part: dense steps that cover every step of a sampler running part of a schedule (steps 0-9 of 20
        on Wan 2.2 A14B's high-noise expert with dense_steps=10), which then runs dense."""
        schedule, last = self.schedule, first + count - 1
        if all(s < schedule.dense_steps or s >= total - schedule.dense_last_steps for s in range(first, last + 1)):
            self.warnings.warn(f"dit_accel: dense_steps={schedule.dense_steps} + dense_last_steps="
                               f"{schedule.dense_last_steps} cover steps {first}-{last} of {total}, all the steps this "
                               "sampler runs (its part of the schedule: KSamplerAdvanced's start/end steps, denoise "
                               "below 1, SplitSigmas): every step runs dense. Steps count in the whole schedule; "
                               "lower them",
                               key=("dense part", first, count, total))

    def _counts_steps(self) -> bool:
        """Whether a step's place in the whole schedule changes what runs: dense steps, a per-step method (a plan's
        phases) or a plan's recorded step count."""
        return self._needs_step() or self.call_check is not None

    def _warn_unplaced(self, sigmas, total: int) -> None:
        """Once per step count: a custom sampler's sigmas that are neither a whole schedule nor a piece found in one of
        ComfyUI's schedulers' (:class:`~.steps.Places`), whose steps then count as a whole schedule's."""
        ends = ""
        if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 1:
            column = sigmas.detach().reshape(-1)
            ends = f" (sigmas {float(column[0]):.4g} to {float(column[-1]):.4g})"
        self.warnings.warn(f"dit_accel: this custom sampler's {total} steps{ends} are not a whole schedule (from the "
                           "model's sigma_max to 0) nor a piece dit_accel finds in a schedule of ComfyUI's schedulers "
                           f"(BasicScheduler's, up to {SEARCH_STEPS} steps, cut by denoise, SplitSigmas or "
                           f"SplitSigmasDenoise), so dense_steps, dense_last_steps and a plan's steps count them as "
                           f"steps 0-{total - 1} of a {total}-step schedule. For a part of a schedule, cut "
                           "BasicScheduler's sigmas with SplitSigmas, or sample with KSamplerAdvanced's start/end "
                           "steps", key=("unplaced", total))

    def _warn_expert(self, sigmas, first: int) -> None:
        """Once per schedule: a folder of both Wan 2.2 A14B experts loaded with the ``expert`` of the other part of
        the schedule. The two experts' MODELs are alike (same class and shapes); their samplers tell them apart: the
        high-noise expert's runs the first steps (``first`` 0) and stops short of sigma 0 (KSamplerAdvanced's
        end_at_step, leftover noise returned), the low-noise expert's the last ones, from a later step to 0."""
        if not isinstance(sigmas, torch.Tensor) or sigmas.numel() < 2 or sigmas is self._expert_seen:
            return
        self._expert_seen = sigmas  # (one host sync per schedule, not per model call)
        column = sigmas.detach().reshape(-1)
        top, end = float(column[0]), float(column[-1])
        high, low = first == 0 and end > 0, first > 0 and end == 0
        if not {"transformer": low, "transformer_2": high}.get(self.expert):
            return
        part, other = ("low", "transformer_2") if low else ("high", "transformer")
        self.warnings.warn(f"dit_accel: this {self.model_name} was given expert={self.expert} (the folder's "
                           f"{'high' if low else 'low'}-noise expert's weights), but its sampler runs the "
                           f"{'last' if low else 'first'} steps of the schedule (from step {first}, sigmas "
                           f"{top:.4g} to {end:.4g}), the {part}-noise expert's part of Wan 2.2 A14B's schedule: if "
                           f"this MODEL is the {part}-noise expert, set expert={other} on its dit_accel fine-tuned "
                           "weights node",
                           key=("expert", first, top, end))

    def _warn_unlooped(self, sampler: str, sigmas, total: int) -> None:
        """Once per sampler and step count, where the last step matters (dense_last_steps, a per-step method):
        ``dpm_fast`` and ``dpm_adaptive`` (:data:`~.steps.UNLOOPED`) integrate from sigma_max down to the last step's
        sigma and call the model at none below it, so no call of theirs falls in the last step (of sigmas that end at
        0: ComfyUI has them integrate down to a part's last sigma where it is not 0)."""
        schedule = self.schedule
        per_step = any(hasattr(m, "for_layer_step") for m in schedule.methods())
        if not (schedule.dense_last_steps or per_step) or not isinstance(sigmas, torch.Tensor) or sigmas.numel() < 2:
            return
        column = sigmas.detach().reshape(-1)
        if float(column[-1]) != 0:  # (a part ending above 0: ComfyUI has them integrate down to its last sigma)
            return
        last = f" ({float(column[-2]):.4g})"
        n = schedule.dense_last_steps
        runs = ("" if not n else f": dense_last_steps={n} runs no call dense" if n == 1 else
                f": dense_last_steps={n} runs dense the calls of steps {total - n}-{total - 2} only")
        self.warnings.warn(f"dit_accel: the {sampler} sampler makes no model call in the last of its {total} steps (it "
                           f"integrates from sigma_max down to the last step's sigma{last} and stops there), so what "
                           f"dit_accel sets for step {total - 1}{' (a plan phase)' if per_step else ''} never runs"
                           f"{runs}. Sample with a sampler that steps through the sigmas (euler, dpmpp_2m) for "
                           "a dense last step", key=("unlooped", sampler, total))

    def _warn_unreached(self, options: dict) -> None:
        """Once: a model call none of whose self-attention calls reached this patch's override, because the
        call's ``optimized_attention_override`` is another node's that does not hand calls on to it."""
        current = options.get("optimized_attention_override")
        if isinstance(current, AttentionOverride) and current.patch is self:
            # ours: a model call that skipped its blocks (a cache node's), unless the model's attention function was
            # replaced after the node ran (patch_model refuses one replaced before), which runs every call as its own
            replaced = replaced_attention(self._attention_spaces)
            if replaced is not None:
                self.warnings.warn(f"dit_accel: no self-attention call of {self.model_name} reached dit_accel: "
                                   f"ComfyUI's attention function {replaced} was replaced (by a custom node, after the "
                                   "dit_accel node ran) with one that does not call transformer_options["
                                   "'optimized_attention_override'], so the model runs without dit_accel's method. "
                                   "Remove that node (for SageAttention, start ComfyUI with --use-sage-attention "
                                   "instead), or remove the dit_accel node", key=("replaced", replaced))
            return
        what = "none" if current is None else getattr(current, "__qualname__", type(current).__qualname__)
        self.warnings.warn(f"dit_accel: no self-attention call of {self.model_name} reached dit_accel: the sampled "
                           f"MODEL's transformer_options['optimized_attention_override'] is another node's ({what}), "
                           "set after the dit_accel node, which runs them without handing them on, so the model runs "
                           "without dit_accel's method (that node's attention, or ComfyUI's). Put that node before the "
                           "dit_accel node (dit_accel hands every call it does not make sparse on to it), or remove "
                           "one of them", key="unreached")

    # ---------------------------------------------------------------- per attention call
    def layer_from_stack(self, frame, q=None) -> Optional[int]:
        """The layer index of the module whose ``forward`` made this call: the innermost ``self`` on the stack
        that is a module decides (a cross-attention module is one too, and is not a layer), or, first, the
        family's ``caller`` for a frame it knows (SD3's ``_block_mixing``: ``q`` tells its two calls apart)."""
        caller = self.family.caller
        frame = _attention_entry(frame) or frame  # (past the frames of overrides set after this one)
        for _ in range(_STACK_DEPTH):
            if frame is None:
                return None
            owner = caller(frame, q) if caller is not None else None
            if owner is not None:
                return self.layer_of.get(id(owner))
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.nn.Module):
                return self.layer_of.get(id(owner))
            frame = frame.f_back
        return None

    def method_for(self, layer: int, state: CallState):
        """``(method or None, why dense)`` for ``layer`` in this call."""
        if self.dense_above_sigma is not None and state.sigma is not None and state.sigma > self.dense_above_sigma:
            return None, f"sigma {state.sigma:.4g} > dense_above_sigma {self.dense_above_sigma:g}"
        if layer in self.schedule.dense_layers:
            return None, "dense layer"
        if state.step is None and self._needs_step():
            raise ValueError("dit_accel: dense_steps/dense_last_steps and plans with steps need the sampling step, "
                             f"but {self.model_name} was called outside a ComfyUI sampler (no sample_sigmas in "
                             "transformer_options): sample with a KSampler, or patch without step options")
        step, schedule = state.step or 0, self.schedule
        method = schedule.method_for(layer, step, state.total)
        if method is not None:
            return method, None
        # (a strategy's or plan's own dense entry, or a layer it leaves out, is no dense step of the node's widgets)
        last = schedule.dense_last_steps and state.total is not None and step >= state.total - schedule.dense_last_steps
        return None, "dense step" if step < schedule.dense_steps or last else "dense in the plan or strategy here"

    def warn_no_speedup(self, layer: int, method, plan) -> None:
        """As ``dit_accel.apply`` says them, once per method and grid: a plan that runs dense (a window covering the
        grid: settings for a larger video) or visits every key block. Not for a per-step method or plan, whose
        full windows are chosen."""
        if method.name == "dense" or hasattr(self.schedule.layer_methods.get(layer, self.schedule.method),
                                             "for_layer_step"):
            return
        if not self.warnings.first((plan.is_dense, method, plan.grid)):  # (each call: the message is built once)
            return
        where = f"{method!r} on {self.model_name} layer {layer} (and every layer it runs on)"
        if plan.is_dense:
            LOG.warning(f"dit_accel: {where}: {plan.dense_reason}, so it runs dense attention (no speedup)")
        else:
            LOG.warning(f"dit_accel: {where} visits every key block of grid {tuple(plan.grid)}: it masks tokens inside "
                        "the blocks but saves no work (no speedup); a larger grid or a smaller window or block makes it "
                        "sparse")

    def _needs_step(self) -> bool:
        s = self.schedule
        return bool(s.dense_steps or s.dense_last_steps
                    or any(hasattr(m, "for_layer_step") for m in s.methods()))

    def plan(self, method, grid):
        """The method's plan at ``grid``; a grid it refuses (GNA's kernel of 7 frames on a 3-frame latent) said as
        dit_accel's, with the model and this call's grid: ComfyUI shows it on the sampler node, not on ours, and the
        grid is known only when the sampler calls the model."""
        try:
            return self.plans.get(method, grid)
        except ValueError as err:
            # (the pattern's advice names its Python API; on ComfyUI it is the node's fit widget)
            text = str(err).replace(f"{type(method).__name__}(..., fit=True)", "the node's fit widget (on)")
            raise ValueError(f"dit_accel: {method!r} cannot run on the token grid {tuple(grid)} of this "
                             f"{self.model_name} call (the latent's size in patches): {text}") from None

    def current(self) -> Optional[CallState]:
        return self._call.get()

    def projection(self, layer: int, like: torch.Tensor):
        """The layer's SLA projection on ``like``'s device (moved once), or None. Kept in fp32, as
        ``dit_accel.apply`` keeps it: a bf16 model's calls project the linear branch in fp32 there too (and a
        cast in place would round the folder's weights for every later call)."""
        proj = self.projections.get(layer)
        if proj is not None and proj.weight.device != like.device:
            proj.to(device=like.device)
        return proj


class AttentionOverride:
    """``transformer_options["optimized_attention_override"]``: see the module docstring.

    ``previous``: the override that was set before (ComfyUI's sparse-attention node, SageAttention patches),
    which gets every call this one declines.
    """

    def __init__(self, patch: Patch, previous=None):
        self.patch, self.previous = patch, previous

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: plans and state are shared
        return self

    def decline(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        patch = self.patch
        state = patch.current()
        if state is None:
            return self.decline(func, args, kwargs)
        layer = patch.layer_from_stack(sys._getframe(1), args[0] if args else kwargs.get("q"))
        if layer is None:  # cross-attention, a text refiner, another model's module: not a video self-attention
            return self.decline(func, args, kwargs)
        method, why = patch.method_for(layer, state)
        plan = None if method is None else patch.plan(method, state.grid)
        if plan is not None and (plan.is_dense or (plan.density or 0.0) >= 1.0):
            patch.warn_no_speedup(layer, method, plan)
        if plan is None or plan.is_dense:
            patch.report.dense(layer, why if plan is None else plan.dense_reason)
            return self.decline(func, args, kwargs)
        call = dict(zip(_ARGS, args))
        call.update(kwargs)
        routed = self._route(call, plan, state, layer)
        if routed is None:
            return self.decline(func, args, kwargs)
        return routed

    def _route(self, call: dict, plan, state: CallState, layer: int):
        """The plan's output in the layout ComfyUI asked for, or None (after a warning) for a call that does
        not fit the grid, which then runs as ComfyUI's own."""
        patch = self.patch
        q, k, v, heads = call["q"], call["k"], call["v"], int(call["heads"])
        if call.get("skip_reshape"):
            b = q.shape[0]
        else:
            b, d = q.shape[0], q.shape[-1] // heads
            q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        s, n = q.shape[2], state.num_video
        alone = layer in patch.alone  # (SD3.5's attn2, OmniGen2's image refiner: the grid alone)
        refs, off_grid = (0, 0) if alone else (state.references, state.off_grid)
        num_text = s - n
        position = patch.family.text_position
        text_first = position == "first"
        key_mask, mask_ok = _key_mask(call.get("mask"), s, q.shape[0])
        fits = (k.shape[2] == s and v.shape[2] == s and mask_ok
                and (num_text == 0 if position == "none" else num_text >= refs)
                and (off_grid is None or num_text == off_grid))
        if fits and refs:
            # The references join the text ([text, grid, refs] -> [text, refs, grid]; [refs, grid, text] ->
            # [grid, text, refs]), as the Diffusers path routes them; moved back after the plan has run.
            start, length = (num_text - refs, n) if text_first else (0, refs)
            q, k, v = (_to_end(t, 2, start, length) for t in (q, k, v))
            key_mask = None if key_mask is None else _to_end(key_mask, 3, start, length)
        fits = fits and (key_mask is None or _video_keys_unmasked(key_mask, n, text_first))
        if not fits:
            patch.report.dense(layer, "call does not match the grid")
            mask = type(call.get("mask")).__name__
            # once per kind of call: every layer of every step makes it (thousands of lines in ComfyUI's log)
            if patch.warnings.first(("unmatched call", tuple(state.grid), s, k.shape[2], mask, off_grid, refs)):
                LOG.warning("dit_accel: %s layer %d made an attention call of %d queries / %d keys (mask %s) that "
                            "does not match the token grid %s (%d tokens; off it: %s, of which %d reference tokens); "
                            "it runs ComfyUI's own attention, as does every such call (said once)", patch.model_name,
                            layer, s, k.shape[2], mask, state.grid, n, "any number" if off_grid is None else off_grid,
                            refs)
            return None
        out, density = plan.run(q, k, v, num_text=num_text, text_first=text_first, key_mask=key_mask,
                                backend=patch.backend, proj=patch.projection(layer, q))
        patch.report.sparse(layer, plan.method, density, plan.backend_for(q, k, v, patch.backend), plan.token_density)
        if refs:
            out = _to_end(out, 2, *((num_text - refs, refs) if text_first else (0, s - refs)))
        if call.get("skip_output_reshape"):
            return out
        return out.transpose(1, 2).reshape(b, s, -1)


#: The names a ComfyUI model's code calls ComfyUI's attention by (each a ``wrap_attn`` wrapper in ComfyUI 0.3.64).
_ATTENTION_NAMES = ("optimized_attention", "optimized_attention_masked")


def attention_spaces(model: torch.nn.Module) -> List[Tuple[str, dict]]:
    """``[(module name, its globals)]``: where the code of a ComfyUI ``model`` looks up ComfyUI's attention by name
    (:data:`_ATTENTION_NAMES`): ComfyUI's ``comfy.ldm.modules.attention`` (LTX-Video calls it through the module), the
    ``comfy.*`` modules that define the model's classes (``comfy.ldm.wan.model``), and those of the helpers they call
    (``comfy.ldm.flux.math`` of ``attention``, which FLUX's and Chroma's blocks import). Read once per patch; the
    functions are looked up in them at each check (a custom node may replace one later)."""
    spaces: Dict[str, dict] = {}
    for name in ("comfy.ldm.modules.attention", *sorted({type(m).__module__ for m in model.modules()})):
        module = sys.modules.get(name)
        if module is None or not name.startswith("comfy.") or name in spaces:
            continue
        spaces[name] = vars(module)
        for value in list(vars(module).values()):
            helper = getattr(value, "__globals__", None) if inspect.isfunction(value) else None
            if isinstance(helper, dict) and str(helper.get("__name__", "")).startswith("comfy."):
                spaces.setdefault(helper["__name__"], helper)
    return list(spaces.items())


def replaced_attention(spaces: List[Tuple[str, dict]]) -> Optional[str]:
    """The first ComfyUI attention function in ``spaces`` (:func:`attention_spaces`), as ``module.name``, that does
    not hand its calls to ``transformer_options["optimized_attention_override"]`` (ComfyUI's ``wrap_attn`` does: an
    older ComfyUI's, or a function a custom node set in its place, may not), probed on a 1-token call; None: all do."""
    q = torch.zeros(1, 1, 1)
    for name, space in spaces:
        for attr in _ATTENTION_NAMES:
            function, seen = space.get(attr), []
            if not callable(function):
                continue

            def probe(func, q, *args, **kwargs):
                seen.append(func)
                return q

            try:
                function(q, q, q, 1, transformer_options={"optimized_attention_override": probe})
            except Exception:  # noqa: BLE001 (a function without transformer_options: not ComfyUI's wrapper)
                pass
            if not seen:
                return f"{name}.{attr}"
    return None


def _attention_entry(frame):
    """The frame of ComfyUI's ``wrap_attn`` wrapper (``comfy.ldm.modules.attention``) that called the chain of
    attention overrides this call came through, from ``frame`` up; None where there is none (another ComfyUI)."""
    for _ in range(_CHAIN_DEPTH):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "wrapper" and "remove_attn_wrapper_key" in code.co_varnames:
            return frame
        frame = frame.f_back
    return None


def _named(executor, x, args, kwargs) -> dict:
    """The diffusion-model call's arguments by name, for the family (``vace_context``, ``context``, ...): bound to
    the signature of the model's ``_forward`` that the executor runs, its ``**kwargs`` merged in; the keyword
    arguments alone where that signature cannot be read."""
    try:
        bound = inspect.signature(executor.original).bind(x, *args, **kwargs)
    except (AttributeError, TypeError, ValueError):
        return dict(kwargs)
    named = dict(bound.arguments)
    for p in bound.signature.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            named.update(named.pop(p.name, None) or {})
    return named


def _as_model_call(model: torch.nn.Module, applied: dict) -> dict:
    """The diffusion model's arguments by name from those of ``BaseModel._apply_model``, as it calls the model
    (``c_crossattn`` as ``context``, the extra conditions by name), with the defaults of the model's ``forward``
    for those it leaves out (Mochi's ``num_tokens`` without an attention mask)."""
    call = {k: v for k, v in applied.items() if k not in ("c_crossattn", "c_concat")}
    call["context"] = applied.get("c_crossattn")
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return call
    for p in parameters:
        if p.default is not p.empty and p.name not in call:
            call[p.name] = p.default
    return call


def _key_mask(mask, s: int, batch: int):
    """``(key mask (B or 1, 1, 1, S), ok)`` from ComfyUI's mask: None, or a per-key mask of ``s`` entries
    (HunyuanVideo's additive text padding mask ``(1, 1, S)``), one for the batch or one per sample. A mask per
    query row, or per head (``(B, H, 1, S)``: its rows are no samples), cannot be made sparse: not ok."""
    if mask is None:
        return None, True
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0 or mask.shape[-1] != s or mask.numel() % s:
        return None, False
    if mask.dim() >= 2 and mask.shape[-2] != 1:
        return None, False
    if mask.dim() == 4 and mask.shape[1] != 1:
        return None, False
    rows = mask.numel() // s
    if rows not in (1, batch):
        return None, False
    return mask.reshape(rows, 1, 1, s), True


def _to_end(t: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """``t`` with its ``length`` tokens from ``start`` (on ``dim``) moved to the end: [a, b, c] -> [a, c, b]."""
    return torch.cat([t.narrow(dim, 0, start), t.narrow(dim, start + length, t.shape[dim] - start - length),
                      t.narrow(dim, start, length)], dim=dim)


def _video_keys_unmasked(mask: torch.Tensor, num_video: int, text_first: bool) -> bool:
    """Whether a key mask leaves every video key as it is (the sparse part takes no mask): one host sync."""
    video = mask[..., -num_video:] if text_first else mask[..., :num_video]
    return bool(video.all()) if mask.dtype == torch.bool else not bool(video.any())
