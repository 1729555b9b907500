"""Which method each attention layer runs at each denoising step, and where the step comes from.

:class:`Schedule` is pure data (no state): ``method_for(layer, step, total)``.
:class:`StepSource` reads the step of each transformer call from that call: the calling
thread's ``set_step``, else the position of the scheduler of the pipeline making the call
(found on the calling thread's stack; classifier-free guidance calls the transformer twice
per step and both calls get the same step), or the call's timestep for schedulers without
``step_index``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Optional, Tuple

import torch

from ..methods import Dense, Method

__all__ = ["Schedule", "StepSource"]


@dataclass(frozen=True)
class Schedule:
    """``method`` everywhere, except ``layer_methods[i]`` on layer ``i``, and dense on ``dense_layers``,
    the first ``dense_steps`` and the last ``dense_last_steps`` denoising steps."""

    method: Method
    layer_methods: Dict[int, Method] = field(default_factory=dict)
    dense_layers: FrozenSet[int] = frozenset()
    dense_steps: int = 0
    dense_last_steps: int = 0

    def method_for(self, layer: int, step: int, total: Optional[int]) -> Optional[Method]:
        """The method layer ``layer`` runs at ``step`` of ``total``, or None where the schedule makes it dense.

        A method whose settings change per layer and step (``TileStrategy``: FastVideo's
        searched windows) resolves here through its ``for_layer_step(layer, step)``, which
        returns the method to run or None (dense).
        """
        if layer in self.dense_layers or step < self.dense_steps:
            return None
        if self.dense_last_steps and total is not None and step >= total - self.dense_last_steps:
            return None
        method = self.layer_methods.get(layer, self.method)
        resolve = getattr(method, "for_layer_step", None)
        return method if resolve is None else resolve(layer, step)

    def layer_method(self, layer: int) -> Method:
        """The method a layer runs on its sparse steps (``Dense()`` on dense layers)."""
        return Dense() if layer in self.dense_layers else self.layer_methods.get(layer, self.method)

    def methods(self) -> Tuple[Method, ...]:
        """Every method some layer may run (plans for a new grid are built for each)."""
        return tuple(dict.fromkeys((self.method, *self.layer_methods.values())))

    @property
    def sparse(self) -> bool:
        return any(not isinstance(m, Dense) for m in self.methods())


class StepSource:
    """The denoising step ``(step, total)`` of one transformer call, read from that call, never from the last caller.

    In this order:

    1. the calling thread's :meth:`set` (``handle.set_step``), kept per thread: one thread's
       ``set_step`` never moves another thread's call;
    2. the scheduler of the pipeline whose ``__call__`` is making this transformer call: the
       innermost frame on the calling thread's stack whose ``self`` holds this transformer as
       ``transformer``/``transformer_2`` (or another of :data:`~.context.TRANSFORMER_ATTRS`) and has a ``scheduler``;
    3. ``apply(..., scheduler=...)``, then the scheduler of the pipeline given to ``apply``
       (a bare transformer called from the user's own loop).

    Why the stack (2): pipelines share components (``WanPipeline(**pipe.components)``,
    ``from_pipe``), so a transformer applied through pipeline A may be called by pipeline B, with
    its own scheduler, in this thread or another one while A runs elsewhere. The pipeline that
    makes the call is on the calling thread's stack for exactly as long as the call runs, so the
    step is read from its scheduler whatever other pipelines and threads do; nothing is kept
    between calls, and there is no pipeline method to wrap (a pipeline built after ``apply``
    is found the same way). The transformer's pre-hook finds that pipeline
    (:func:`~.context.calling_pipeline`) and passes it to :meth:`current`.
    """

    def __init__(self, scheduler_of: Callable[[], object], needs_step: bool, warn: Callable[[str], None],
                 reads_step: bool = False):
        self._scheduler_of = scheduler_of  # the explicit scheduler, else the pipeline's (read per call)
        self._needs_step = needs_step  # dense_steps / dense_last_steps / capture_steps / per-step methods need it
        self._reads_step = needs_step or reads_step  # capture names its files by step (0 when unknown)
        self._warn = warn
        self._local = threading.local()  # per-thread set_step
        self._stepless = 0  # calls that capture saw without a step (see current)

    def set(self, step: Optional[Tuple[int, Optional[int]]]) -> None:
        """``(step, total)`` for this thread's next transformer calls (None: back to the scheduler)."""
        self._local.manual = step

    @property
    def manual(self) -> Optional[Tuple[int, Optional[int]]]:
        """This thread's :meth:`set` value."""
        return getattr(self._local, "manual", None)

    def current(self, args: dict, pipeline=None) -> Tuple[int, Optional[int]]:
        """``(step, total)`` of a call with keyword arguments ``args``, made by ``pipeline`` (the pipeline
        whose ``__call__`` makes it, :func:`~.context.calling_pipeline`; None for a call no pipeline makes)."""
        manual = getattr(self._local, "manual", None)
        if manual is not None:
            return manual
        if not self._reads_step:  # the schedule is the same at every step: nothing to read
            return 0, None
        scheduler = None if pipeline is None else getattr(pipeline, "__dict__", {}).get("scheduler")
        if scheduler is None:
            scheduler = self._scheduler_of()
        if scheduler is None:
            if not self._needs_step:  # capture alone: its files are named by step, and no call has one
                self._stepless += 1
                if self._stepless == 2:  # (a second call: from here on calls of step 0 went unsaved, unsaid)
                    self._warn("capture names its files by denoising step, but this transformer's calls come "
                               "without one (a bare transformer: no scheduler= given to apply() and no "
                               "handle.set_step): every call counts as step 0, so only the first call of each layer "
                               "is saved. Pass scheduler=pipe.scheduler to apply(), or call handle.set_step(i, "
                               "total) before each transformer call")
                return 0, None
            raise ValueError("dense_steps/dense_last_steps/capture_steps and per-step methods (a SparsePlan, "
                             "Tile.from_strategy) need the denoising step: apply() got a bare transformer, so pass "
                             "scheduler=pipe.scheduler to apply() or call handle.set_step(i, total) before each "
                             "transformer call")
        order = max(int(getattr(scheduler, "order", 1) or 1), 1)
        timesteps = getattr(scheduler, "timesteps", None)
        # A second-order scheduler (Heun, KDPM2) makes two calls per step but one at the last: 2N - 1 timesteps
        # for N steps, so the count rounds up (rounded down, dense_last_steps and a plan's steps were one off)
        total = -(-len(timesteps) // order) if timesteps is not None else None
        if not hasattr(scheduler, "step_index"):
            # DDIM-style schedulers (CogVideoX's DDIM and DPM among them) keep no step counter:
            # the position is where this call's timestep sits in the schedule.
            return self._timestep_position(scheduler, timesteps, args), total
        index = scheduler.step_index
        if index is None:  # before the first scheduler.step() of this run
            index = getattr(scheduler, "begin_index", None)
            if index is None:  # the scheduler will find it from the timestep, as here (0 when it is not there)
                index = self._first_position(timesteps, args)
        return int(index) // order, total

    @staticmethod
    def _first_position(timesteps, args: dict) -> int:
        """The index of a run's first call in ``timesteps``: 0, unless the pipeline started part-way without
        ``set_begin_index`` (Wan's and LTX's video-to-video at ``strength`` < 1), where the scheduler's first
        ``step`` finds the index from the timestep. Before, that first call counted as step 0 and the next as the
        real index (steps 0, 3 of 4). One host sync per run. Of two equal timesteps (a second-order scheduler's), the
        second, as Diffusers' ``index_for_timestep`` takes it."""
        t = args.get("timestep")
        if timesteps is None or not len(timesteps) or not isinstance(t, torch.Tensor) or not t.numel():
            return 0
        t = _noise_level(t).to(device=timesteps.device, dtype=torch.float64)
        hits = torch.isclose(timesteps.to(torch.float64), t).nonzero().reshape(-1)
        return int(hits[1] if hits.numel() > 1 else hits[0]) if hits.numel() else 0

    def _timestep_position(self, scheduler, timesteps, args: dict) -> int:
        t = args.get("timestep")
        if timesteps is not None and len(timesteps) and t is not None and torch.as_tensor(t).numel():
            # One host sync per transformer call, only for schedulers without step_index.
            t = _noise_level(torch.as_tensor(t)).to(device=timesteps.device, dtype=torch.float64)
            hits = torch.isclose(timesteps.to(torch.float64), t).nonzero()
            if hits.numel():
                return int(hits[0, 0])
        if self._needs_step:
            self._warn(f"{type(scheduler).__name__} has no step_index and this call's timestep is not in "
                       "scheduler.timesteps; every call counts as step 0 for dense_steps/dense_last_steps/"
                       "capture_steps (use handle.set_step(i, total) to say which step runs)")
        return 0


def _noise_level(t: torch.Tensor) -> torch.Tensor:
    """The timestep of a call's generated tokens, shape (1,): the first sample's largest. Per-token timesteps give
    conditioning tokens a cleaner (lower) one: LTXConditionPipeline's conditioning frames ``min(t, (1 - mask) *
    1000)``, Wan 2.2 TI2V's first frame 0. Read at their first token, a call at strength < 1 whose video starts with
    a conditioning frame found no position and counted as step 0 (``dense_steps`` made it dense), as did every call of
    SkyReels-V2's diffusion forcing over a prefix video (its prefix frames' timestep is ``addnoise_condition``)."""
    t = t.detach()
    return (t.reshape(t.shape[0], -1)[0] if t.dim() else t.reshape(1)).amax().reshape(1)
