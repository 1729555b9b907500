"""The dense run's transformer outputs, kept per video, so a plan's leading dense steps are read, not recomputed.

A calibration generates the same videos (prompts x seeds, same noise) again and again: once dense, then under
every plan it verifies and every sensitivity probe. A plan whose first ``D`` steps are dense everywhere (every
layer, every head) computes in those steps exactly what the dense run computed, so :class:`DenseReplay` records
the transformer's output of every call of the dense run, per video, and returns them for the first ``D`` steps
of a later generation of the same video. Only the transformer call is skipped: the pipeline, its scheduler and
its random draws run as before, and ``dit_accel``'s step source reads the scheduler, so the plan's sparse steps
begin where they would.

It records only what it can give back exactly: outputs returned as a tuple (``return_dict=False``) or as an
object with a ``sample`` tensor, whose batch is a whole number of blocks of the pipeline call's samples
(classifier-free guidance: one call per branch, or both branches in one call, block by block). Anything else
turns it off for the run, and every step is computed. The outputs are kept in host memory, up to a budget shared
evenly by the videos (each keeps its first calls); on a GPU a call read back costs one copy to the device.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Dict, Hashable, List, Optional, Sequence

import torch

from ..plans.sparse_plan import SparsePlan

__all__ = ["DenseReplay", "dense_prefix", "PassCounter", "pipeline_transformers"]


def pipeline_transformers(pipe) -> List[torch.nn.Module]:
    """The transformers of ``pipe`` that a generation calls (Wan 2.2's ``transformer`` and ``transformer_2``; one
    module under both names once), in the order apply() finds them: a replay records and gives back the calls of
    all of them (before: of ``pipe.transformer`` only, so on a pipeline of two experts the calls per step were
    counted from one expert's calls and a plan's "replayed steps" were fewer steps than it said)."""
    from ..pipelines.context import transformers_of

    return [module for _, module in transformers_of(pipe)]


def dense_prefix(plan: SparsePlan, steps: int, layers: int) -> int:
    """How many of the first ``steps`` steps ``plan`` runs dense on every one of ``layers`` layers (and heads)."""
    for step in range(steps):
        if any(plan.for_layer_step(layer, step) is not None for layer in range(layers)):
            return step
    return steps


class DenseReplay:
    """Per video (a hashable key, ``(prompt, seed)``), the transformer's output of each call of a dense run.

    ``max_bytes``: host memory for the outputs (kept on the CPU whatever the device), shared evenly by the
    ``videos`` :meth:`recording` is told of: each keeps the outputs of its first calls that fit its share, and
    a later run reads those and computes the rest. Use :meth:`recording` around the dense run and
    :meth:`replaying` around a later run of the same videos, with :meth:`begin` before each pipeline call naming
    its videos in batch order (``calibrate.run.generate_videos`` does this).
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = int(max_bytes)
        self.outputs: Dict[Hashable, List[torch.Tensor]] = {}
        self.bytes = 0
        self.enabled = self.max_bytes > 0
        self.replayed_calls = 0  # calls given back over this object's life
        self._kind: Optional[type] = None  # tuple, or the output class with a ``sample`` field
        self._chunk: Sequence[Hashable] = ()
        self._call = 0
        self._keep: Optional[int] = None  # calls kept per video (the share of max_bytes one video's calls fit)
        self._videos = 1
        self._device: Optional[torch.device] = None
        self._counts: List[int] = []  # transformer calls of each recorded pipeline call
        self._recording = False

    def begin(self, keys: Sequence[Hashable]) -> None:
        """A pipeline call for these videos (batch order) starts: its transformer calls count from 0."""
        self._end_call()
        self._chunk, self._call = list(keys), 0

    def calls_per_step(self, steps: int) -> Optional[int]:
        """Transformer calls per denoising step of the recorded run (every pipeline call made the same whole
        number per step), or None."""
        counts = set(self._counts)
        if len(counts) != 1 or not steps:
            return None
        (count,) = counts
        return count // steps if count % steps == 0 and count else None

    def calls(self, key: Hashable) -> int:
        """The calls recorded for video ``key``."""
        return len(self.outputs.get(key, ()))

    def kept_calls(self) -> int:
        """The calls recorded for every video (0 when none were: a budget below one call's output per video)."""
        return min((len(calls) for calls in self.outputs.values()), default=0) if self.enabled else 0

    @contextmanager
    def recording(self, transformer, videos: int = 1):
        """Record each call's output while the block runs (the outputs themselves are returned unchanged);
        ``transformer``: a module or the modules of a pipeline (:func:`pipeline_transformers`; their calls count
        as one sequence); ``videos``: how many videos the block generates (they share ``max_bytes``)."""
        self._videos = max(int(videos), 1)

        def record(out):
            if self.enabled:
                self._store(out)
            self._call += 1
            return out

        self._recording, self._chunk = True, ()
        try:
            with self._wrapped(transformer, lambda original, args, kwargs: record(original(*args, **kwargs))):
                yield self
        finally:
            self._end_call()
            self._recording, self._chunk = False, ()

    @contextmanager
    def replaying(self, transformer, calls: int):
        """Give back the recorded output of each video's first ``calls`` transformer calls; compute the rest (and
        every call of a batch holding a video without that call recorded)."""
        def call(original, args, kwargs):
            index, self._call = self._call, self._call + 1
            if self.enabled and index < calls and self._chunk and all(self.calls(k) > index for k in self._chunk):
                self.replayed_calls += 1
                return self._output(index)
            return original(*args, **kwargs)

        self._chunk = ()
        try:
            with self._wrapped(transformer, call):
                yield self
        finally:
            self._chunk = ()

    # ------------------------------------------------------------------ internals
    def _end_call(self) -> None:
        if self._recording and self._chunk:
            self._counts.append(self._call)

    @contextmanager
    def _wrapped(self, transformer, body):
        """Each transformer's ``forward`` replaced by ``body(original, args, kwargs)`` (module hooks still run around
        it); ``transformer``: one module or a sequence of them."""
        if not isinstance(transformer, torch.nn.Module):
            with contextlib.ExitStack() as stack:
                for module in transformer:
                    stack.enter_context(self._wrapped(module, body))
                yield
            return
        had_own = "forward" in vars(transformer)
        original = transformer.forward

        def forward(*args, **kwargs):
            return body(original, args, kwargs)

        transformer.forward = forward
        try:
            yield
        finally:
            if had_own:
                transformer.forward = original
            else:
                del transformer.forward

    def _sample(self, out) -> Optional[torch.Tensor]:
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return out[0] if len(out) == 1 else None
        sample = getattr(out, "sample", None)
        return sample if isinstance(sample, torch.Tensor) else None

    def _store(self, out) -> None:
        sample, batch = self._sample(out), len(self._chunk)
        kind = tuple if isinstance(out, tuple) else type(out)
        per_video = 0 if sample is None or not batch else sample.numel() * sample.element_size() // batch
        if self._keep is None and per_video:
            self._keep = self.max_bytes // self._videos // per_video
        if (sample is None or batch == 0 or sample.shape[0] % batch or (self._kind not in (None, kind))
                or (self._device not in (None, sample.device))
                or any(self.calls(k) != min(self._call, self._keep or 0) for k in self._chunk)):
            self.enabled = False  # not something this can give back exactly: every step is computed
            self.outputs.clear()
            self.bytes = 0
            return
        if self._call >= self._keep:
            return  # past this video's share: the later calls are computed
        self._kind, self._device = kind, sample.device
        blocks = sample.detach().reshape(sample.shape[0] // batch, batch, *sample.shape[1:]).to("cpu")
        for j, key in enumerate(self._chunk):
            self.outputs.setdefault(key, []).append(blocks[:, j].clone())
        self.bytes += per_video * batch

    def _output(self, index: int):
        sample = torch.stack([self.outputs[k][index] for k in self._chunk], dim=1).flatten(0, 1)
        sample = sample.to(self._device)
        return (sample,) if self._kind is tuple else self._kind(sample=sample)


class PassCounter:
    """The transformer passes each video makes per denoising step, counted in a run: the batch rows of the
    ``hidden_states`` the pipeline's transformers take, over videos x steps. Classifier-free guidance makes 2,
    one call per branch or both branches in one call; FLUX's guidance embedding 1, whatever its scale (before,
    calibrate guessed 2 from ``guidance_scale > 1`` and 1 when it was left to the pipeline's default, so a Wan
    model's modelled attention per sample was half its own, and a FLUX model's twice)."""

    def __init__(self):
        self.rows: Optional[int] = 0  # None: a call whose batch was not known

    @contextmanager
    def counting(self, transformers: Sequence[torch.nn.Module]):
        def hook(_module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if self.rows is not None:
                self.rows = self.rows + int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else None

        handles = [t.register_forward_pre_hook(hook, with_kwargs=True) for t in transformers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def per_step(self, videos: int, steps: int) -> Optional[int]:
        """Passes per video and step (a whole number >= 1), or None when the rows do not divide into them."""
        each = videos * steps
        if not self.rows or not each or self.rows % each:
            return None
        return self.rows // each
