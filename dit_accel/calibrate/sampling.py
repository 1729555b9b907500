"""Step buckets and a bounded in-memory sample of the dense model's q/k/v per (layer, step bucket).

The calibration runs the dense model once on its prompts. :class:`QKVSampler` is the capture
observer of that run (the interface of :class:`dit_accel.pipelines.capture.Capture`: ``wants`` and
``save``) but keeps what it sees in memory, for a few steps per bucket and within ``max_bytes``:
nothing goes to disk unless a folder is given.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..atomic_files import atomic_write

__all__ = ["step_buckets", "QKVSampler"]


def step_buckets(steps: int, phases: int, warmup: Sequence[int] = (), cooldown: Sequence[int] = ()
                 ) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``0 .. steps - 1``: ``phases`` equal parts, also split at each
    candidate warm-up length in ``warmup`` (so a dense warm-up of that many steps can be chosen) and before
    each of the last ``cooldown`` steps (flow-matching schedules end on a step that moves the sample
    little: on tiny-shapes the last of 12 steps moves the output about 300 times less per unit of attention
    error than the steps before it, so it is worth its own bucket).

    Example::

        step_buckets(12, 3, warmup=(1, 2), cooldown=(1,))   # [(0, 1), (1, 2), (2, 4), (4, 8), (8, 11), (11, 12)]
    """
    from .._util import is_int

    # (before: 12.5 steps made a bucket (12, 12.5))
    if not (is_int(steps) and is_int(phases)) or steps < 1 or phases < 1:
        raise ValueError(f"steps={steps!r} and phases={phases!r} must be whole numbers >= 1")
    for name, lengths in (("warmup", warmup), ("cooldown", cooldown)):
        if not all(is_int(w) for w in lengths):
            raise ValueError(f"{name}={tuple(lengths)!r} is invalid: whole numbers of steps, e.g. (1, 2)")
    cuts = {round(i * steps / phases) for i in range(phases + 1)} | {w for w in warmup if 0 < w < steps}
    cuts |= {steps - c for c in cooldown if 0 < c < steps}
    cuts = sorted(c for c in cuts | {0, steps} if 0 <= c <= steps)
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


