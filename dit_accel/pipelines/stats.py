"""Observers of attention calls: per-layer statistics and timing.

The layer hooks report every call here (sparse with its visited density, or
dense); :meth:`Stats.rows` and :meth:`Stats.summary` are what
``handle.stats()`` / ``handle.summary()`` return. SLA densities stay on the
device during generation (no host sync on the attention path) and are read
with one sync per device when the statistics are asked for.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .._util import Timer

__all__ = ["Stats", "LayerStats", "as_floats"]


def as_floats(values) -> List[float]:
    """Floats and 0-d tensors -> Python floats, one device sync per device (not one per call)."""
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


@dataclass
class LayerStats:
    sparse_calls: int = 0
    dense_calls: int = 0
    densities: list = field(default_factory=list)
    token_densities: list = field(default_factory=list)  # fraction of token pairs attended (GNA, Tile)
    dense_reasons: Dict[str, int] = field(default_factory=dict)  # plan-dense calls by reason
    backends: Dict[str, int] = field(default_factory=dict)  # sparse calls by the kernel backend that ran them
    # One timer per (thread, device): a Timer holds one open start, so two threads' calls in one shared timer
    # lost the overlap (0.40 s of calls read 0.30 s), and a timer made on the CPU timed later CUDA calls' launches
    timers: Dict[tuple, Timer] = field(default_factory=dict)


_UNTIMED = contextlib.nullcontext()  # reusable: it holds nothing


class Stats:
    """Per-layer counters, densities and (with ``timing``) attention time."""

    def __init__(self, names: List[str], timing: bool = False):
        self.names = list(names)
        self.timing = bool(timing)
        self.reset()

    def reset(self) -> None:
        """Forget every count, density and time so far (a warm-up's), and the grids they ran on."""
        self.layers = [LayerStats() for _ in self.names]
        self.grids = set()  # token grids of the calls counted since (a plan ran there: summary's ran_on_grid)

    def sparse(self, layer: int, density, backend: Optional[str] = None, token_density: Optional[float] = None) -> None:
        stats = self.layers[layer]
        stats.sparse_calls += 1
        stats.densities.append(density)
        if token_density is not None:
            stats.token_densities.append(token_density)
        if backend is not None:
            stats.backends[backend] = stats.backends.get(backend, 0) + 1

    def dense(self, layer: int, reason: Optional[str] = None) -> None:
        stats = self.layers[layer]
        stats.dense_calls += 1
        if reason is not None:
            stats.dense_reasons[reason] = stats.dense_reasons.get(reason, 0) + 1

    def timed(self, layer: int, device):
        """A context manager that adds the enclosed time to the layer when timing is on (the calling thread's
        timer on ``device``: CUDA events there, else wall time)."""
        if not self.timing:
            return _UNTIMED
        timers = self.layers[layer].timers
        key = (threading.get_ident(), device)
        timer = timers.get(key)
        return timer if timer is not None else timers.setdefault(key, Timer(device))

    def rows(self, methods: List[str]) -> List[dict]:
        """Per layer: ``layer``, ``index``, ``method``, ``density`` (mean visited block fraction over sparse
        calls, None if none ran sparse), ``token_density`` (the fraction of token pairs the pattern attends, mean
        over the same sparse calls, when the pattern of every one knows it: GNA and Tile, None where some call ran
        another, e.g. a plan's PerHead or SLA entry; visited density / token density is the wasted work of
        partial blocks), ``sparse_calls``, ``dense_calls``, ``dense_reason`` (why calls ran
        dense although the schedule asked for the method, e.g. a window that covers the grid), ``backend``
        (the kernel backends its sparse calls ran, e.g. ``"torch"``) and ``time_ms`` (None unless timing: the time
        of its calls, sparse and dense, summed over the threads that made them).
        Under context parallelism ``backend`` is per rank: what this rank's part of each call ran (under Ulysses
        with a layout per head, its heads' layout: ranks may differ); ``stats(all_ranks=True)`` lists every rank's."""
        rows = []
        for index, (name, stats) in enumerate(zip(self.names, self.layers)):
            densities = list(stats.densities)
            values = as_floats(densities)
            timers = list(stats.timers.values())
            tokens = list(stats.token_densities)
            rows.append({
                "layer": name,
                "index": index,
                "method": methods[index],
                "density": sum(values) / len(values) if values else None,
                # (over the same calls as density or not at all: a plan mixing GNA with PerHead or SLA calls gave
                # the GNA calls' mean beside every call's density, 0.195 beside 0.5625, a false partial-block cost)
                "token_density": sum(tokens) / len(tokens) if tokens and len(tokens) == len(densities) else None,
                "sparse_calls": stats.sparse_calls,
                "dense_calls": stats.dense_calls,
                "dense_reason": "; ".join(f"dense ({reason})" for reason in stats.dense_reasons) or None,
                "backend": ",".join(sorted(stats.backends)) or None,
                "time_ms": (sum(t.seconds for t in timers) * 1e3 if any(t.calls for t in timers) else None),
            })
        return rows

    @staticmethod
    def summarize(rows: List[dict]) -> dict:
        """Totals over layers: calls, call-weighted mean density and sparsity, attention time."""
        # (rows of no sparse call weigh nothing: all such, as merged or hand-made rows may be, were a ZeroDivisionError)
        weighted = [(r["density"], r["sparse_calls"]) for r in rows if r["density"] is not None and r["sparse_calls"]]
        mean = sum(d * n for d, n in weighted) / sum(n for _, n in weighted) if weighted else None
        times = [r["time_ms"] for r in rows if r["time_ms"] is not None]
        reasons = sorted({r["dense_reason"] for r in rows if r["dense_reason"]})
        return {
            "layers": len({r["layer"] for r in rows}),
            "sparse_layers": len({r["layer"] for r in rows if r["sparse_calls"]}),
            "sparse_calls": sum(r["sparse_calls"] for r in rows),
            "dense_calls": sum(r["dense_calls"] for r in rows),
            "mean_density": mean,
            "sparsity": None if mean is None else 1.0 - mean,
            "dense_reasons": reasons,
            "backends_used": sorted({b for r in rows if r.get("backend") for b in r["backend"].split(",")}),
            "time_ms": sum(times) if times else None,
        }
