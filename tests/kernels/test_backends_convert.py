"""The vendor conversions (FA4, cuDNN, NATTEN) are exact: each structure, expanded back to a token mask by an
expansion written here (from the formats as the vendors document them), equals ``layout.to_dense_mask()``.

Layouts: random ones with full, partial, skipped and ragged blocks, per-head layouts, re-cut to coarser and
finer vendor blocks, and the four methods' layouts (GNA, Tile, radial, SLA's critical blocks). CPU only.
"""

from __future__ import annotations

import math

import pytest
import torch

from dit_accel import SLA
from dit_accel.kernels import BlockLayout
from dit_accel.kernels.block_sparse.backends import cudnn as vcudnn
from dit_accel.kernels.block_sparse.backends import fa4 as vfa4
from dit_accel.kernels.block_sparse.backends import natten as vnatten
from dit_accel.kernels.block_sparse.backends.common import EMPTY, FULL, MIXED, block_states
from dit_accel.kernels.sla import sla_classify
from dit_accel.patterns.gna import gna_layout
from dit_accel.patterns.radial import radial_layout
from dit_accel.patterns.tile import tile_layout


# ----------------------------------------------------------------------------- layouts
def _random_layout(q_len, kv_len, bq, bk, heads=1, seed=0) -> BlockLayout:
    """A token mask made of blocks that are skipped, fully allowed, or random (partial), on a grid finer than
    the layout's so that layout blocks mix all three; ragged when the lengths are not block multiples."""
    g = torch.Generator().manual_seed(seed)
    cell = 16
    nq, nk = math.ceil(q_len / cell), math.ceil(kv_len / cell)
    kind = torch.randint(0, 3, (heads, nq, nk), generator=g)
    noise = torch.rand(heads, nq * cell, nk * cell, generator=g) < 0.5
    cells = kind.repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    mask = (cells == 1) | ((cells == 2) & noise)
    return BlockLayout.from_dense_mask(mask[:, :q_len, :kv_len], block_q=bq, block_k=bk)


def _full_block_layout(q_len, kv_len, b, heads=2, seed=1) -> BlockLayout:
    """Only full and skipped blocks (what cuDNN can take), per head, ragged."""
    g = torch.Generator().manual_seed(seed)
    visited = torch.rand(heads, math.ceil(q_len / b), math.ceil(kv_len / b), generator=g) < 0.4
    visited[:, 1] = False  # an empty query block
    return BlockLayout.from_block_masks(visited, q_len=q_len, kv_len=kv_len, block_q=b, block_k=b)


def _sla_layout() -> BlockLayout:
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 3, 300, 16, generator=g), torch.randn(1, 3, 300, 16, generator=g)
    blocks = sla_classify(q, k, SLA(topk=0.3, block_q=64, block_k=64))
    n_q, n_k = blocks.scores.shape[-2:]
    visited = torch.zeros(3, n_q, n_k, dtype=torch.bool)
    visited.scatter_(-1, blocks.critical[0].long(), True)
    return BlockLayout.from_block_masks(visited, q_len=300, kv_len=300, block_q=64, block_k=64)


def _method_layouts():
    out = {}
    out["gna"] = gna_layout((5, 6, 7), (3, 4, 4), stride=(1, 2, 2), tile=(2, 4, 8), block_q=64, block_k=64)[1]
    out["gna_perhead"] = gna_layout((4, 6, 8), ((2, 3, 3), (4, 6, 4)), tile=(2, 4, 8), block_q=64, block_k=64)[1]
    out["tile"] = tile_layout((6, 8, 9), (2, 4, 4), (1, 3, 3), block_q=32, block_k=32)[1]
    out["radial"] = radial_layout((6, 6, 10), 64, decay=0.5)
    out["sla"] = _sla_layout()
    return out


LAYOUTS = {
    "random_64": _random_layout(300, 270, 64, 64),
    "random_ragged_32x64": _random_layout(257, 130, 32, 64, seed=2),
    "random_perhead_128": _random_layout(390, 390, 128, 128, heads=3, seed=4),
    "whole_blocks_ragged": _full_block_layout(300, 470, 64, heads=2),
    **_method_layouts(),
}