class QKVSampler:
    """Keeps the video q, k, v of the first call per (layer, step) for the chosen steps, in memory, and the text
    keys and values of a joint-attention call (FLUX, HunyuanVideo, SD3: text tokens in the self-attention, which a
    sparse run visits exactly), so that a candidate's error is that of the attention the run computes.

    Args:
        buckets: the step buckets; ``per_bucket`` steps are kept per bucket, spread evenly over it.
        max_bytes: the memory the samples may take; fewer steps per bucket, then fewer batch rows,
            are kept when one (layer, step) sample times the layers and buckets would exceed it. 0 keeps no
            sample, only the grid and the shape of the calls (``heads``, ``head_dim``).
        folder: also ``torch.save`` each sample there (``layer{L:03d}_step{S:03d}.pt``, under context
            parallelism ``..._heads{H0}-{H1}.pt``: the :class:`~dit_accel.pipelines.capture.Capture` format); None
            keeps nothing on disk.

    Batch rows: when ``max_bytes`` keeps fewer rows than a call's batch, the kept rows are spread evenly over it
    (row ``i`` of ``r`` kept is ``floor((i + 0.5) * B / r)``), so a batch that stacks ``[uncond, cond]``
    (classifier-free guidance in one call) keeps rows of both halves; all of them when ``r >= B``.

    Text (:attr:`takes_text`): ``save(..., text=(k_text, v_text, key_mask))`` with the text keys and values
    ``(B, H, T, D)`` and the call's key mask of the text keys (bool ``(B or 1, T)``, True = attend, or a float
    bias of that shape; None: all attended); :meth:`bucket_text` gives them back beside :meth:`bucket_samples`.

    Under Ring context parallelism only the first ring rank of each head group is handed a call (the others'
    samplers keep nothing), and under Ulysses each rank keeps its own heads (``heads`` counts those).

    A pipeline with several transformers (Wan 2.2's experts, Ideogram 4's unconditional one, MiniMax-H3's
    ``transformer_ref``) is sampled as one model, as a plan applies to each of them by layer index: the first
    call per (layer, step) of any of them is kept, and its file on disk carries that transformer's prefix
    (``transformer_2.layer000_step001.pt``; see :meth:`for_transformer`).
    """

    #: ``save`` takes ``text=``: the interceptor hands a joint call's text keys and values over.
    takes_text = True

    def __init__(self, buckets: Sequence[Tuple[int, int]], *, per_bucket: int = 2, max_bytes: int = 512 * 2**20,
                 folder: Optional[str] = None):
        from .._util import is_int

        if not is_int(per_bucket) or per_bucket < 1:  # (before: 0 kept no step, and the search scored nothing)
            raise ValueError(f"per_bucket={per_bucket!r} is invalid: a whole number of steps >= 1 per bucket")
        if not is_int(max_bytes) or max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} is invalid: a whole number of bytes >= 0 (0 keeps no sample)")
        self.buckets = list(buckets)
        self.max_bytes = int(max_bytes)
        self.folder = folder
        self.steps: Dict[int, int] = {}  # step -> bucket index
        for b, (start, stop) in enumerate(self.buckets):
            span = stop - start
            take = min(per_bucket, span)
            for i in range(take):  # spread evenly over the bucket
                self.steps[start + min(span - 1, int((i + 0.5) * span / take))] = b
        self.per_bucket = per_bucket
        self.samples: Dict[Tuple[int, int], List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        # beside each sample, its text keys, values and bias (fp32, -inf: not attended), or None
        self.texts: Dict[Tuple[int, int], List[Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = {}
        self.grid = None
        self.heads: Optional[int] = None  # of the first call seen
        self.head_dim: Optional[int] = None
        self.rows: Optional[int] = None  # batch rows kept per sample (set at the first save)
        self.bytes = 0
        self._done = set()
        self._lock = threading.Lock()

    def wants(self, layer: int, step: int) -> bool:
        return step in self.steps and (layer, step) not in self._done

    def for_transformer(self, prefix: str):
        """What ``apply`` hands the transformer wrapped under ``prefix``: this sampler, whose files name it."""
        return self if not prefix else _TransformerSamples(self, prefix)

    def save(self, layer: int, name: str, grid, step: int, q, k, v, heads=None, prefix: str = "", text=None) -> None:
        with self._lock:
            if (layer, step) in self._done:
                return
            self._done.add((layer, step))
            self.grid = tuple(grid)
            if self.heads is None:
                self.heads, self.head_dim = int(q.shape[1]), int(q.shape[-1])
            if self.rows is None:
                self._budget(q, text)
            rows = self.rows
            if rows == 0:
                return
            bucket = self.steps[step]
            kept = self.samples.setdefault((layer, bucket), [])
            if len(kept) >= self.per_bucket:
                return
            # rows spread over the batch (before: the first rows, the unconditional half of a CFG batch alone)
            pick = _spread_rows(q.shape[0], rows, q.device)
            sample = tuple(_keep(t, pick) for t in (q, k, v))
            kept.append(sample)
            joint = None if text is None else _text_sample(text, q.shape[0], pick)
            self.texts.setdefault((layer, bucket), []).append(joint)
            self.bytes += sum(t.numel() * 4 for t in sample + (joint or ()))
        if self.folder is not None:
            os.makedirs(self.folder, exist_ok=True)
            data = {"q": sample[0], "k": sample[1], "v": sample[2], "grid": tuple(grid), "layer": layer,
                    "layer_name": name, "step": step}
            # Under Ulysses context parallelism each rank holds some heads: their files are named by the heads, as
            # Capture's are (before, every rank wrote the same name, and the last rank's heads stood for the layer)
            tag = "" if heads is None else f"_heads{int(heads[0])}-{int(heads[1])}"
            if heads is not None:
                data["heads"] = (int(heads[0]), int(heads[1]))
            if joint is not None:
                data["text_k"], data["text_v"], data["text_bias"] = joint
            # in one rename, as Capture writes (before: a run killed mid-write left a truncated file under the final
            # name, which a later run read)
            atomic_write(os.path.join(self.folder, f"{prefix}layer{layer:03d}_step{step:03d}{tag}.pt"),
                         lambda tmp: torch.save(data, tmp))

    @property
    def layers_seen(self) -> int:
        """1 + the largest layer index a call was offered for (each transformer's indices start at 0)."""
        return 1 + max((layer for layer, _ in self._done), default=-1)

    def set_layers(self, layers: int) -> None:
        """The model's attention layer count (sizes the per-sample budget before the run)."""
        self._layers = int(layers)

    def _budget(self, q, text=None) -> None:
        layers = getattr(self, "_layers", 1)
        per_row = 3 * 4 * q[0].numel()  # q, k, v of one batch row in fp32
        if text is not None:  # and the text keys, values and bias
            per_row += 2 * 4 * text[0][0].numel() + 4 * text[0].shape[2]
        slots = layers * len(self.buckets)
        while self.per_bucket > 1 and per_row * q.shape[0] * self.per_bucket * slots > self.max_bytes:
            self.per_bucket -= 1
        self.rows = int(max(0, min(q.shape[0], self.max_bytes // max(per_row * self.per_bucket * slots, 1))))
        if self.rows == 0 and self.max_bytes > 0:  # (before: no sample kept, nothing scored, a dense allocation)
            need = per_row * slots / 2**20
            raise ValueError(f"--max-sample-mb {self.max_bytes / 2**20:.4g} holds no q/k/v sample: one batch row per "
                             f"(layer, step bucket) takes {need:.4g} MiB here ({layers} layers x {len(self.buckets)} "
                             f"buckets x {per_row / 2**20:.3g} MiB); give --max-sample-mb {math.ceil(need)} or more, "
                             "fewer buckets (--phases, --warmup-candidates, --cooldown-candidates), or --search "
                             "warmup, which keeps no sample")

    def bucket_samples(self, layer: int, bucket: int):
        """``(q, k, v)`` of every kept call of ``layer`` in ``bucket``, concatenated on the batch axis, or None."""
        kept = self.samples.get((layer, bucket))
        if not kept:
            return None
        return tuple(torch.cat([s[i] for s in kept]) for i in range(3))

    def bucket_text(self, layer: int, bucket: int):
        """``(k_text, v_text, bias)`` beside :meth:`bucket_samples` (``(B, H, T, D)`` twice and fp32 ``(B, T)``,
        ``-inf`` on keys not attended; samples with fewer text tokens padded with such keys), or None when no kept
        call of ``layer`` in ``bucket`` had text keys."""
        kept, texts = self.samples.get((layer, bucket)), self.texts.get((layer, bucket))
        if not kept or not texts or all(t is None for t in texts):
            return None
        longest = max(t[0].shape[2] for t in texts if t is not None)
        parts = []
        for (q, _, _), t in zip(kept, texts):
            b, h, _, d = q.shape
            kt, vt, bias = t if t is not None else (q.new_zeros(b, h, 0, d), q.new_zeros(b, h, 0, d), q.new_zeros(b, 0))
            pad = longest - kt.shape[2]
            if pad:
                kt, vt = (torch.cat([x, x.new_zeros(b, h, pad, d)], 2) for x in (kt, vt))
                bias = torch.cat([bias, bias.new_full((b, pad), float("-inf"))], 1)
            parts.append((kt, vt, bias))
        return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def _spread_rows(batch: int, rows: int, device) -> Optional[torch.Tensor]:
    """The batch rows kept, spread evenly over ``batch`` (None: all of them)."""
    if rows >= batch:
        return None
    return torch.tensor([int((i + 0.5) * batch / rows) for i in range(rows)], device=device)


def _keep(t: torch.Tensor, pick: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows ``pick`` of ``t`` (all: None), detached, fp32, contiguous, on the CPU."""
    t = t if pick is None else t.index_select(0, pick)
    return t.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)


def _text_sample(text, batch: int, pick: Optional[torch.Tensor]):
    """``(k_text, v_text, bias)`` of the kept rows: the key mask as an fp32 bias ``(rows, T)`` (-inf: not attended)."""
    kt, vt, mask = text
    n = kt.shape[2]
    if mask is None:
        bias = kt.new_zeros(batch, n, dtype=torch.float32)
    else:
        mask = mask.reshape(mask.shape[0], n).expand(batch, n)
        bias = mask.float() if mask.is_floating_point() else torch.zeros(mask.shape, device=mask.device).masked_fill(
            ~mask, float("-inf"))
    return _keep(kt, pick), _keep(vt, pick), _keep(bias, pick)


class _TransformerSamples:
    """A :class:`QKVSampler` as seen by one more transformer of the pipeline: the same samples, and files named
    with the transformer's ``prefix``."""

    def __init__(self, sampler: QKVSampler, prefix: str):
        self.sampler, self.prefix = sampler, prefix

    def wants(self, layer: int, step: int) -> bool:
        return self.sampler.wants(layer, step)

    takes_text = True

    def save(self, layer: int, name: str, grid, step: int, q, k, v, heads=None, text=None) -> None:
        self.sampler.save(layer, name, grid, step, q, k, v, heads=heads, prefix=self.prefix, text=text)
