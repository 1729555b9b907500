"""BlockLayout: which key blocks each query block visits, and how.

A layout is the kernels' view of a pattern. Query tokens are cut into blocks of
``block_q`` rows and key tokens into blocks of ``block_k`` columns (the last
block of each may be ragged). For every query block the layout lists the key
blocks to visit, in increasing order, each either *full* (every in-range pair
allowed: the kernel runs it unmasked) or *partial* (an element mask from
``mask_table`` applies). Unlisted blocks are skipped.

Tensors (``Hl`` is 1 when all heads share the pattern, else the head count):

- ``kv_counts``  int32 ``[Hl, nQ]``: visited key blocks per query block.
- ``kv_indices`` int32 ``[Hl, nQ, max_kv]``: their indices (entries past the count are 0).
- ``kv_mask_ids`` int32 ``[Hl, nQ, max_kv]``: ``-1`` for full blocks, else a row of ``mask_table``.
- ``q_counts``, ``q_indices``, ``q_mask_ids``: the transposed layout, per key
  block the query blocks that visit it (used by the dK/dV backward pass).
- ``mask_table`` bool ``[P, block_q, block_k]``: distinct element masks of partial blocks.

``derived`` holds what backends compute from a layout (device copies, chunk plans,
block masks), through :class:`~dit_accel.kernels._cache.LayoutCache`; it is not part of
the layout's value and goes with it.

Token positions past ``q_len``/``kv_len`` in a ragged last block are always
masked by the kernels; the layout need not mark them. A query row with no
allowed key produces a zero output and ``lse = -inf``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .._util import cdiv as _cdiv, is_int
from .request import in_graph, tracing

__all__ = ["BlockLayout"]

_INT = torch.int32


def _check_size(name: str, value) -> int:
    if not is_int(value) or value < 1:  # (numpy's ints too, as the method configs take them)
        raise ValueError(f"{name}={value!r} is invalid: expected a positive int such as 64 or 128 "
                         "(the Triton kernels take 16, 32, 64, 128 or 256)")
    return int(value)


def _check_length(name: str, value) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: expected a positive int (the token count; attention needs "
                         "at least one query and one key)")
    return int(value)


def _check_block_tensors(visited: torch.Tensor, mask_ids, mask_table, block_q: int, block_k: int) -> None:
    """``from_block_masks``' visit matrix ``[Hl, nQ, nK]`` (bool, or 0/1 ints), mask ids and table: a float matrix
    (scores, probabilities) read as "nonzero" and float mask ids truncated, silently; mask ids of another shape
    raised torch's expand error, zero heads gave a layout whose repr divided by zero, and a table of another
    shape was refused only at the call, telling the user to build the layout with this very function."""
    if mask_table is not None and (not isinstance(mask_table, torch.Tensor) or mask_table.dim() != 3
                                   or tuple(mask_table.shape[1:]) != (block_q, block_k)):
        got = tuple(mask_table.shape) if isinstance(mask_table, torch.Tensor) else type(mask_table).__name__
        raise ValueError(f"mask_table has shape {got}; expected [P, block_q, block_k] = [P, {block_q}, {block_k}], "
                         "one bool element mask per distinct partial block")
    if mask_table is not None and (mask_table.is_floating_point() or mask_table.is_complex()):
        # (an additive float mask, SDPA's attn_mask form, 0 allowed and -inf masked, was read as "nonzero": the
        # element masks inverted, silently)
        raise TypeError(f"mask_table must be a bool tensor (True = allowed); got {mask_table.dtype}. For an additive "
                        "float mask (0 = allowed, -inf = masked) pass mask_table == 0")
    if visited.dtype != torch.bool and (visited.is_floating_point() or visited.is_complex()):
        raise TypeError(f"visited must be a bool tensor (True where a block pair is visited); got {visited.dtype}. "
                        "Threshold scores first, e.g. visited = scores > 0")
    if visited.shape[0] == 0:
        raise ValueError(f"visited has 0 heads {tuple(visited.shape)}; expected [nQ, nK] or [Hl, nQ, nK] with Hl >= 1")
    if mask_ids is None:
        return
    if not isinstance(mask_ids, torch.Tensor) or mask_ids.is_floating_point() or mask_ids.dtype == torch.bool:
        got = mask_ids.dtype if isinstance(mask_ids, torch.Tensor) else type(mask_ids).__name__
        raise TypeError(f"mask_ids must be an integer tensor (-1 for full blocks, else a row of mask_table); got {got}")
    try:
        fits = torch.broadcast_shapes(mask_ids.shape, visited.shape) == visited.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask_ids has shape {tuple(mask_ids.shape)}; expected the visit matrix's "
                         f"{tuple(visited.shape[-2:])} (or [Hl, nQ, nK] = {tuple(visited.shape)})")


def _pack(visited: torch.Tensor, ids: torch.Tensor, width: Optional[int] = None
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[Hl, R, C] visit matrix -> counts [Hl, R], indices/mask ids [Hl, R, width] (ascending). ``width``: the
    caller's bound on any row's count (no host sync); None: the widest row's (read from the device)."""
    running = visited.cumsum(-1)  # visited columns up to each column; the last is the row's count
    counts = running[..., -1].to(_INT)
    if width is None:
        width = max(int(counts.max()) if counts.numel() else 0, 1)
    # Each visited column goes to its place in the row's list (the visited columns before it): ascending, in one
    # pass where a stable sort of every row took several (VSA packs a [heads, cubes, cubes] matrix per call: 2x
    # faster on a CPU at Wan 1.3B's). Unvisited columns, and any past ``width``, go to a spare slot, dropped after.
    slot = torch.where(visited, running - 1, width).clamp_(max=width)
    dev = visited.device
    shape = visited.shape[:-1] + (width + 1,)
    cols = torch.arange(visited.shape[-1], dtype=_INT, device=dev).expand(visited.shape)
    indices = torch.zeros(shape, dtype=_INT, device=dev).scatter_(-1, slot, cols)[..., :width]
    mask_ids = torch.full(shape, -1, dtype=_INT, device=dev).scatter_(-1, slot, ids.to(_INT))[..., :width]
    return counts.contiguous(), indices.contiguous(), mask_ids.contiguous()


