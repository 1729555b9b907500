"""The plan VSA runs (:class:`VSAPlan`), and the channel through which a layer's checkpoint gate reaches it.

VSA selects its key cubes per call from q and k (like SLA), so the plan holds only the cube partition
of its grid; every call runs :func:`dit_accel.kernels.vsa.vsa_parts`. The gate is per layer and per call
(``to_gate_compress`` applied to the attention module's input), while a plan is shared by every layer of a
grid: :mod:`dit_accel.pipelines.vsa_gates` puts the layer's pending gate on this thread's stack
(:func:`gate_scope`) for exactly the duration of that module's forward, and :meth:`VSAPlan.attend`
reads it (:func:`current_gate`).

Under ring attention (:meth:`VSAPlan.attend_part`) a rank's video rows must be whole cubes (whole tile slabs
along time): its query cubes are then consecutive in cube order, their means local, and the coarse scores,
the selection and the fine branch need only every key cube, which every rank gathers.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

from ..kernels.backends import Request, resolve
from ..kernels.vsa.api import check_vsa_grid, vsa_parts, vsa_parts_rows
from ..kernels.vsa.naive import CubeRows, cube_rows, cubes_of, selected_count
from .plan import Plan

__all__ = ["VSAPlan", "gate_scope", "push_gate", "pop_gate", "current_gate"]

_LOCAL = threading.local()


def push_gate(gate: Optional[Callable[[], torch.Tensor]]) -> None:
    """Until the matching :func:`pop_gate`, :func:`current_gate` on this thread returns ``gate()`` (computed on
    first use, once; None: no gate, e.g. a layer the checkpoint has none for)."""
    stack = getattr(_LOCAL, "stack", None)
    if stack is None:
        stack = _LOCAL.stack = []
    stack.append([gate, None])


def pop_gate() -> None:
    stack = getattr(_LOCAL, "stack", None)
    if stack:
        stack.pop()


@contextlib.contextmanager
def gate_scope(gate: Optional[Callable[[], torch.Tensor]]):
    """:func:`push_gate` for the duration of a ``with`` block."""
    push_gate(gate)
    try:
        yield
    finally:
        pop_gate()


def current_gate() -> Optional[torch.Tensor]:
    """The gate of the attention module running on this thread, ``(B, S, inner)`` (None: no gate)."""
    stack = getattr(_LOCAL, "stack", None)
    if not stack:
        return None
    slot = stack[-1]
    if slot[1] is None and slot[0] is not None:
        slot[1] = slot[0]()
    return slot[1]


def _extra(parts, gate: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``coarse * gate`` in fp32 for a caller that merges the fine branch first (text keys, ring shards): it adds
    this to the merged output unrounded, so the sum is rounded once to the model's dtype."""
    return None if gate is None else parts.gated(gate, torch.float32)


