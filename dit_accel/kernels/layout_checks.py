"""What :func:`~dit_accel.kernels.block_sparse_attention` checks of a :class:`~dit_accel.kernels.BlockLayout`
before any backend reads it.

The kernels trust a layout's index lists: a key block listed twice took its softmax mass twice, an index past
the last block or a mask table of another block shape was read out of bounds by the Triton kernels, and a
transposed side that disagrees with the rows gave wrong dK/dV, each without an error. A layout from this
package's builders is right by construction, but ``BlockLayout(...)`` takes tensors as they are, and
``from_block_masks`` takes the caller's mask ids and table.

:func:`check_layout` runs both once per layout: :func:`check_fields` reads shapes, dtypes and devices only
(traced calls too), :func:`check_lists` the values (outside traces and captures, not on meta).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._util import cdiv, is_int
from .layout import CHECKED_LISTS, CHECKED_TRANSPOSED, BlockLayout
from .request import in_graph

__all__ = ["check_layout", "check_fields", "check_lists"]

_FIX = "build layouts with BlockLayout.from_block_masks or BlockLayout.from_dense_mask"


def _bad(message: str, kind=ValueError) -> Exception:
    return kind(f"layout: {message}; {_FIX}")


def check_fields(layout: BlockLayout) -> None:
    """``layout``'s sizes are positive ints and its tensors have the dtypes and shapes its lengths and block sizes
    give (int32 lists, a bool ``[P, block_q, block_k]`` mask table), on one device. Reads no value."""
    for name in ("q_len", "kv_len", "block_q", "block_k"):
        value = getattr(layout, name)
        if not is_int(value) or value < 1:
            raise _bad(f"{name}={value!r} is invalid: expected a positive int")
    device = getattr(layout.kv_counts, "device", None)
    for name in BlockLayout.TENSORS:
        t = getattr(layout, name)
        dtype = torch.bool if name == "mask_table" else torch.int32
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            got = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise _bad(f"{name} must be a {dtype} tensor; got {got} (cast it with .to({dtype}))", TypeError)
        if t.device != device:
            raise _bad(f"{name} is on {t.device} but kv_counts on {device}: a layout's tensors share one device")
    n_q, n_k = cdiv(layout.q_len, layout.block_q), cdiv(layout.kv_len, layout.block_k)
    hl = layout.kv_counts.shape[0] if layout.kv_counts.dim() == 2 else -1
    if hl < 1:
        raise _bad(f"kv_counts has shape {tuple(layout.kv_counts.shape)}; expected [layout heads >= 1, {n_q}]")
    for side, rows in (("kv", n_q), ("q", n_k)):
        counts, indices, ids = (getattr(layout, f"{side}_{part}") for part in ("counts", "indices", "mask_ids"))
        what = f"q_len={layout.q_len}, block_q={layout.block_q}" if side == "kv" else \
            f"kv_len={layout.kv_len}, block_k={layout.block_k}"
        if tuple(counts.shape) != (hl, rows):
            raise _bad(f"{side}_counts has shape {tuple(counts.shape)}; expected ({hl}, {rows}) for {hl} layout "
                       f"heads and {what}")
        if indices.dim() != 3 or tuple(indices.shape[:2]) != (hl, rows) or ids.shape != indices.shape:
            raise _bad(f"{side}_indices {tuple(indices.shape)} and {side}_mask_ids {tuple(ids.shape)} must both be "
                       f"({hl}, {rows}, width) for {hl} layout heads and {what}")
    table = layout.mask_table
    if table.dim() != 3 or tuple(table.shape[1:]) != (layout.block_q, layout.block_k):
        raise _bad(f"mask_table has shape {tuple(table.shape)}; expected [P, {layout.block_q}, {layout.block_k}] "
                   "(one element mask per partial block, of the layout's block size)")


def check_layout(layout: BlockLayout, transposed: bool) -> None:
    """:func:`check_fields`, then where the values can be read (not on meta, not while tracing or capturing)
    :func:`check_lists`; nothing for a layout whose lists were checked (or built right) already."""
    derived = layout.derived
    if derived.get(CHECKED_LISTS) and (derived.get(CHECKED_TRANSPOSED) or not transposed):
        return
    if not derived.get(CHECKED_LISTS):
        check_fields(layout)
    if layout.device.type != "meta" and not in_graph():
        check_lists(layout, transposed)


def check_lists(layout: BlockLayout, transposed: bool) -> None:
    """``layout``'s values, after :func:`check_fields`: per row, counts within the list width and listed indices
    in range, strictly increasing (each block once) with mask ids in ``[-1, P)``; with ``transposed``, the
    transposed side (the dK/dV backward's) lists the same pairs and masks as the rows. Once per layout: the
    answer is kept in ``layout.derived`` (a builder whose lists are right by construction sets it)."""
    derived = layout.derived
    if not derived.get(CHECKED_LISTS):
        n_q, n_k = layout.num_q_blocks, layout.num_kv_blocks
        for side, blocks in (("kv", n_k), ("q", n_q)):
            problem = _side_problem(layout, side, blocks)
            if problem is not None:
                raise _bad(problem)
        derived[CHECKED_LISTS] = True
    if transposed and not derived.get(CHECKED_TRANSPOSED):
        rows, cols = _pairs(layout, "kv"), _pairs(layout, "q")
        if not all(torch.equal(a, b) for a, b in zip(rows, cols)):
            raise _bad("q_counts, q_indices and q_mask_ids (the transposed side the backward reads) do not list the "
                       "pairs and mask ids that kv_counts, kv_indices and kv_mask_ids list")
        derived[CHECKED_TRANSPOSED] = True


def _side_problem(layout: BlockLayout, side: str, blocks: int) -> Optional[str]:
    """What is wrong with one side's lists (``side`` ``"kv"``: per query block, its key blocks), or None."""
    counts, indices, ids = (getattr(layout, f"{side}_{part}") for part in ("counts", "indices", "mask_ids"))
    width, tables = indices.shape[-1], layout.mask_table.shape[0]
    listed = torch.arange(width, device=counts.device) < counts[..., None]
    increasing = torch.ones_like(listed)
    increasing[..., 1:] = indices[..., 1:] > indices[..., :-1]
    faults = (
        ((counts < 0) | (counts > width), f"{side}_counts must lie in [0, {width}] (the width of {side}_indices)"),
        (listed & ((indices < 0) | (indices >= blocks)), f"{side}_indices must lie in [0, {blocks})"),
        (listed & ~increasing, f"{side}_indices must list each block once, in increasing order (a block listed "
                               "twice takes its softmax mass twice)"),
        (listed & ((ids < -1) | (ids >= tables)), f"{side}_mask_ids must be -1 (a full block) or a row of "
                                                  f"mask_table, which has {tables}"),
    )
    found = torch.stack([bad.any() for bad, _ in faults]).tolist()  # (one read of the device)
    for i, (hit, (bad, rule)) in enumerate(zip(found, faults)):
        if hit:
            where = tuple(int(x) for x in bad.nonzero()[0])
            row = "layout head {}, {} block {}".format(where[0], "query" if side == "kv" else "key", where[1])
            if i == 0:  # (built by from_block_masks with widths= below a row's count: the lists were cut there)
                return (f"{rule}; got count {int(counts[where])} at {row}. A layout built by "
                        f"BlockLayout.from_block_masks(..., widths=(kv, q)) with {side} = {indices.shape[-1]} below "
                        "that count lost the blocks past it: pass widths that bound every count, or widths=None")
            value = ids if i == len(faults) - 1 else indices
            return f"{rule}; got {int(value[where])} in slot {where[2]} at {row}"
    return None


def _pairs(layout: BlockLayout, side: str):
    """``(pairs, mask ids)`` one side's (checked) lists hold, each pair as ``(head * nQ + query block) * nK + key
    block``, in increasing order: the two sides of a layout give equal ones."""
    counts, indices, ids = (getattr(layout, f"{side}_{part}") for part in ("counts", "indices", "mask_ids"))
    h, r, s = (torch.arange(indices.shape[-1], device=counts.device) < counts[..., None]).nonzero(as_tuple=True)
    c = indices[h, r, s].long()
    q, k = (r, c) if side == "kv" else (c, r)
    pairs = (h * layout.num_q_blocks + q) * layout.num_kv_blocks + k
    pairs, order = pairs.sort()
    return pairs, ids[h, r, s][order]