def _transposed_rows(cols: torch.Tensor, ids: Optional[torch.Tensor], n_k: int, width: int
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The transposed side of full rows, as :func:`_pack` of their transposed visit matrix gives it: counts
    ``[Hl, n_k]``, query blocks and mask ids ``[Hl, n_k, width]`` (ascending; tails 0 and -1) of the key blocks
    ``cols`` (int64 ``[Hl, nQ, k]``, distinct per row) with mask ids ``ids`` (int32, alike; None: every pair full).
    A stable sort of the ``nQ * k`` pairs by key block (query blocks stay ascending within one) and a scatter to each
    pair's place: work in the pairs, where the visit matrix took a dozen passes over ``nQ x n_k`` entries per head
    (VSA at Wan 480p: 624 x 624 per head for 63 pairs a row), in 12 launches (14 with ``ids``). ``width``: the
    caller's bound on a key block's count, pairs past it dropped (as :func:`_pack` does)."""
    hl, n_q, k = cols.shape
    dev = cols.device
    key, order = cols.reshape(hl, n_q * k).sort(dim=-1, stable=True)
    # each pair's place in its key block's list: its index less the block's first (a search of the keys in themselves)
    place = torch.arange(n_q * k, device=dev) - torch.searchsorted(key, key)
    spare = width < n_q  # (a place past the bound goes to a spare slot, dropped after)
    stride = width + spare
    slot = (place.clamp_(max=width) if spare else place).add_(key, alpha=stride)
    q_rows = torch.div(order, k, rounding_mode="floor").to(_INT)
    indices = torch.zeros(hl, n_k * stride, dtype=_INT, device=dev).scatter_(1, slot, q_rows)
    mask_ids = torch.full((hl, n_k * stride), -1, dtype=_INT, device=dev)
    if ids is not None:
        mask_ids.scatter_(1, slot, ids.reshape(hl, n_q * k).to(_INT).gather(1, order))
    counts = torch.searchsorted(key, _block_bounds(hl, n_k, dev), out_int32=True).diff(dim=1)
    indices, mask_ids = (t.view(hl, n_k, stride) for t in (indices, mask_ids))
    if spare:
        indices, mask_ids = indices[..., :width].contiguous(), mask_ids[..., :width].contiguous()
    return counts, indices, mask_ids


_BOUNDS: dict = {}


def _block_bounds(hl: int, n_k: int, device: torch.device) -> torch.Tensor:
    """``0 .. n_k`` per layout head (int64 ``[hl, n_k + 1]``, contiguous: what ``searchsorted`` looks up for each
    key block's first pair), kept per shape and device outside traces and captures."""
    key = (hl, n_k, str(device))
    found = _BOUNDS.get(key)
    if found is None:
        found = torch.arange(n_k + 1, device=device).expand(hl, n_k + 1).contiguous()
        if not in_graph():  # (a traced tensor is fake, a captured one the graph's: neither is kept)
            if len(_BOUNDS) >= 64:
                _BOUNDS.clear()
            _BOUNDS[key] = found
    return found


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """``t``'s version counter (an in-place edit moves it), or None for an inference-mode tensor (it keeps none,
    and refuses in-place edits outside inference mode)."""
    try:
        return t._version
    except RuntimeError:
        return None


#: A key of :attr:`BlockLayout.derived`, True where every query block visits as many key blocks (built so, by
#: :meth:`BlockLayout._from_full_rows`; never inferred from the counts, which would read the device).
UNIFORM_KV_ROWS = "uniform_kv_rows"

#: A key of :attr:`BlockLayout.derived`, True where each listed pair's mask is its key block's, the same element
#: mask in every query row of the block (VSA's partial cubes: their real columns): each key block's transposed row
#: then lists tiles of one class (``tile_plans.tile_plan``). Declared by the builder, never inferred.
KEY_COLUMN_MASKS = "key_column_masks"

#: Keys of :attr:`BlockLayout.derived`, True once the index lists were checked (:mod:`.layout_checks`: counts,
#: indices and mask ids in range, each block listed once, in increasing order) and once the transposed side was
#: found to list the rows' pairs; set up front by builders whose lists are right by construction.
CHECKED_LISTS = "checked_lists"
CHECKED_TRANSPOSED = "checked_transposed"

_EMPTY_TABLES: dict = {}


def _empty_table(block_q: int, block_k: int, device: torch.device) -> torch.Tensor:
    """The mask table of a layout without partial blocks, one per (block shape, device): layouts built per call
    share it, and with it what the launchers derive from their table (``tile_plans._mask_classes``). It holds no
    element, so no edit can change it."""
    key = (block_q, block_k, str(device))
    table = _EMPTY_TABLES.get(key)
    if table is None:
        table = torch.zeros(0, block_q, block_k, dtype=torch.bool, device=device)
        if not in_graph():  # (a traced table is fake, a captured one the graph's: neither is shared)
            _EMPTY_TABLES[key] = table
    return table


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Block-sparse visit list shared by every attention backend (see module docstring)."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    kv_mask_ids: torch.Tensor
    q_counts: torch.Tensor
    q_indices: torch.Tensor
    q_mask_ids: torch.Tensor
    mask_table: torch.Tensor
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _stamp: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The tensors' version counters now: an in-place edit (through any view) moves one, and the layout then
        # refuses to hand out what was derived from its old content (see ``derived``).
        object.__setattr__(self, "_stamp", self._versions())

    def _versions(self) -> Optional[tuple]:
        try:
            return tuple(getattr(self, name)._version for name in self.TENSORS)
        except (RuntimeError, AttributeError):  # inference-mode tensors keep no version (and refuse edits)
            return None

    @property
    def derived(self) -> dict:
        """What backends derived from this layout (launch decisions, device copies, plans); RuntimeError when
        the layout's tensors were changed in place since it was built (a layout is an immutable value)."""
        if not tracing() and self._stamp is not None:  # (traced: no read of _stamp, so no guard on it)
            now = self._versions()
            if now != self._stamp:
                changed = [name for name, a, b in zip(self.TENSORS, self._stamp, now or self._stamp) if a != b]
                raise RuntimeError(f"dit_accel: this BlockLayout's {', '.join(changed) or 'tensors'} changed in place "
                                   "after it was built; a layout is an immutable value whose launches, device copies "
                                   "and plans are cached with it. Build a new layout (BlockLayout.from_block_masks, "
                                   "from_dense_mask, or BlockLayout(...) from clones of the edited tensors)")
        return self._derived

    # ----------------------------------------------------------------- build
    @classmethod
    def from_block_masks(
        cls,
        visited: torch.Tensor,
        *,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_k: int,
        mask_ids: torch.Tensor | None = None,
        mask_table: torch.Tensor | None = None,
        widths: Optional[Tuple[int, int]] = None,
    ) -> "BlockLayout":
        """Build from a block-level visit matrix.

        Args:
            visited: bool ``[nQ, nK]`` or ``[Hl, nQ, nK]``, True where a block pair is visited.
            mask_ids: int ``[..., nQ, nK]``: ``-1`` for full blocks, else an index into
                ``mask_table``. ``None`` means every visited block is full.
            mask_table: bool ``[P, block_q, block_k]`` element masks of partial blocks.
            widths: ``(kv, q)`` bounds the caller knows on the key blocks a query row visits and the query
                blocks a key column is visited by: the index lists are that wide (padding past each count), and
                nothing is read back from the device (a build inside a CUDA graph capture). None: as wide as the
                widest row, read from the device.
        """
        block_q, block_k = _check_size("block_q", block_q), _check_size("block_k", block_k)
        q_len, kv_len = _check_length("q_len", q_len), _check_length("kv_len", kv_len)
        if not isinstance(visited, torch.Tensor) or visited.dim() not in (2, 3):
            raise ValueError("visited must be a bool tensor [nQ, nK] or [Hl, nQ, nK]; got "
                             f"{type(visited).__name__} {tuple(getattr(visited, 'shape', ()))}")
        if visited.dim() == 2:
            visited = visited[None]
        _check_block_tensors(visited, mask_ids, mask_table, block_q, block_k)
        visited = visited.bool()
        n_q, n_k = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
        if visited.shape[-2:] != (n_q, n_k):
            raise ValueError(
                f"visited has block shape {tuple(visited.shape[-2:])}, expected ({n_q}, {n_k}) for "
                f"q_len={q_len}, kv_len={kv_len}, block_q={block_q}, block_k={block_k}")
        if mask_ids is None:
            mask_ids = torch.full(visited.shape, -1, dtype=_INT, device=visited.device)
        else:
            mask_ids = mask_ids.to(_INT).expand(visited.shape)
        if mask_table is None:
            mask_table = _empty_table(block_q, block_k, visited.device)
        mask_ids = torch.where(visited, mask_ids, -1)
        if widths is not None and not (isinstance(widths, (tuple, list)) and len(widths) == 2
                                       and all(is_int(w) and w >= 1 for w in widths)):
            # (a negative bound raised torch's "index -1 is out of bounds", a float one torch.Size's TypeError)
            raise ValueError(f"widths={widths!r} is invalid: expected (kv, q), two positive ints bounding the key "
                             "blocks any query block visits and the query blocks any key block is visited by; or "
                             "None (read from the visit matrix)")
        kv_width, q_width = (int(w) for w in widths) if widths is not None else (None, None)
        kv = _pack(visited, mask_ids, kv_width)
        qt = _pack(visited.transpose(-1, -2), mask_ids.transpose(-1, -2), q_width)
        layout = cls(q_len, kv_len, block_q, block_k, *kv, *qt, mask_table.bool().contiguous())
        layout.derived[CHECKED_TRANSPOSED] = True  # (both sides from one visit matrix; the rows are checked on use)
        return layout

    @classmethod
    def _from_full_rows(cls, kv_indices: torch.Tensor, kv_mask_ids: torch.Tensor, *, q_len: int, kv_len: int,
                        block_q: int, block_k: int, mask_table: Optional[torch.Tensor], q_width: int,
                        key_column_masks: bool = False) -> "BlockLayout":
        """A layout in which every query block visits ``kv_indices.shape[-1]`` key blocks: int ``[Hl, nQ, k]``,
        ascending per row (VSA's top-k selection), with their mask ids (int32, ``-1`` full; all -1 without a
        ``mask_table``); ``q_width`` bounds the query blocks that visit one key block. For callers whose lists are
        valid by construction (they are not checked): built on their device without a host sync, the transposed
        side from the pairs alone (:func:`_transposed_rows`; VSA builds a layout per call). ``key_column_masks``:
        the caller declares :data:`KEY_COLUMN_MASKS`."""
        hl, n_q, k = kv_indices.shape
        dev = kv_indices.device
        q_side = _transposed_rows(kv_indices.long(), None if mask_table is None else kv_mask_ids,
                                  _cdiv(kv_len, block_k), q_width)
        table = _empty_table(block_q, block_k, dev) if mask_table is None else mask_table
        layout = cls(q_len, kv_len, block_q, block_k, torch.full((hl, n_q), k, dtype=_INT, device=dev),
                     kv_indices.to(_INT), kv_mask_ids, *q_side, table)
        layout.derived[UNIFORM_KV_ROWS] = True  # every query block lists k key blocks (launchers: work order)
        layout.derived[CHECKED_LISTS] = layout.derived[CHECKED_TRANSPOSED] = True  # (valid by construction)
        if key_column_masks:
            layout.derived[KEY_COLUMN_MASKS] = True
        return layout

    @classmethod
    def from_dense_mask(cls, mask: torch.Tensor, block_q: int = 64, block_k: int = 64) -> "BlockLayout":
        """Build from a token mask ``[N, M]`` or ``[H, N, M]`` (True = allowed).

        Blocks with no allowed pair are skipped, blocks whose in-range pairs are all
        allowed are full, the rest are partial with their element mask (deduplicated).
        Materialises the mask, so meant for tests, inspection and moderate N.
        """
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch bool tensor [N, M] or [H, N, M]; got {type(mask).__name__}. "
                            "Convert it with torch.as_tensor(mask, dtype=torch.bool)")
        if mask.dtype != torch.bool or mask.dim() not in (2, 3):
            raise ValueError(f"mask must be a bool tensor [N, M] or [H, N, M]; got {mask.dtype} {tuple(mask.shape)}")
        if 0 in mask.shape:
            raise ValueError(f"mask has an empty dimension {tuple(mask.shape)}; attention needs N, M >= 1")
        block_q, block_k = _check_size("block_q", block_q), _check_size("block_k", block_k)
        if mask.dim() == 2:
            mask = mask[None]
        hl, q_len, kv_len = mask.shape
        n_q, n_k = _cdiv(q_len, block_q), _cdiv(kv_len, block_k)
        padded = torch.zeros(hl, n_q * block_q, n_k * block_k, dtype=torch.bool, device=mask.device)
        padded[:, :q_len, :kv_len] = mask
        inside = torch.zeros_like(padded[0])
        inside[:q_len, :kv_len] = True
        blocks = padded.view(hl, n_q, block_q, n_k, block_k).permute(0, 1, 3, 2, 4)
        inside_b = inside.view(n_q, block_q, n_k, block_k).permute(0, 2, 1, 3)
        visited = blocks.any(dim=(-1, -2))
        full = (blocks | ~inside_b).all(dim=(-1, -2)) & visited
        partial = visited & ~full
        mask_ids = torch.full(visited.shape, -1, dtype=_INT, device=mask.device)
        if partial.any():
            table, inverse = torch.unique(blocks[partial].reshape(-1, block_q * block_k), dim=0, return_inverse=True)
            mask_ids[partial] = inverse.to(_INT)
            table = table.view(-1, block_q, block_k)
        else:
            table = None
        return cls.from_block_masks(visited, q_len=q_len, kv_len=kv_len, block_q=block_q, block_k=block_k,
                                    mask_ids=mask_ids, mask_table=table)

    # --------------------------------------------------------------- inspect
    @property
    def num_heads(self) -> int:
        """1 when all heads share the layout, else the number of heads."""
        return self.kv_counts.shape[0]

    @property
    def num_q_blocks(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return self.q_counts.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    def density(self) -> float:
        """Fraction of block pairs the kernels visit (full or partial), averaged over heads.

        Its inverse is the ideal ("speed of light") speedup over dense attention.
        """
        return float(self.kv_counts.sum()) / (self.num_heads * self.num_q_blocks * self.num_kv_blocks)

    def partial_fraction(self) -> float:
        """Fraction of visited blocks that need an element mask."""
        visited = int(self.kv_counts.sum())
        return float((self.kv_mask_ids >= 0).sum()) / max(visited, 1)

    def block_masks(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(visited, mask_ids)`` as dense ``[Hl, nQ, nK]`` block matrices."""
        hl, n_q, n_k = self.num_heads, self.num_q_blocks, self.num_kv_blocks
        visited = torch.zeros(hl, n_q, n_k, dtype=torch.bool, device=self.device)
        mask_ids = torch.full((hl, n_q, n_k), -1, dtype=_INT, device=self.device)
        keep = torch.arange(self.kv_indices.shape[-1], device=self.device) < self.kv_counts[..., None]
        h, q, slot = keep.nonzero(as_tuple=True)
        k = self.kv_indices[h, q, slot].long()
        visited[h, q, k] = True
        mask_ids[h, q, k] = self.kv_mask_ids[h, q, slot]
        return visited, mask_ids

    def select(self, *, rows: Optional[Tuple[int, int]] = None, cols: Optional[Tuple[int, int]] = None,
               heads: Optional[Tuple[int, int]] = None) -> "BlockLayout":
        """The layout restricted to query tokens ``rows = (start, stop)``, key tokens ``cols`` and layout heads.

        ``start`` must be a multiple of the block size, ``stop`` too unless it is the length (a
        ragged last block). ``heads`` selects layout heads (a shared layout, one head, keeps its
        single head). Used to split attention across ranks (context parallelism).
        """
        rows = (0, self.q_len) if rows is None else rows
        cols = (0, self.kv_len) if cols is None else cols
        for name, pair, block, length in (("rows", rows, self.block_q, self.q_len),
                                          ("cols", cols, self.block_k, self.kv_len)):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(is_int(x) for x in pair)):
                # (floats raised "slice indices must be integers" from inside)
                raise ValueError(f"{name}={pair!r} must be (start, stop), two ints")
            start, stop = pair
            if not (0 <= start < stop <= length) or start % block or (stop % block and stop != length):
                raise ValueError(f"{name}={(start, stop)} must be block-aligned ({block}) within [0, {length}]")
        if heads is not None and self.num_heads > 1 and not (
                isinstance(heads, (tuple, list)) and len(heads) == 2 and all(is_int(x) for x in heads)
                and 0 <= heads[0] < heads[1] <= self.num_heads):  # (else sliced to 0 heads, or from the end)
            raise ValueError(f"heads={heads!r} must be (start, stop) with 0 <= start < stop <= {self.num_heads}, "
                             "the layout's heads")
        visited, mask_ids = self.block_masks()
        if heads is not None and self.num_heads > 1:
            visited, mask_ids = visited[heads[0]:heads[1]], mask_ids[heads[0]:heads[1]]
        qs, ks = slice(rows[0] // self.block_q, _cdiv(rows[1], self.block_q)), \
            slice(cols[0] // self.block_k, _cdiv(cols[1], self.block_k))
        return BlockLayout.from_block_masks(visited[:, qs, ks], q_len=rows[1] - rows[0], kv_len=cols[1] - cols[0],
                                            block_q=self.block_q, block_k=self.block_k,
                                            mask_ids=mask_ids[:, qs, ks], mask_table=self.mask_table)

    def to_dense_mask(self) -> torch.Tensor:
        """Token mask ``[Hl, q_len, kv_len]`` of exactly what the kernels compute (for tests)."""
        visited, mask_ids = self.block_masks()
        hl, n_q, n_k = visited.shape
        bq, bk = self.block_q, self.block_k
        table = torch.cat([self.mask_table, torch.ones(1, bq, bk, dtype=torch.bool, device=self.device)])
        tiles = table[torch.where(mask_ids >= 0, mask_ids, table.shape[0] - 1).long()]  # [Hl,nQ,nK,bq,bk]
        tiles &= visited[..., None, None]
        dense = tiles.permute(0, 1, 3, 2, 4).reshape(hl, n_q * bq, n_k * bk)
        return dense[:, : self.q_len, : self.kv_len]

    # ---------------------------------------------------------------- device
    def to(self, device) -> "BlockLayout":
        """The same layout with its tensors on ``device`` (a new layout; ``self`` when already there).

        Callers that move a layout on every call keep the copy: :class:`dit_accel.kernels` does, per
        device, in an explicit cache.
        """
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {name: getattr(self, name).to(device) for name in self.TENSORS}
        return BlockLayout(self.q_len, self.kv_len, self.block_q, self.block_k, **moved)

    #: The layout's tensor fields, in constructor order (the custom ops take them one by one).
    TENSORS = ("kv_counts", "kv_indices", "kv_mask_ids", "q_counts", "q_indices", "q_mask_ids", "mask_table")

    def __repr__(self) -> str:
        return (f"BlockLayout(q_len={self.q_len}, kv_len={self.kv_len}, block=({self.block_q}, {self.block_k}), "
                f"heads={self.num_heads}, density={self.density():.3f}, partial={self.partial_fraction():.3f})")