class VSAPlan(Plan):
    """VSA on ``grid`` for a :class:`dit_accel.VSA` config; cubes chosen per call (density fixed: ``k / C``).

    Runs on one process and under Ulysses (:meth:`attend`, the whole sequence), and under ring attention
    (:meth:`attend_part`) where every rank's video rows are whole cubes (:meth:`check_part`)."""

    kind = "vsa"

    def __init__(self, method, grid):
        if isinstance(grid, (tuple, list)) and len(grid) != 3:
            # apply() takes no grid, so check_vsa_grid's (1, H, W) advice is not one this caller can follow
            raise ValueError(f"VSA needs a video token grid (T, H, W), but this model's token grid is "
                             f"{tuple(grid)}: VSA cuts videos into cubes across frames and runs on video models "
                             "only; on an image model use Tile, GNA or SLA (e.g. dit_accel.Tile(tile=(8, 8), "
                             "window=(3, 3)))")
        grid = check_vsa_grid(tuple(grid), owner="VSA: ")
        super().__init__(method, grid)
        self.cubes = cubes_of(grid, method.tile)
        self.count = selected_count(self.cubes.count, method.topk, method.effective_sparsity)
        self.density = self.count / self.cubes.count
        self.token_density = None  # the cubes' token share varies with the partial ones they pick
        self._rows: Dict[tuple, CubeRows] = {}  # (rows, device or None) -> a ring rank's cubes and index maps

    def prepare(self, device, backend: str = "auto") -> None:
        self.cubes.perm.prepare(device)

    def backend_for(self, q, k, v, backend: str, lse: bool = True) -> str:
        vol = self.cubes.volume
        return resolve("block_sparse", backend, Request.of(q, k, v, vol, vol))

    def check_part(self, rows: Tuple[int, int]) -> None:
        """ValueError unless the video rows ``(start, stop)`` are the real tokens of whole cubes (see
        :func:`~dit_accel.kernels.vsa.naive.cube_rows`): ring attention needs each query cube's mean on one rank."""
        self._part(tuple(rows))

    def _part(self, rows: Tuple[int, int], device=None) -> CubeRows:
        part = self._rows.get((rows, None))
        if part is None:
            part = cube_rows(self.cubes, rows)
            if part is None:
                tile, frame = self.method.tile, self.grid[1] * self.grid[2]
                fixes = [f"a frame count that is a multiple of the ring degree x {tile[0]} (the tile's depth)"]
                if tile[0] > 1:
                    fixes.append(f"a tile whose depth divides the frames per rank (e.g. tile=(1, {tile[1]}, {tile[2]}))")
                raise ValueError(
                    f"{self.method!r} under ring attention: the video tokens {rows[0]}..{rows[1] - 1} of one rank "
                    f"({(rows[1] - rows[0]) / frame:g} frames of grid {self.grid}) do not fill whole cubes of "
                    f"tile={tile} (VSA's coarse branch needs every query cube's tokens on one rank). Split so every "
                    f"rank holds whole cubes: {', '.join(fixes)}, or Ulysses context parallelism (heads split) "
                    "instead of ring attention")
            self._rows[(rows, None)] = part
        if device is None:
            return part
        key = (rows, torch.device(device))
        found = self._rows.get(key)
        if found is None:
            found = self._rows[key] = part.to(device)
        return found

    def gate_for(self, q: torch.Tensor, heads) -> Optional[torch.Tensor]:
        """The current layer's gate shaped like ``q`` (its ``heads`` of the model: ``(start, stop)`` or an index
        tensor), or None."""
        gate = current_gate()
        if gate is None:
            return None
        b, h, n, d = q.shape
        if gate.dim() != 3 or gate.shape[0] != b or gate.shape[1] != n or gate.shape[2] % d:
            raise ValueError(f"dit_accel: VSA's to_gate_compress gate has shape {tuple(gate.shape)} but this layer's "
                             f"video queries are {tuple(q.shape)} (B, heads, N, D): the gate covers the tokens of the "
                             "attention module's input, so it serves the video queries of one process or of a ring "
                             "rank (its own rows), not Ulysses (whose ranks attend every token for some heads) nor "
                             "text tokens in the attention input; run such a gated model with ring attention or on "
                             "one process")
        gate = gate.unflatten(2, (gate.shape[2] // d, d)).transpose(1, 2)  # (B, heads of the model, N, D)
        if isinstance(heads, torch.Tensor):  # a per-head plan's VSA heads
            gate = gate.index_select(1, heads.to(gate.device))
        elif heads is not None:  # Ulysses: this rank's (start, stop)
            gate = gate[:, heads[0]:heads[1]]
        if gate.shape[1] != h:
            raise ValueError(f"dit_accel: VSA's gate holds {gate.shape[1]} heads, the layer's queries {h}")
        return gate

    def attend(self, q, k, v, *, scale, backend, proj=None, heads=None, lse: bool = True):
        gate = self.gate_for(q, heads)
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        summed = gate is not None and not lse  # nothing merged: fine + coarse * gate rounded once, as vsa_attention
        parts = vsa_parts(q, k, v, self.grid, self.count, self.method.tile, scale, with_coarse=gate is not None,
                          backend=backend, cubes=self.cubes, tiled_fine=summed, gate=gate if summed else None)
        if summed:
            return parts.gated(gate, q.dtype, add_fine=True), None, None, self.density
        return parts.fine, parts.lse, _extra(parts, gate), self.density

    def attend_part(self, q, k, v, *, rows, shards, scale, backend, proj=None, heads=None):
        """Ring attention: the VSA result of the video rows ``rows`` (q holds those, k and v every video token),
        exactly the rows of :meth:`attend` on the whole grid. The layer's gate covers this rank's rows (Diffusers
        splits the module's input as it splits the queries)."""
        part = self._part(tuple(rows), q.device)
        gate = self.gate_for(q, heads)
        scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        parts = vsa_parts_rows(q, k, v, part, self.cubes, self.count, scale, with_coarse=gate is not None,
                               backend=backend)
        return parts.fine, parts.lse, _extra(parts, gate), self.density

    def describe(self) -> dict:
        out = super().describe()
        out.update(tile=list(self.method.tile), cubes=self.cubes.count, selected=self.count)
        return out
