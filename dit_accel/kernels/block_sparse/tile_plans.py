"""The layout at kernel-tile granularity: tile plans, their cache and the persistent forward's work order.

Pure tensor code (no triton): :func:`tile_plan` classifies every visited kernel tile of a layout as full or
partial and packs the element masks of the partial ones; :class:`_PlanCache` keeps what the launchers derive
from a layout (tile plans, work orders, launch arguments) with the layout's tensors; :func:`work_order` is the
persistent forward's order of work items. The launchers in :mod:`.triton` use them.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Callable, Dict, Hashable, NamedTuple, Optional, Tuple, TypeVar

import torch

from ..geometry import prefix_counts
from ..layout import KEY_COLUMN_MASKS, BlockLayout, tensor_version
from ..request import in_graph

__all__ = ["TilePlan", "tile_plan", "work_order"]

T = TypeVar("T")


# ---------------------------------------------------------------------------
# the plan: the layout at kernel-tile granularity
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TilePlan:
    """A layout at kernel-tile granularity, for one kernel tile shape.

    ``plan``: int32 ``[Hl, R, 2 + 2 * w]``; row ``r`` (an owned tile: a query tile, or a key tile
    for dK/dV) is ``[n_full, n_partial, streamed tiles (w), bit offsets (w)]``: the full tiles
    first, then the partial ones, each group ascending, so one loop can walk both (the forward)
    or two loops each its own (the backward). ``bits``: int64 row-mask words; the words of a
    tile start at its bit offset, one per owned row, the next 64 streamed columns ``bits_w``
    words further (a full tile's offset is valid too: its block's or an all-true mask). A plan with lengths
    (:func:`tile_plan`'s ``lengths``) has a third header entry, ``n_length``, and lists its length tiles after
    the full ones, each with its column count in place of a bit offset.
    """

    plan: torch.Tensor
    bits: torch.Tensor
    w: int
    bits_w: int

    def args(self) -> tuple:
        """``plan_h, plan_r, w, bits_w`` as the kernels take them (head stride 0: one pattern for all heads)."""
        head = 0 if self.plan.shape[0] == 1 else self.plan.stride(0)
        return head, self.plan.stride(1), self.w, self.bits_w

    def tile_counts(self) -> Tuple[int, int]:
        """``(full, partial)`` tiles listed over all rows (for tests and statistics)."""
        return int(self.plan[..., 0].sum()), int(self.plan[..., 1].sum())


def _pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """bool ``[..., C]`` -> int64 ``[..., cdiv(C, 64)]``: bit ``j`` of word ``w`` is column ``64 w + j``."""
    cols = masks.shape[-1]
    words = -(-cols // 64)
    padded = torch.nn.functional.pad(masks.to(torch.uint8), (0, words * 64 - cols))
    byte_bits = padded.view(*masks.shape[:-1], words * 8, 8) << torch.arange(8, dtype=torch.uint8,
                                                                            device=masks.device)
    packed = byte_bits.sum(-1, dtype=torch.uint8)  # distinct bits: the sum is the bitwise or
    return packed.contiguous().view(torch.int64)  # little-endian: byte 0 holds bits 0..7


def _mask_stats(table: torch.Tensor, n_cols: int, tile_r: int, tile_c: int):
    """Per mask (the table's, then an all-True one for full blocks), unbounded and bounded to the
    columns of the ragged last block: ``any``/``all`` per (row sub-tile, column sub-tile), whether the sub-tile is
    a column prefix and its column count, and the bit words."""
    p, block_r, block_c = table.shape
    dev = table.device
    masks = torch.cat([table.bool(), torch.ones(1, block_r, block_c, dtype=torch.bool, device=dev)])
    last = n_cols - (-(-n_cols // block_c) - 1) * block_c  # columns of the last block that exist
    both = torch.stack([masks, masks & (torch.arange(block_c, device=dev) < last)])
    r_sub, c_sub = block_r // tile_r, block_c // tile_c
    tiles = both.view(2, p + 1, r_sub, tile_r, c_sub, tile_c)
    any_t = tiles.any(5).any(3)  # [2, P+1, r_sub, c_sub]
    all_t = tiles.all(5).all(3)
    words = _pack_bits(both.view(2, p + 1, block_r, c_sub, tile_c))  # [2, P+1, block_r, c_sub, W]
    # A sub-tile whose allowed pairs are its first c columns in every row: a length (its column count).
    prefix, count = prefix_counts(tiles, rows=3)  # [2, P+1, r_sub, c_sub]
    stats = (any_t, all_t, prefix, count)
    return stats, words.permute(0, 1, 3, 4, 2).contiguous().view(-1)  # -> [2, P+1, c_sub, W, block_r]


class _Classes(NamedTuple):
    """Per kind of streamed tile (ragged or not, x its block's mask, x its row and column sub-tile), flat:
    ``kind`` (0 full, 1 length, 2 partial, 3 skipped: nothing allowed) and ``entry`` (its bit offset, or a
    length tile's column count); ``bits``: the packed masks. The block's mask index is shifted by one, the
    all-True mask of full blocks first, so a block's class is its mask id + 1."""

    kind: torch.Tensor
    entry: torch.Tensor
    bits: torch.Tensor
    masks: int


def _classes(table: torch.Tensor, n_cols: int, tile_r: int, tile_c: int, lengths: Optional[bool]) -> _Classes:
    """The :class:`_Classes` of ``table`` (owned rows first) for ``(tile_r, tile_c)`` tiles and ``n_cols`` streamed
    columns, by :func:`tile_plan`'s rules (a ragged tile is never full; with ``lengths`` False it stays masked)."""
    (any_t, all_t, prefix, count), bits = _mask_stats(table, n_cols, tile_r, tile_c)  # [2, P+1, r_sub, c_sub]
    p, block_r = table.shape[:2]
    dev = table.device
    var = torch.arange(2, device=dev)[:, None, None, None]
    pm = torch.arange(p + 1, device=dev)[None, :, None, None]
    rs = torch.arange(all_t.shape[2], device=dev)[None, None, :, None]
    cs = torch.arange(all_t.shape[3], device=dev)
    full = all_t & (var == 0)  # a ragged tile (past the streamed length) is never full
    part = ~full & any_t
    if lengths is None:
        length = torch.zeros_like(part)
    else:  # pointer loads (lengths False) keep the ragged last key tile bit-masked
        length = part & prefix & ((var == 0) if lengths is False else True)
    kind = torch.where(full, 0, torch.where(length, 1, torch.where(part, 2, 3)))
    entry = ((var * (p + 1) + pm) * all_t.shape[3] + cs) * (-(-tile_c // 64) * block_r) + rs * tile_r
    entry = torch.where(length, count, entry)
    first = lambda x: torch.cat([x[:, p:], x[:, :p]], 1).reshape(-1)  # noqa: E731  (all-True mask first)
    return _Classes(first(kind).to(torch.int8), first(entry).to(torch.int32), bits, p)


class _TensorSlots:
    """A dict per tensor, gone when the tensor goes: keyed by the tensor's id and checked by a weak reference to
    it (a new tensor that takes a dead one's id finds no slot). Callers keep what they derive from a tensor there:
    :class:`_PlanCache` per ``kv_indices`` anchor, :func:`_mask_classes` per mask table."""

    def __init__(self) -> None:
        self._entries: Dict[int, tuple] = {}
        self._lock = threading.Lock()

    def peek(self, t: torch.Tensor) -> Optional[dict]:
        """``t``'s dict, or None when it has none."""
        slot = self._entries.get(id(t))
        return slot[1] if slot is not None and slot[0]() is t else None

    def get(self, t: torch.Tensor) -> dict:
        """``t``'s dict, made empty on first use."""
        found = self.peek(t)
        if found is not None:
            return found
        with self._lock:
            slot = self._entries.get(id(t))
            if slot is None or slot[0]() is not t:
                ident = id(t)

                def drop(ref, ident=ident):
                    if self._entries.get(ident, (None,))[0] is ref:
                        self._entries.pop(ident, None)

                slot = self._entries[ident] = (weakref.ref(t, drop), {})
            return slot[1]


#: Per mask table: {(its version, transposed, sizes, lengths): _Classes}.
_CLASSES = _TensorSlots()


def _mask_classes(table: torch.Tensor, transposed: bool, n_cols: int, block_r: int, block_c: int, tile_r: int,
                  tile_c: int, lengths: Optional[bool]) -> _Classes:
    """:func:`_classes` of a layout's mask table, kept with the table (layouts built per call share theirs, as
    VSA's share one per grid): the table as the kernel tile owns its rows (``transposed``: key rows), an empty
    one for a table without masks. Not kept when built inside a capture or a trace (its tensors would be the
    graph's, written only when it replays)."""
    def build() -> _Classes:
        rows = table.transpose(1, 2) if transposed else table
        if rows.shape[1:] != (block_r, block_c):  # an empty table may carry any block shape
            rows = rows.new_zeros((0, block_r, block_c))
        return _classes(rows, n_cols, tile_r, tile_c, lengths)

    if in_graph():
        return build()
    key = (tensor_version(table), transposed, n_cols, block_r, block_c, tile_r, tile_c, lengths)
    kept = _CLASSES.get(table)
    found = kept.get(key)
    if found is None:
        if len(kept) >= 64:
            kept.clear()
        found = kept.setdefault(key, build())
    return found


def tile_plan(layout: BlockLayout, tile_r: int, tile_c: int, transposed: bool = False,
              lengths: Optional[bool] = None) -> TilePlan:
    """The :class:`TilePlan` of ``layout`` for ``(tile_r, tile_c)`` kernel tiles (owned x streamed).

    ``transposed``: key tiles own, query tiles stream (the dK/dV kernel). Every visited tile is
    classified on its own: *full* when all its pairs are allowed and it is not ragged (no mask
    code runs on it), *partial* when some are (its bit-packed element mask applies), skipped
    otherwise. A tile reaching past the streamed length is partial with that bound in its bits.

    ``lengths`` (the forward's length variant, :mod:`.lengths`): a partial tile whose allowed pairs are
    its first ``c`` columns in every row is a *length* tile, listed between the full and the partial
    ones with ``c`` in place of its bit offset; the row header is then ``[n_full, n_length + n_partial,
    n_length]``. ``True`` also takes the ragged last key tile as a length (TMA loads zero-fill past the
    streamed length), ``False`` keeps it partial (pointer loads guard it with row masks). None: no lengths.

    A tile's class (kind and entry) is a function of its block's mask, its sub-tile and whether it is
    ragged: those are worked out once per mask table (:func:`_mask_classes`), and a layout's plan is a
    lookup per listed tile, a sort and a gather (about 20 launches; VSA builds a layout per call), or, where
    its tiles are whole unmasked blocks, its lists as they are (:func:`_lists_plan`).
    """
    if transposed:
        counts, indices, mask_ids = layout.q_counts, layout.q_indices, layout.q_mask_ids
        n_rows, n_cols, block_r, block_c = layout.kv_len, layout.q_len, layout.block_k, layout.block_q
    else:
        counts, indices, mask_ids = layout.kv_counts, layout.kv_indices, layout.kv_mask_ids
        n_rows, n_cols, block_r, block_c = layout.q_len, layout.kv_len, layout.block_q, layout.block_k
    classes = _mask_classes(layout.mask_table, transposed, n_cols, block_r, block_c, tile_r, tile_c, lengths)
    dev = indices.device
    r_sub, c_sub = block_r // tile_r, block_c // tile_c
    if _whole_blocks(layout.mask_table, r_sub, c_sub, n_cols % block_c):
        return _lists_plan(counts, indices, classes, lengths, block_r, r_sub, c_sub, -(-n_rows // tile_r))
    hl, width = indices.shape[0], indices.shape[-1]
    # A listed tile's class index: ((ragged * (P + 1) + mask id + 1) * r_sub + row sub-tile) * c_sub + column
    # sub-tile (:class:`_Classes`).
    code, u = mask_ids + 1, indices
    # Each key tile row's listed tiles of one class (the mask is the key block's and the same in every query row,
    # so every streamed sub-tile of every listed block classifies alike): the stable sort by class would leave the
    # lists in place, and a row's counts are its class's (VSA's backward, per call: no pass over the lists).
    uniform = transposed and width and not n_cols % block_c and layout.derived.get(KEY_COLUMN_MASKS, False)
    listed = None if uniform else torch.arange(width, device=dev) < counts[..., None]  # [Hl, nR, width]
    if r_sub > 1:  # each block's rows as r_sub owned tiles
        t = torch.arange(-(-n_rows // tile_r), device=dev)
        rb, rs = t // r_sub, (t % r_sub)[:, None]
        code, u, counts = code[:, rb] * r_sub + rs, u[:, rb], counts[:, rb]
        listed = None if uniform else listed[:, rb]
    if c_sub > 1:  # each listed block as c_sub streamed tiles
        cs = torch.arange(c_sub, device=dev, dtype=u.dtype)
        code, u = torch.add(cs, code[..., None], alpha=c_sub), torch.add(cs, u[..., None], alpha=c_sub)
        listed = None if uniform else listed[..., None].expand(u.shape)
    if n_cols % block_c:  # tiles reaching past the streamed length (the last block's): the bounded classes
        code = code + (u >= n_cols // tile_c) * ((classes.masks + 1) * r_sub * c_sub)
    rows = u.shape[1]
    if uniform:
        u, entry = u.reshape(hl, rows, -1), classes.entry[code].reshape(hl, rows, -1)
        kind = classes.kind[code.reshape(hl, rows, -1)[..., 0]]  # the row's class (its first tile's)
        tiles_of = lambda kinds: torch.where(kinds, counts.long() * c_sub, 0)  # noqa: E731
        n_full, n_listed, n_length = tiles_of(kind == 0), tiles_of(kind < 3), tiles_of(kind == 1)
    else:
        kind = torch.where(listed, classes.kind[code], 3).reshape(hl, rows, -1)
        order = torch.sort(kind, dim=-1, stable=True).indices
        u = torch.gather(u.reshape(hl, rows, -1), -1, order)
        entry = torch.gather(classes.entry[code].reshape(hl, rows, -1), -1, order)
        n_full, n_listed, n_length = (kind == 0).sum(-1), (kind < 3).sum(-1), (kind == 1).sum(-1)
    n_part = n_listed - n_full
    if in_graph() or r_sub * c_sub <= 2:
        # Inside a capture (a layout the eager warm-up did not plan, or copied), or at most two tiles per block:
        # the index lists' width (their widest row, or the bound the caller declared, as VSA's per-call layouts
        # do) times c_sub is the plan's, at most twice the widest row's, and no host sync reads it (a forward or a
        # backward of VSA's 64-token cubes plans per call); unused tail entries are never read by the kernels.
        w = u.shape[-1]
    else:
        w = int(n_listed.max()) if n_listed.numel() else 0  # one host sync per (layout, tile shape): cached
    head = [n_full, n_part] + ([] if lengths is None else [n_length])
    plan = torch.cat([torch.stack(head, -1).to(torch.int32), u[..., :w].to(torch.int32), entry[..., :w]], -1)
    return TilePlan(plan.contiguous(), classes.bits, w, block_r)


def _whole_blocks(table: torch.Tensor, r_sub: int, c_sub: int, ragged: int) -> bool:
    """Whether every tile of a plan is full: no element mask and no block past the streamed length, with at most
    two kernel tiles per block (more take their plan's width from the device, as :func:`tile_plan` does) or inside
    a capture (:func:`_lists_plan` then builds it)."""
    return table.shape[0] == 0 and not ragged and (r_sub * c_sub <= 2 or in_graph())


def _lists_plan(counts: torch.Tensor, indices: torch.Tensor, classes: _Classes, lengths: Optional[bool],
               block_r: int, r_sub: int = 1, c_sub: int = 1, rows: Optional[int] = None) -> TilePlan:
    """:func:`tile_plan` where every tile is full (:func:`_whole_blocks`): the listed tiles keep the lists' own
    order, each block's ``c_sub`` streamed tiles in turn and each block row as ``r_sub`` owned rows of ``rows``, so
    the plan is the lists expanded, with a header and each tile's full-class entry; the same plan as the
    classification's (4 launches with whole-block tiles where that takes 18, no sort of the lists; VSA's cubes plan
    so per call, the backward's half-block tiles too)."""
    dev = indices.device
    if r_sub > 1:  # each block row as r_sub owned tile rows
        rb = torch.arange(rows, device=dev) // r_sub
        counts, indices = counts[:, rb], indices[:, rb]
    hl, n_rows, width = indices.shape
    if r_sub * c_sub == 1:
        entry = classes.entry[:1].expand(indices.shape)
    else:  # a full tile's class (:func:`_classes`) is its row sub-tile * c_sub + its column sub-tile
        code = (torch.arange(n_rows, device=dev) % r_sub)[:, None] * c_sub + torch.arange(c_sub, device=dev)
        entry = classes.entry[code][None, :, None, :].expand(hl, n_rows, width, c_sub).reshape(hl, n_rows, -1)
    if c_sub > 1:  # each listed block as c_sub streamed tiles
        indices = (indices[..., None] * c_sub + torch.arange(c_sub, device=dev, dtype=indices.dtype)).flatten(-2)
    zero = torch.zeros_like(counts)
    head = torch.stack([counts * c_sub, zero] + ([] if lengths is None else [zero]), -1).to(torch.int32)
    return TilePlan(torch.cat([head, indices.to(torch.int32), entry], -1), classes.bits, indices.shape[-1], block_r)


class _PlanCache:
    """What the launchers derive from a layout: tile plans, work orders and launch arguments.

    The custom ops rebuild a :class:`BlockLayout` around the same tensors on every call, so the
    layout object cannot be the key. An entry is anchored on the layout's ``kv_indices`` tensor (it
    goes when that tensor goes) and keyed inside by the layout's lengths, block sizes and the identity
    of its other tensors (:func:`_identity`): a layout that shares ``kv_indices`` with another but
    differs in anything else gets its own entry. The entry holds those tensors, so their ids cannot
    be reused by others while it lives. Each layout keeps at most :attr:`max_values` values (tile
    plans, work orders, launch arguments per call signature), the oldest dropped first, and an anchor
    at most :attr:`max_layouts` layouts. Layouts are values: their tensors are not edited in place.
    """

    max_values = 64
    max_layouts = 8

    def __init__(self) -> None:
        self._anchors = _TensorSlots()
        self._lock = threading.Lock()

    def get(self, layout: BlockLayout, key: Hashable, build: Callable[[], T]) -> T:
        layouts = self._anchors.peek(layout.kv_indices)
        held = None if layouts is None else layouts.get(_identity(layout))
        if held is not None:
            value = held[1].get(key)
            if value is not None:
                return value
        value = build()  # outside the lock: a racing duplicate build is harmless
        with self._lock:
            layouts = self._anchors.get(layout.kv_indices)
            name = _identity(layout)
            held = layouts.get(name)
            if held is None:
                if len(layouts) >= self.max_layouts:
                    layouts.pop(next(iter(layouts)))
                # The layout's other tensors, held so that their ids stay theirs; never the anchor itself
                # (the entry would keep its own key alive).
                others = tuple(getattr(layout, t) for t in BlockLayout.TENSORS if t != "kv_indices")
                held = layouts[name] = (others, {})
            values = held[1]
            if key not in values and len(values) >= self.max_values:
                values.pop(next(iter(values)))
            return values.setdefault(key, value)

    def values(self, layout: BlockLayout) -> dict:
        """``{key: value}`` held for ``layout`` (a copy; for inspection and tests)."""
        layouts = self._anchors.peek(layout.kv_indices)
        held = None if layouts is None else layouts.get(_identity(layout))
        return {} if held is None else dict(held[1])


def _identity(layout: BlockLayout) -> tuple:
    """A layout's geometry and the identity of its tensors other than ``kv_indices`` (the anchor)."""
    return (layout.q_len, layout.kv_len, layout.block_q, layout.block_k, id(layout.kv_counts),
            id(layout.kv_mask_ids), id(layout.q_counts), id(layout.q_indices), id(layout.q_mask_ids),
            id(layout.mask_table))


def work_order(plan: TilePlan, batch: int, heads: int, uniform: bool = False) -> torch.Tensor:
    """The persistent forward's work items, in the order its programs take them.

    int32 ``[batch * heads * R]``, item ``(b * heads + h) * R + r`` for query tile ``r`` of head
    ``h`` of batch ``b``, each exactly once: the longest rows (most key tiles) first, so the short
    ones fill the gaps at the end (GNA's border rows, radial attention's near-diagonal rows); rows
    of equal length stay in (batch, head, query tile) order, so programs running side by side
    share a head's K/V in L2. Host data built on the plan's device without a sync, once per
    (layout, tile shape, batch, heads): :func:`_work_order` caches it with the plan. ``uniform``: the caller knows
    every row lists as many tiles, so the order is the items' own (one launch, no sort).
    """
    if uniform:
        return torch.arange(batch * heads * plan.plan.shape[1], dtype=torch.int32, device=plan.plan.device)
    counts = plan.plan[..., 0] + plan.plan[..., 1]  # [Hl, R] key tiles per row
    hl, r = counts.shape
    dev = counts.device
    bh = torch.arange(batch * heads, device=dev)
    lengths = counts[bh % heads if hl > 1 else torch.zeros_like(bh)]  # [B*H, R]
    order = torch.sort(lengths.reshape(-1), descending=True, stable=True).indices
    return order.to(torch.int32)  # the flat index is the item: (b * H + h) * R + r
