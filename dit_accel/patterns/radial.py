"""Radial attention (reference-implementation semantics, METHODS.md), at block level.

The rule is defined on frame pairs: same, adjacent and sink key frames are
dense; farther pairs keep a diagonal band whose half-width halves each time the
frame distance crosses a power of two, and pairs whose band would be narrower
than a block are kept only every ``B / width`` frames. The band is placed at
the frames' token offsets (raster order) and reduced to ``B x B`` blocks: a
block is kept iff more than 60% of its non-empty columns have more than 1/3 of
their rows inside the band. Rows and columns are the block's real tokens (a
ragged last block has fewer); a column is non-empty when at least one of its
rows is inside the band.

The reduction is over the placed (global) band, as METHODS.md states
(``rule="union"``). The reference code reduces each frame pair separately and ORs
the block masks; the two agree whenever ``H*W`` is a multiple of ``B`` (e.g.
48x80 with B = 128) and differ only in blocks that straddle a frame border
otherwise. ``rule="reference"`` reproduces the reference code's blocks exactly:
that per-pair reduction (a pair's rows of a block count against a fixed ``B``
rows, and a frame's tokens past its ``ceil(S/B)`` blocks are cut from the pair),
its frame-drop test with a fixed 128 where the rule says ``B`` (it matters at
``B = 64``, Wan 2.2), under which adjacent frames of fewer than 256 tokens can be
dropped too, and, when ``T*H*W`` is not a block multiple, a dense last block row
and column (the reference pads the tokens to a block multiple and its text-border
rule treats the block holding the last video tokens like text).

Block decisions depend only on the in-frame positions covered by the query and
key blocks and on the frame-pair rules involved, so they are evaluated once per
distinct combination (a few thousand for 720p video) with closed-form band
counts per column: never a token mask.

A variant with the same frame-pair rule and a true 2-D spatial window per far
frame pair, on tiled order, lives in :mod:`dit_accel.patterns.radial_window`.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from .._util import cdiv, is_int
from ..kernels.layout import BlockLayout
from .checks import as_grid, check_mask_memory, number_in, positive_int

__all__ = ["radial_layout", "radial_mask", "check_radial_args", "radial_args", "frame_pair_states", "RADIAL_RULES"]

#: ``"union"``: METHODS.md's rule (the default); ``"reference"``: the reference code's blocks exactly.
RADIAL_RULES = ("union", "reference")
# The reference code's frame-drop test hard-codes this threshold, whatever the block size.
_REFERENCE_SPLIT = 128

# Frame-pair states of frame_pair_states(): drop, full, and 2 + i for a band of half-width halves[i]
# (radial_window maps them by these numbers).
_DROP, _FULL = 0, 1


def check_radial_args(block_size, decay, sink_frames, *, owner: str = "", block_sizes: Tuple[int, ...] = ()):
    """Shape-free radial rules: a positive block size (one of ``block_sizes`` when given), ``decay`` in
    ``(0, 1]``, sink frames a tuple of distinct non-negative frame indices (the rule asks ``kf in sink_frames``,
    so a frame listed twice changes nothing but the config). Returns ``(block_size, decay, sinks)``."""
    block_size = positive_int("block_size", block_size, owner=owner, allowed=block_sizes)
    decay = number_in("decay", decay, 0.0, 1.0, owner=owner, lo_open=True)
    frames = tuple(sink_frames) if isinstance(sink_frames, (tuple, list)) else None
    if frames is None or not all(is_int(f) and f >= 0 for f in frames):
        raise ValueError(f"{owner}sink_frames={sink_frames!r} is invalid: expected a tuple of non-negative frame "
                         "indices, () to disable the attention sink")
    twice = sorted({int(f) for f in frames if frames.count(f) > 1})
    if twice:
        raise ValueError(f"{owner}sink_frames={sink_frames!r} is invalid: frame{'s' if len(twice) > 1 else ''} "
                         f"{', '.join(map(str, twice))} {'are' if len(twice) > 1 else 'is'} listed twice; list "
                         "each sink frame once")
    return block_size, decay, tuple(int(f) for f in frames)


def radial_args(grid, block_size, decay, sink_frames):
    grid = as_grid(grid)
    if len(grid) != 3:
        raise ValueError(f"grid={grid} is invalid for radial attention: expected (T, H, W), frames first "
                         "(radial attention needs a time axis: use GNA or Tile for images)")
    block_size, decay, frames = check_radial_args(block_size, decay, sink_frames)
    if any(f >= grid[0] for f in frames):
        raise ValueError(f"Radial.sink_frames={frames} is invalid for the token grid {grid}: it has {grid[0]} latent "
                         f"frames, so sink frame indices must be < {grid[0]} (() disables the sink)")
    return grid, block_size, decay, frames


def frame_pair_states(frames: int, tokens_per_frame: int, block: int, decay: float,
                      sink_frames: Sequence[int], rule: str = "union") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(state [F, F], halves)``: per (query frame, key frame) drop / full / band index.

    ``rule="reference"``: the drop test uses 128 instead of ``block`` and also applies to
    adjacent frames (only sink key frames skip it), as in the reference code.
    """
    ref = 2 ** tokens_per_frame.bit_length()
    union = rule == "union"
    split = block if union else _REFERENCE_SPLIT
    halves, state = [], torch.empty(frames, frames, dtype=torch.long)
    for qf in range(frames):
        for kf in range(frames):
            dist = abs(qf - kf)
            if kf in sink_frames or (union and dist <= 1):
                state[qf, kf] = _FULL
                continue
            width = ref / 2 ** dist.bit_length()
            if width < split and dist % int(split / width) != 0:
                state[qf, kf] = _DROP
                continue
            if dist <= 1:  # the reference rule: same and adjacent frames that survived the drop test
                state[qf, kf] = _FULL
                continue
            half = math.floor(max(decay * width, block))  # |k - l| is an integer
            if half >= tokens_per_frame - 1:
                state[qf, kf] = _FULL
                continue
            if half not in halves:
                halves.append(half)
            state[qf, kf] = 2 + halves.index(half)
    return state, torch.tensor(halves, dtype=torch.long)