# ----------------------------------------------------------------------------- independent expansions
def _element_lookup(ids, table, layout_block, layout_grid, heads, q_len, kv_len):
    """Token-level ``table[ids[h, q // bq, k // bk], q % bq, k % bk]`` from FA4's flat aux tensors."""
    (bq, bk), (n_q, n_k) = layout_block, layout_grid
    ids = ids.view(heads, n_q, n_k).long()
    table = table.view(-1, bq, bk).bool()
    qi, ki = torch.arange(q_len), torch.arange(kv_len)
    row = ids[:, qi // bq][:, :, ki // bk]  # [Hl, q_len, kv_len]
    return table[row, (qi % bq)[None, :, None], (ki % bk)[None, None, :]]


def _expand_lists(cnt, idx, rows_of, cols_of, shape, fill=None):
    """Union over listed (row block, column block) pairs of their token rectangles (``fill`` restricts them)."""
    out = torch.zeros(shape, dtype=torch.bool)
    for h in range(cnt.shape[0]):
        for r in range(cnt.shape[1]):
            listed = idx[h, r, :int(cnt[h, r])].tolist()
            assert listed == sorted(set(listed)), "lists must be ascending without repeats"
            for c in listed:
                rs, cs = rows_of(r), cols_of(c)
                out[h, rs, cs] = True if fill is None else fill[h, rs, cs]
    return out


def expand_fa4(blocks: vfa4.Fa4Blocks, q_len: int, kv_len: int, backward: bool = False) -> torch.Tensor:
    bq, bk = blocks.block_q, blocks.block_k
    rows = lambda i: slice(i * bq, min((i + 1) * bq, q_len))  # noqa: E731
    cols = lambda j: slice(j * bk, min((j + 1) * bk, kv_len))  # noqa: E731
    lookup = _element_lookup(blocks.ids, blocks.table, blocks.layout_block, blocks.layout_grid, blocks.heads,
                             q_len, kv_len)
    shape = (blocks.heads, q_len, kv_len)
    if not backward:
        full = _expand_lists(blocks.full_cnt[0], blocks.full_idx[0], rows, cols, shape)
        part = _expand_lists(blocks.mask_cnt[0], blocks.mask_idx[0], rows, cols, shape, fill=lookup)
        both = _expand_lists(blocks.full_cnt[0], blocks.full_idx[0], rows, cols, shape) & \
            _expand_lists(blocks.mask_cnt[0], blocks.mask_idx[0], rows, cols, shape)
    else:  # per key block, the query blocks: transpose while expanding
        t = lambda m: m.transpose(-1, -2)  # noqa: E731
        tshape = (blocks.heads, kv_len, q_len)
        full = t(_expand_lists(blocks.bwd_full_cnt[0], blocks.bwd_full_idx[0], cols, rows, tshape))
        part = t(_expand_lists(blocks.bwd_mask_cnt[0], blocks.bwd_mask_idx[0], cols, rows, tshape, fill=t(lookup)))
        both = full & t(_expand_lists(blocks.bwd_mask_cnt[0], blocks.bwd_mask_idx[0], cols, rows, tshape))
    assert not both.any(), "a block is listed both full and partial"
    return full | part


def expand_cudnn(blocks: vcudnn.CudnnBlocks, q_len: int, kv_len: int) -> torch.Tensor:
    b = blocks.block
    out = torch.zeros(blocks.nums.shape[0], q_len, kv_len, dtype=torch.bool)
    for h in range(blocks.nums.shape[0]):
        for i in range(blocks.nums.shape[1]):
            listed = blocks.index[h, i, :int(blocks.nums[h, i])].tolist()
            assert len(set(listed)) == len(listed) and all(0 <= j < blocks.block_sizes.numel() for j in listed)
            for j in listed:
                out[h, i * b:(i + 1) * b, j * b:j * b + int(blocks.block_sizes[j])] = True
    return out


def _natten_1d(extent, k, s, d, causal):
    """NATTEN's 1-D neighborhood (METHODS.md's rule, written out per query) as a bool [L, L] relation."""
    rel = torch.zeros(extent, extent, dtype=torch.bool)
    for i in range(extent):
        g, x = i % d, i // d
        length = len(range(g, extent, d))
        if causal:
            leader = min((x // s) * s + s - 1, length - 1)
            lo, hi = max(leader - (k - 1), 0), x
        else:
            leader = min((x // s) * s + s // 2, length - 1)
            centre = min(max(leader, k // 2), length - 1 - (k // 2 + k % 2 - 1))
            lo, hi = centre - k // 2, centre + k // 2 + k % 2 - 1
        for y in range(lo, hi + 1):
            rel[i, g + y * d] = True
    return rel


def expand_natten(w: vnatten.NattenWindow, order: torch.Tensor) -> torch.Tensor:
    """The window's raster mask, placed in the tiled order (``order``: raster index per tiled position, -1 for
    padding); padded positions see nothing."""
    rels = [_natten_1d(*args) for args in zip(w.grid, w.kernel_size, w.stride, w.dilation, w.is_causal)]
    raster = rels[0]
    for r in rels[1:]:
        raster = torch.kron(raster.int(), r.int()).bool()
    real = order >= 0
    idx = order.clamp(min=0)
    return raster[idx][:, idx] & real[:, None] & real[None, :]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("factor", [1, 2, 4], ids=lambda f: f"x{f}")
def test_fa4_structure_expands_to_the_layout(name, factor):
    layout = LAYOUTS[name]
    dense = layout.to_dense_mask()
    blocks = vfa4.to_fa4(layout, layout.block_q * factor, layout.block_k * factor)
    assert not isinstance(blocks, str), blocks
    assert torch.equal(expand_fa4(blocks, layout.q_len, layout.kv_len), dense)
    assert torch.equal(expand_fa4(blocks, layout.q_len, layout.kv_len, backward=True), dense)


@pytest.mark.parametrize("name", ["random_ragged_32x64", "random_perhead_128", "gna", "whole_blocks_ragged"])
def test_fa4_element_tables_are_false_past_the_ends_and_in_bounds(name):
    """FA4 skips its sequence-end masking on some tiles: the lookup itself must refuse padded queries and keys,
    over every position a tile of either pass may touch."""
    layout = LAYOUTS[name]
    p = vfa4.plan(layout, 64, arch=100)
    for blocks in (p.fwd, p.bwd):
        n_q, n_k = blocks.layout_grid
        bq, bk = blocks.layout_block
        assert n_q * bq >= -(-layout.q_len // blocks.block_q) * blocks.block_q
        assert n_k * bk >= -(-layout.kv_len // blocks.block_k) * blocks.block_k
        assert int(blocks.ids.max()) < blocks.table.numel() // (bq * bk) and int(blocks.ids.min()) >= 0
        look = _element_lookup(blocks.ids, blocks.table, (bq, bk), (n_q, n_k), blocks.heads, n_q * bq, n_k * bk)
        assert not look[:, layout.q_len:].any() and not look[:, :, layout.kv_len:].any()
        assert torch.equal(look[:, :layout.q_len, :layout.kv_len] & _covered(blocks, layout), layout.to_dense_mask())
    assert torch.equal(p.fwd.ids, p.bwd.ids)  # one pair of tables serves both passes


def _covered(blocks, layout):
    """Token pairs inside a listed (full or partial) forward block."""
    bq, bk = blocks.block_q, blocks.block_k
    shape = (blocks.heads, layout.q_len, layout.kv_len)
    rows = lambda i: slice(i * bq, (i + 1) * bq)  # noqa: E731
    cols = lambda j: slice(j * bk, (j + 1) * bk)  # noqa: E731
    return _expand_lists(blocks.full_cnt[0], blocks.full_idx[0], rows, cols, shape) | \
        _expand_lists(blocks.mask_cnt[0], blocks.mask_idx[0], rows, cols, shape)


def test_fa4_full_blocks_are_only_fully_allowed_ones():
    layout = LAYOUTS["random_64"]
    blocks = vfa4.to_fa4(layout, 128, 128)
    dense = layout.to_dense_mask()[0]
    for i in range(blocks.full_cnt.shape[-1]):
        for j in blocks.full_idx[0, 0, i, :int(blocks.full_cnt[0, 0, i])].tolist():
            assert dense[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].all()


def test_fa4_block_sizes_follow_its_tiles():
    assert vfa4.block_sizes(90, 128, 4096, (64, 64)) == ((64, 64), (64, 128))
    assert vfa4.block_sizes(90, 64, 4096, (128, 128)) == ((128, 128), (128, 128))
    assert vfa4.block_sizes(100, 128, 4096, (64, 64)) == ((256, 128), (128, 128))
    assert "multiple" in vfa4.to_fa4(LAYOUTS["random_64"], 96, 64)
    wide = _random_layout(300, 600, 64, 256)
    assert "at most 128" in vfa4.plan(wide, 128, arch=90)
    assert not isinstance(vfa4.plan(wide, 128, arch=100), str)
    plan = vfa4.plan(LAYOUTS["random_64"], 128, arch=90)
    assert (plan.fwd.block_q, plan.fwd.block_k, plan.bwd.block_q, plan.bwd.block_k) == (64, 64, 64, 128)


@pytest.mark.parametrize("b", [64, 128])
@pytest.mark.parametrize("layout_block", [32, 64, 128, 256])
def test_cudnn_structure_expands_to_the_layout(b, layout_block):
    layout = _full_block_layout(300, 470, layout_block, heads=2)
    blocks = vcudnn.to_cudnn(layout, b)
    dense = layout.to_dense_mask()
    if layout_block >= b:  # a finer cuDNN grid always fits full blocks
        assert not isinstance(blocks, str), blocks
    if isinstance(blocks, str):  # coarser: only when the merged blocks agree
        assert "element masks" in blocks
        states = block_states(layout, b, b)
        assert bool((states == MIXED).any())
        return
    assert torch.equal(expand_cudnn(blocks, layout.q_len, layout.kv_len), dense)


@pytest.mark.parametrize("name", ["radial", "sla", "gna", "tile", "random_64"])
def test_cudnn_serves_block_level_layouts_and_refuses_element_masks(name):
    layout = LAYOUTS[name]
    dense = layout.to_dense_mask()
    for b in (64, 128):
        blocks = vcudnn.to_cudnn(layout, b)
        if isinstance(blocks, str):
            assert "element masks" in blocks or "do not fit" in blocks
            continue
        assert torch.equal(expand_cudnn(blocks, layout.q_len, layout.kv_len), dense)
    if name in ("radial", "sla"):  # block-level patterns at their own block size: always served
        assert not isinstance(vcudnn.to_cudnn(layout, layout.block_q), str)
    if name == "random_64":  # partial blocks at 64: refused, naming one
        assert "only partly allowed" in vcudnn.to_cudnn(layout, 64)


def test_block_states_against_the_token_mask():
    """EMPTY / FULL / MIXED of each re-cut block, judged on in-range pairs of the dense mask."""
    layout = LAYOUTS["random_ragged_32x64"]
    dense = layout.to_dense_mask()
    for bq, bk in ((32, 64), (64, 128), (16, 32), (128, 64)):
        states = block_states(layout, bq, bk)
        for h in range(states.shape[0]):
            for i in range(states.shape[1]):
                for j in range(states.shape[2]):
                    tile = dense[h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                    want = EMPTY if not tile.any() else (FULL if tile.all() else MIXED)
                    assert int(states[h, i, j]) == want, (bq, bk, h, i, j)


GNA_CASES = {
    "3d_stride": ((5, 6, 7), (3, 4, 4), (1, 2, 2), 1, False, (2, 4, 8)),
    "3d_dilated_causal": ((6, 6, 8), (2, 3, 3), 1, (1, 2, 1), (True, False, False), (2, 4, 8)),
    "2d_even": ((12, 10), (4, 5), (2, 5), 1, False, (8, 8)),
    "1d": ((130,), (9,), (3,), (2,), False, (64,)),
}


@pytest.mark.parametrize("case", list(GNA_CASES))
def test_natten_window_of_gna_expands_to_the_layout(case):
    grid, ks, st, dl, causal, tile = GNA_CASES[case]
    perm, layout = gna_layout(grid, ks, st, dl, causal, tile=tile, block_q=64, block_k=64)
    w = vnatten.attach_gna(layout, perm, ks, st, dl, causal)
    assert not isinstance(w, str), w
    _assert_natten_exact(w, perm, layout)


@pytest.mark.parametrize("grid,tile,window", [((6, 8, 8), (2, 4, 4), (1, 3, 3)), ((6, 8, 8), (3, 4, 8), (2, 1, 1)),
                                             ((8, 16), (4, 8), (3, 5)), ((16, 32), (4, 8), (3, 3)),
                                             ((16, 32), (4, 8), (2, 1))])
def test_natten_window_of_tile_expands_to_the_layout(grid, tile, window):
    perm, layout = tile_layout(grid, tile, window, block_q=32, block_k=32)
    w = vnatten.attach_tile(layout, perm, tile, window)
    assert not isinstance(w, str), w
    _assert_natten_exact(w, perm, layout)


def _assert_natten_exact(w, perm, layout):
    got = expand_natten(w, perm.order)
    dense = layout.to_dense_mask()[0]
    real = perm.order >= 0
    assert torch.equal(got[real], dense[real])  # every real query row
    assert not dense[:, ~real].any()  # padded keys are never allowed, in either


def test_natten_refuses_what_it_cannot_express():
    perm, layout = tile_layout((6, 8, 9), (2, 4, 4), (1, 3, 3), block_q=32, block_k=32)
    assert "not a multiple of the tile" in vnatten.attach_tile(layout, perm, (2, 4, 4), (1, 3, 3))
    perm, layout = gna_layout((4, 6, 8), ((2, 3, 3), (4, 6, 4)), tile=(2, 4, 8), block_q=64, block_k=64)
    assert "per head" in vnatten.attach_gna(layout, perm, ((2, 3, 3), (4, 6, 4)))
    assert "per head" in vnatten.plan(layout)
    bare = LAYOUTS["random_64"]
    assert "no neighborhood window" in vnatten.plan(bare)
    perm, layout = gna_layout((5, 6, 7), (3, 4, 4), tile=(2, 4, 8), block_q=64, block_k=64)
    with pytest.raises(ValueError, match="permutation"):
        vnatten.attach_gna(LAYOUTS["random_64"], perm, (3, 4, 4))
    # the window goes with the device copy the dispatcher makes: looked up on the caller's layout
    vnatten.attach_gna(layout, perm, (3, 4, 4))
    assert isinstance(vnatten.plan(layout.to("meta"), source=layout), vnatten.NattenWindow)
