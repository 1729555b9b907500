"""The transposed side of a layout built from full rows (VSA's fine branch builds one per call, and its training
backward reads that side): the key blocks' lists against a definition written here key block by key block, and
the dK/dV tile plan of a layout whose masks are its key blocks' (``KEY_COLUMN_MASKS``), which keeps each row's
lists as they are, against the classification every other layout takes, with what both cost around the kernels."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from dit_accel.kernels import BlockLayout
from dit_accel.kernels.block_sparse.tile_plans import tile_plan
from dit_accel.kernels.layout import KEY_COLUMN_MASKS, _transposed_rows
from dit_accel.kernels.vsa.layouts import layout_of_rows, vsa_layout
from dit_accel.kernels.vsa.naive import cubes_of


def _rows(g, hl, n_q, n_k, k):
    """``[hl, n_q, k]`` int64: each row ``k`` distinct key blocks, ascending."""
    return torch.rand(hl, n_q, n_k, generator=g).argsort(-1)[..., :k].sort(-1).values


@pytest.mark.parametrize("width", ["every query block", "narrower"])
@pytest.mark.parametrize("with_ids", [True, False], ids=["mask-ids", "all-full"])
def test_transposed_rows_list_each_key_blocks_visitors(width, with_ids):
    """Per key block: how many query blocks list it, those blocks ascending then zeros, the pairs' mask ids then
    -1, at the caller's width (narrower keeps the first ones; the count stays the true one, as ``_pack`` gives it),
    read here by scanning every query block's row."""
    g = torch.Generator().manual_seed(5)
    for _ in range(60):
        hl, n_q, n_k = (int(x) for x in torch.randint(1, 12, (3,), generator=g))
        k = int(torch.randint(0, n_k + 1, (1,), generator=g))
        rows = _rows(g, hl, n_q, n_k, k)
        ids = torch.randint(-1, 4, rows.shape, generator=g, dtype=torch.int32)
        w = n_q if width == "every query block" else int(torch.randint(1, n_q + 1, (1,), generator=g))
        counts, indices, mask_ids = _transposed_rows(rows, ids if with_ids else None, n_k, w)
        assert indices.shape == mask_ids.shape == (hl, n_k, w) and counts.shape == (hl, n_k)
        assert all(t.dtype == torch.int32 and t.is_contiguous() for t in (counts, indices, mask_ids))
        for h in range(hl):
            for j in range(n_k):
                visitors = [(i, int(ids[h, i, s]) if with_ids else -1)
                            for i in range(n_q) for s in range(k) if int(rows[h, i, s]) == j]
                kept = visitors[:w]
                assert int(counts[h, j]) == len(visitors)
                assert indices[h, j].tolist() == [i for i, _ in kept] + [0] * (w - len(kept))
                assert mask_ids[h, j].tolist() == [m for _, m in kept] + [-1] * (w - len(kept))


def _vsa_layouts():
    """VSA layouts with partial cubes (masks: their real columns), whole cubes, two layout heads, k of 1 to all."""
    g = torch.Generator().manual_seed(0)
    for grid, tile in [((5, 6, 7), (2, 2, 2)), ((6, 9, 10), (4, 4, 4)), ((3, 5, 9), (2, 4, 4)), ((4, 4, 4), (2, 2, 2))]:
        cubes = cubes_of(grid, tile)
        for k in sorted({1, max(1, cubes.count // 3), cubes.count}):
            yield cubes, vsa_layout(cubes, torch.rand(2, 1, cubes.count, cubes.count, generator=g).argsort(-1)[..., :k])


def _unflagged(layout: BlockLayout) -> BlockLayout:
    """The same layout without its builder's declarations: the general classification plans it."""
    return BlockLayout(*(getattr(layout, f.name) for f in dataclasses.fields(layout) if f.init))


def test_key_column_masks_plan_their_key_rows_as_listed(monkeypatch):
    """A VSA layout declares its masks its key blocks' (a partial cube's real columns, in every query row), so every
    streamed tile of a dK/dV row classifies alike and the row's lists stand as they are: no sort, and the same plan,
    entry for entry (tails too), as the classification of the same layout gives, at the cube and at half and quarter
    cube tiles either way, in every lengths mode."""
    checked = 0
    for cubes, layout in _vsa_layouts():
        assert layout.derived.get(KEY_COLUMN_MASKS) is True
        plain = _unflagged(layout)
        v = cubes.volume
        for (tile_r, tile_c), lengths in itertools.product(itertools.product({v, v // 2, v // 4}, repeat=2),
                                                           (None, False, True)):
            if min(tile_r, tile_c) < 1 or v % tile_r or v % tile_c:
                continue
            expect = tile_plan(plain, tile_r, tile_c, True, lengths)
            with monkeypatch.context() as m:
                if layout.mask_table.shape[0]:  # (whole cubes plan as their lists either way)
                    m.setattr(torch, "sort", lambda *a, **kw: pytest.fail("the rows were sorted"))
                got = tile_plan(layout, tile_r, tile_c, True, lengths)
            assert got.w == expect.w and torch.equal(got.plan, expect.plan) and torch.equal(got.bits, expect.bits)
            checked += 1
    assert checked > 100


def test_the_declaration_is_made_only_by_its_builder():
    """Only VSA's per-call layouts declare key-block masks; a layout drawn from block masks or full rows without the
    declaration plans by classification."""
    visited = torch.rand(1, 3, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    drawn = BlockLayout.from_block_masks(visited, q_len=3 * 64, kv_len=4 * 64, block_q=64, block_k=64)
    rows = torch.tensor([[[0, 2], [1, 3], [0, 1]]], dtype=torch.int32)
    full = BlockLayout._from_full_rows(rows, torch.full(rows.shape, -1, dtype=torch.int32), q_len=3 * 64,
                                       kv_len=4 * 64, block_q=64, block_k=64, mask_table=None, q_width=3)
    assert KEY_COLUMN_MASKS not in drawn.derived and KEY_COLUMN_MASKS not in full.derived


def test_vsa_per_call_layout_and_backward_plan_move_a_third_of_the_bytes():
    """At Wan 2.1 480p's cubes (624 of (4, 4, 4), 63 a row: sparsity 0.9, 2 heads), the per-call layout and the
    dK/dV plan at sm_90's (64 key x 32 query) tiles, counted by the traffic model in q-sized units (2 heads of 64,
    fp16): 30.2 when the transposed side was packed from a 624 x 624 visit matrix per head and its rows sorted by
    class, 10.8 now (the plan itself, 2 x 1248 entries a row, is most of it)."""
    from dit_accel.eval.traffic import count_traffic

    grid = (21, 30, 52)
    cubes = cubes_of(grid, (4, 4, 4))
    rows = _rows(torch.Generator().manual_seed(0), 1, cubes.count, cubes.count, 63).unsqueeze(0).expand(1, 2, -1, -1)
    unit = 2 * math.prod(grid) * 64 * 2
    layout_of_rows(cubes, rows)  # (the cube masks, kept per grid)
    layout = count_traffic(lambda: layout_of_rows(cubes, rows))
    with_plan = count_traffic(lambda: tile_plan(layout_of_rows(cubes, rows), 64, 32, True))
    assert layout["bytes"] / unit < 4.0, layout
    assert with_plan["bytes"] / unit < 12.0, with_plan