def _segments(num_tokens: int, tokens_per_frame: int, block: int):
    """Per block, its frame segments: frame [nb, m] (-1 = none), in-frame [lo, hi) [nb, m]."""
    nb = -(-num_tokens // block)
    start = torch.arange(nb) * block
    end = torch.clamp(start + block, max=num_tokens)
    first, last = start // tokens_per_frame, (end - 1) // tokens_per_frame
    m = int((last - first).max()) + 1
    frame = first[:, None] + torch.arange(m)[None, :]
    valid = frame <= last[:, None]
    lo = torch.clamp(start[:, None] - frame * tokens_per_frame, min=0)
    hi = torch.clamp(end[:, None] - frame * tokens_per_frame, max=tokens_per_frame)
    frame = torch.where(valid, frame, -1)
    lo, hi = torch.where(valid, lo, 0), torch.where(valid, hi, 0)
    return frame, lo, hi


def _block_decisions(frame, lo, hi, state, halves, num_tokens, tokens_per_frame, block, q_blocks, k_blocks):
    """Keep/drop for the block pairs ``(q_blocks[i], k_blocks[i])`` by the 60% / 1/3 column rule."""
    cols = k_blocks[:, None] * block + torch.arange(block)[None, :]  # [U, B] token index
    col_ok = cols < num_tokens
    kf = torch.where(col_ok, cols // tokens_per_frame, 0)
    pos = cols % tokens_per_frame
    count = torch.zeros(cols.shape, dtype=torch.long)
    for i in range(frame.shape[1]):
        qf, qlo, qhi = frame[q_blocks, i], lo[q_blocks, i], hi[q_blocks, i]
        st = state[torch.clamp(qf, min=0)[:, None], kf]  # [U, B]
        seg_ok = (qf >= 0)[:, None] & col_ok
        half = halves[torch.clamp(st - 2, min=0)] if halves.numel() else torch.zeros_like(st)
        band = torch.clamp(torch.minimum(qhi[:, None], pos + half + 1) - torch.maximum(qlo[:, None], pos - half), min=0)
        contrib = torch.where(st == _FULL, (qhi - qlo)[:, None], torch.where(st >= 2, band, 0))
        count += torch.where(seg_ok, contrib, 0)
    rows = torch.clamp(num_tokens - q_blocks * block, max=block)  # real rows of each query block
    nonempty = ((count > 0) & col_ok).sum(-1)
    high = ((3 * count > rows[:, None]) & col_ok).sum(-1)
    return 5 * high > 3 * nonempty  # high / nonempty > 0.6, exactly


def radial_layout(grid, block_size: int = 128, decay: float = 1.0, sink_frames: Sequence[int] = (0,), *,
                  rule: str = "union") -> BlockLayout:
    """Block layout of radial attention over raster token order, without ``N x N``.

    Args:
        grid: ``(T, H, W)`` latent token grid, frames first.
        block_size: ``B``, block size of the rule and of the layout (``block_q == block_k``).
        decay: band width factor in ``(0, 1]``.
        sink_frames: key frames every query attends to fully; ``()`` disables the sink.
        rule: ``"union"`` (METHODS.md, the default) or ``"reference"`` (the reference
            code's blocks exactly; see the module docstring).

    Returns:
        A :class:`~dit_accel.kernels.layout.BlockLayout` with ``q_len == kv_len == T*H*W``
        (any length: the last block may be ragged). Every visited block is full:
        the pattern is block-level by construction.

    Example::

        layout = radial_layout((18, 48, 80), 128)   # Wan 2.1 720p, 69 frames: 56.9% block sparsity
        layout = radial_layout((18, 48, 80), 128, decay=0.2)   # 71.3%, the most this shape allows
        layout = radial_layout((21, 30, 52), 128, 0.2, rule="reference")   # Wan 480p as the reference: 0.3438
    """
    grid, block, decay, sinks = radial_args(grid, block_size, decay, sink_frames)
    if rule not in RADIAL_RULES:
        raise ValueError(f"rule={rule!r} is invalid: must be one of {RADIAL_RULES}")
    n = math.prod(grid)
    blocks = _union_blocks if rule == "union" else _reference_blocks
    visited = blocks(grid[0], grid[1] * grid[2], block, decay, sinks)
    return BlockLayout.from_block_masks(visited, q_len=n, kv_len=n, block_q=block, block_k=block)


def _pair_blocks(tokens_per_frame: int, block: int, row_shift: int, col_shift: int, half) -> torch.Tensor:
    """The reference code's keep/drop ``[P, P]`` for one frame pair alone (``P = ceil(S / B)``).

    The pair's frames start ``row_shift``/``col_shift`` tokens into their first blocks; a
    frame's tokens past its ``P`` blocks are cut; a column is dense when more than a third of
    the block's ``B`` rows (not its frame rows) are inside the band. ``half`` None: full pair.
    """
    s, b = tokens_per_frame, block
    per = torch.arange(cdiv(s, b))
    lo = torch.clamp(per * b - row_shift, min=0)[:, None, None]  # frame rows [lo, hi) of query block a
    hi = torch.clamp((per + 1) * b - row_shift, max=s)[:, None, None]
    col = (per[:, None] * b + torch.arange(b)[None, :] - col_shift)[None]  # frame column of each key column
    if half is None:
        count = (hi - lo).expand(-1, col.shape[1], b)
    else:
        count = torch.clamp(torch.minimum(hi, col + half + 1) - torch.maximum(lo, col - half), min=0)
    count = torch.where((col >= 0) & (col < s), count, 0)
    nonempty, high = (count > 0).sum(-1), (3 * count > b).sum(-1)
    return 5 * high > 3 * nonempty  # high / nonempty > 0.6, exactly


def _reference_blocks(frames: int, s: int, block: int, decay: float, sinks) -> torch.Tensor:
    """Visited ``[nb, nb]`` of the reference code: per-frame-pair reductions ORed at the pairs' block offsets."""
    state, halves = frame_pair_states(frames, s, block, decay, sinks, rule="reference")
    nb, per = cdiv(frames * s, block), cdiv(s, block)
    visited = torch.zeros(nb, nb, dtype=torch.bool)
    pairs = {}  # a pair's blocks depend only on its state and the frames' offsets inside their blocks
    for qf in range(frames):
        r0, row_shift = divmod(qf * s, block)
        for kf in range(frames):
            st = int(state[qf, kf])
            if st == _DROP:
                continue
            c0, col_shift = divmod(kf * s, block)
            key = (st, row_shift, col_shift)
            if key not in pairs:
                pairs[key] = _pair_blocks(s, block, row_shift, col_shift, None if st == _FULL else int(halves[st - 2]))
            visited[r0:r0 + per, c0:c0 + per] |= pairs[key]
    # The reference runs only on lengths padded to a block multiple, and its text-border rule
    # then makes the block that holds the last video tokens (and the padding) a dense row and column.
    tail = frames * s // block
    visited[tail:] = True
    visited[:, tail:] = True
    return visited


def _union_blocks(frames: int, s: int, block: int, decay: float, sinks) -> torch.Tensor:
    """Visited ``[nb, nb]`` of METHODS.md's rule: the placed bands reduced by the column rule."""
    n = frames * s
    state, halves = frame_pair_states(frames, s, block, decay, sinks)
    frame, lo, hi = _segments(n, s, block)
    nb, m = frame.shape

    # Block pairs whose frame segments relate alike decide alike: describe each
    # (query segment, key segment) pair translation-invariantly, dedupe, and
    # evaluate the column rule once per distinct combination.
    seg_len = (hi - lo).to(torch.int32)
    lo32 = lo.to(torch.int32)
    state8 = state.to(torch.int8)
    shift = 2 * block + (int(halves.max()) if halves.numel() else 0)  # makes band offsets non-negative
    ids = []
    for i in range(m):
        for j in range(m):
            fq, fk = frame[:, i], frame[:, j]
            st = state8.index_select(0, fq.clamp(min=0)).index_select(1, fk.clamp(min=0))  # [nb, nb]
            lq, lk = seg_len[:, i][:, None], seg_len[:, j][None, :]
            st[(fq < 0) | (lq[:, 0] == 0)] = _DROP
            st[:, (fk < 0) | (lk[0] == 0)] = _DROP
            rel = lo32[:, i][:, None] - lo32[None, :, j]  # query start - key start, in frame positions
            # Canonical forms: a band that misses the segments is a drop, one that covers them is full.
            for b, half in enumerate(halves.tolist()):
                band = st == 2 + b
                st[band & ((rel < -(lq - 1) - half) | (rel > lk - 1 + half))] = _DROP
                st[band & (torch.maximum(rel + lq - 1, lk - 1 - rel) <= half)] = _FULL
            rel = torch.where(st >= 2, rel + shift, 0)
            desc = ((st.long() * (block + 1) + lq) * (block + 1) + lk) * (2 * shift + 1) + rel
            del st, rel
            ids.append(torch.unique(desc.flatten(), return_inverse=True)[1])
            del desc
    radix = max(int(x.max()) + 1 for x in ids)
    if len(ids) == 1:  # blocks never straddle frames
        inverse = ids[0]
    elif radix ** len(ids) < 2 ** 62:
        key = ids[0]
        for x in ids[1:]:
            key = key * radix + x
        _, inverse = torch.unique(key, return_inverse=True)
    else:  # many frames per block (tiny frames): one integer key would overflow
        _, inverse = torch.unique(torch.stack(ids, 1), dim=0, return_inverse=True)
    del ids
    n_unique = int(inverse.max()) + 1
    pair = torch.arange(nb * nb)
    first = torch.full((n_unique,), nb * nb, dtype=torch.long).scatter_reduce(0, inverse, pair, "amin")
    keep = _block_decisions(frame, lo, hi, state, halves, n, s, block, first // nb, first % nb)
    return keep[inverse].view(nb, nb)


def radial_mask(grid, block_size: int = 128, decay: float = 1.0, sink_frames: Sequence[int] = (0,), *,
                rule: str = "union") -> torch.Tensor:
    """Token mask of radial attention, bool ``[N, N]`` in raster order: :func:`radial_layout` expanded.

    Materialises ``N x N``: for inspection and tests. Arguments as in :func:`radial_layout`.
    """
    check_mask_memory("radial_mask", radial_args(grid, block_size, decay, sink_frames)[0], "radial_layout", copies=2)
    return radial_layout(grid, block_size, decay, sink_frames, rule=rule).to_dense_mask()[0]
