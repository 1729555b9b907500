"""The tile plan (the layout at kernel-tile granularity) against a brute-force classification written here from
the dense mask, for both orientations, ragged streamed lengths, blocks larger than the tile and every lengths
mode; the per-table classes it is looked up in, and what a plan built per call costs on the host (VSA builds its
fine layout on every call, so each launch it adds is paid on every layer of every step)."""

from __future__ import annotations

import collections
import gc

import pytest
import torch

from dit_accel.kernels import BlockLayout
from dit_accel.kernels.block_sparse import tile_plans
from dit_accel.kernels.block_sparse.tile_plans import tile_plan


def _layout(heads, n, m, block_q, block_k, seed):
    """Blocks of four kinds, drawn per block: skipped, full, a column prefix (the first c columns of every row),
    random elements."""
    g = torch.Generator().manual_seed(seed)
    n_q, n_k = -(-n // block_q), -(-m // block_k)
    kind = torch.randint(0, 4, (heads, n_q, n_k), generator=g)
    count = torch.randint(1, block_k + 1, (heads, n_q, n_k), generator=g)
    noise = torch.rand(heads, n_q * block_q, n_k * block_k, generator=g) < 0.4
    mask = torch.zeros(heads, n_q * block_q, n_k * block_k, dtype=torch.bool)
    for h in range(heads):
        for i in range(n_q):
            for j in range(n_k):
                rows, cols = slice(i * block_q, (i + 1) * block_q), slice(j * block_k, (j + 1) * block_k)
                if kind[h, i, j] == 1:
                    mask[h, rows, cols] = True
                elif kind[h, i, j] == 2:
                    mask[h, rows, cols] = (torch.arange(block_k) < count[h, i, j])[None, :]
                elif kind[h, i, j] == 3:
                    mask[h, rows, cols] = noise[h, rows, cols]
    return BlockLayout.from_dense_mask(mask[:, :n, :m].contiguous(), block_q=block_q, block_k=block_k)


def _brute(layout, tile_r, tile_c, transposed, lengths):
    """Per head and owned tile: ``{streamed tile: kind}`` with kind ``"full"``, ``("len", c)`` or ``("part",
    rows x cols mask)``, from the dense mask alone (the rows are a multiple of the tile here)."""
    dense = layout.to_dense_mask()
    visited, _ = layout.block_masks()
    block_r, block_c = layout.block_q, layout.block_k
    if transposed:
        dense, visited, block_r, block_c = dense.transpose(1, 2), visited.transpose(1, 2), block_c, block_r
    n_rows, n_cols = dense.shape[1:]
    out = []
    for h in range(dense.shape[0]):
        rows = []
        for r0 in range(0, n_rows, tile_r):
            kinds = {}
            for c0 in range(0, n_cols, tile_c):
                if not visited[h, r0 // block_r, c0 // block_c]:
                    continue
                sub = torch.zeros(tile_r, tile_c, dtype=torch.bool)
                d = dense[h, r0:r0 + tile_r, c0:c0 + tile_c]
                sub[:, :d.shape[1]] = d
                if not sub.any():
                    continue
                ragged = c0 + tile_c > n_cols
                c = int(sub[0].sum())
                prefix = bool((sub == (torch.arange(tile_c) < c)[None, :]).all())
                if sub.all() and not ragged:
                    kinds[c0 // tile_c] = "full"
                elif lengths is not None and prefix and (lengths or not ragged):
                    kinds[c0 // tile_c] = ("len", c)
                else:
                    kinds[c0 // tile_c] = ("part", sub)
            rows.append(kinds)
        out.append(rows)
    return out


def _decoded(layout, tile_r, tile_c, transposed, lengths):
    """The plan read back the way the kernels read it: per row its full tiles, then its length tiles, then its
    bit-masked ones (each group ascending), a length tile's column count, a partial tile's mask from its bits."""
    plan = tile_plan(layout, tile_r, tile_c, transposed, lengths)
    head = 2 if lengths is None else 3
    bits = plan.bits
    out = []
    for rows_h in plan.plan:
        rows = []
        for row in rows_h.tolist():
            n_full, n_rest = row[:2]
            n_len = row[2] if lengths is not None else 0
            tiles, entries = row[head:head + plan.w], row[head + plan.w:]
            groups = (tiles[:n_full], tiles[n_full:n_full + n_len], tiles[n_full + n_len:n_full + n_rest])
            assert all(list(g) == sorted(g) for g in groups), "each group is ascending"
            kinds = {}
            for i in range(n_full + n_rest):
                if i < n_full:
                    kinds[tiles[i]] = "full"
                elif i < n_full + n_len:
                    kinds[tiles[i]] = ("len", entries[i])
                else:
                    words = torch.stack([bits[entries[i] + r + torch.arange(-(-tile_c // 64)) * plan.bits_w]
                                         for r in range(tile_r)])  # [tile_r, words]
                    j = torch.arange(tile_c)
                    sub = ((words[:, j // 64] >> (j % 64)) & 1).bool()
                    kinds[tiles[i]] = ("part", sub)
            rows.append(kinds)
        out.append(rows)
    return out


def _same(got, want):
    assert len(got) == len(want)
    for rows_g, rows_w in zip(got, want):
        assert len(rows_g) == len(rows_w)
        for g, w in zip(rows_g, rows_w):
            assert g.keys() == w.keys()
            for tile, kind in w.items():
                if isinstance(kind, tuple) and kind[0] == "part":
                    assert g[tile][0] == "part" and torch.equal(g[tile][1], kind[1]), tile
                else:
                    assert g[tile] == kind, tile


CASES = [  # heads, n, m, block_q, block_k: rows a multiple of every owned tile below, columns ragged or not
    (2, 128, 2 * 64 + 11, 64, 64),
    (1, 256, 3 * 128 + 40, 128, 128),
    (2, 192, 192, 64, 64),
    (1, 128, 128 + 17, 64, 128),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}x{c[2]}-b{c[3]}x{c[4]}" for c in CASES])
@pytest.mark.parametrize("lengths", [None, False, True], ids=["no-lengths", "pointer-lengths", "tma-lengths"])
def test_forward_plan_matches_brute_force(case, lengths):
    heads, n, m, bq, bk = case
    layout = _layout(heads, n, m, bq, bk, seed=sum(case))
    for tile_r, tile_c in ((bq, bk), (32, 32), (16, 64), (64, 32)):
        if bq % tile_r or bk % tile_c:
            continue
        _same(_decoded(layout, tile_r, tile_c, False, lengths), _brute(layout, tile_r, tile_c, False, lengths))


@pytest.mark.parametrize("case", [(2, 130, 128, 64, 64), (1, 3 * 128 + 9, 256, 128, 64)], ids=["b64", "b128x64"])
def test_transposed_plan_matches_brute_force(case):
    """The dK/dV kernel's plan: key tiles own, query tiles stream (the ragged side is now the queries)."""
    heads, n, m, bq, bk = case
    layout = _layout(heads, n, m, bq, bk, seed=sum(case))
    for tile_r, tile_c in ((bk, bq), (32, 64), (64, 32)):
        if bk % tile_r or bq % tile_c:
            continue
        _same(_decoded(layout, tile_r, tile_c, True, None), _brute(layout, tile_r, tile_c, True, None))


@pytest.mark.parametrize("width", [None, "exact", "wider", "narrower"])
def test_index_lists_match_a_row_by_row_definition(width):
    """``layout._pack``, every layout's lists: per row its count, its visited columns ascending then zeros, their
    mask ids then -1, at the lists' width (the widest row's, or the caller's bound: wider pads, narrower keeps the
    first columns), against the columns read row by row with ``nonzero``."""
    from dit_accel.kernels.layout import _pack

    g = torch.Generator().manual_seed(11)
    for _ in range(40):
        hl, r, c = (int(x) for x in torch.randint(1, 9, (3,), generator=g))
        visited = torch.rand(hl, r, c, generator=g) < float(torch.rand(1, generator=g))
        ids = torch.where(visited, torch.randint(0, 5, visited.shape, generator=g), -1).to(torch.int32)
        widest = int(visited.sum(-1).max())
        w = {None: None, "exact": widest, "wider": widest + 2, "narrower": max(widest - 1, 1)}[width]
        counts, indices, mask_ids = _pack(visited, ids, w)
        expect_w = max(widest, 1) if w is None else w
        assert indices.shape == mask_ids.shape == (hl, r, expect_w) and indices.is_contiguous()
        for h in range(hl):
            for i in range(r):
                cols = visited[h, i].nonzero().flatten().tolist()
                assert counts[h, i] == len(cols)
                listed = cols[:expect_w]
                pad = expect_w - len(listed)
                assert indices[h, i].tolist() == listed + [0] * pad
                assert mask_ids[h, i].tolist() == [int(ids[h, i, j]) for j in listed] + [-1] * pad


def _whole_block_layouts():
    """Layouts whose blocks are all full or skipped, none past the grid's end: drawn block masks (ragged rows of
    visits, one or two layout heads) and VSA's rows (every query block visits k key blocks)."""
    g = torch.Generator().manual_seed(3)
    for heads, n_q, n_k, bq, bk in ((2, 3, 5, 64, 64), (1, 2, 4, 128, 64), (2, 4, 3, 64, 128)):
        visited = torch.rand(heads, n_q, n_k, generator=g) < 0.5
        visited[:, 0] = False  # a query block without keys
        yield BlockLayout.from_block_masks(visited, q_len=n_q * bq, kv_len=n_k * bk, block_q=bq, block_k=bk)
    rows = torch.rand(2, 6, 9, generator=g).topk(3, -1).indices.sort(-1).values.to(torch.int32)
    yield BlockLayout._from_full_rows(rows, torch.full(rows.shape, -1, dtype=torch.int32), q_len=6 * 64,
                                      kv_len=9 * 64, block_q=64, block_k=64, mask_table=None, q_width=6)


@pytest.mark.parametrize("lengths", [None, False, True], ids=["no-lengths", "pointer-lengths", "tma-lengths"])
def test_whole_block_plans_are_the_lists_themselves(monkeypatch, lengths):
    """Where no block is masked or ragged and a block holds at most two kernel tiles, tile_plan expands the lists
    (VSA's whole cubes plan so per call, forward and backward) instead of classifying each tile: the same plan,
    tensor for tensor, as the classification gives, and the brute-force kinds, forward and transposed, at the
    block and at half-block tiles either way. Four tiles per block take the classification (its width is read from
    the device), as does a ragged block."""
    taken = []
    lists_plan = tile_plans._lists_plan
    monkeypatch.setattr(tile_plans, "_lists_plan", lambda *a: taken.append(1) or lists_plan(*a))
    for layout in _whole_block_layouts():
        for transposed in (False, True):
            br, bc = (layout.block_k, layout.block_q) if transposed else (layout.block_q, layout.block_k)
            t = None if transposed else lengths
            for tr, tc in ((br, bc), (br // 2, bc), (br, bc // 2)):
                _same(_decoded(layout, tr, tc, transposed, t), _brute(layout, tr, tc, transposed, t))
                before = len(taken)
                fast = tile_plan(layout, tr, tc, transposed, t)
                assert len(taken) == before + 1
                with monkeypatch.context() as m:
                    m.setattr(tile_plans, "_whole_blocks", lambda *a: False)
                    general = tile_plan(layout, tr, tc, transposed, t)
                assert torch.equal(fast.plan, general.plan) and torch.equal(fast.bits, general.bits), (tr, tc)
                assert (fast.w, fast.bits_w) == (general.w, general.bits_w)
            before = len(taken)
            tile_plan(layout, br // 2, bc // 2, transposed, t)  # four tiles per block: classified
            assert len(taken) == before
    ragged = BlockLayout.from_block_masks(torch.ones(1, 2, 2, dtype=torch.bool), q_len=128, kv_len=100,
                                          block_q=64, block_k=64)
    before = len(taken)
    tile_plan(ragged, 64, 64, False, lengths)  # the last key block reaches past the keys: classified
    assert len(taken) == before == 48


def test_uniform_rows_take_the_items_own_order():
    """VSA's layouts (every query block lists k key blocks, built so) give the persistent forward its items in their
    own order without a sort: the order the sort gives them, whose ties keep item order. Layouts not built so keep
    the sort, and so do sub-tiles (a masked block's empty sub-tile is skipped: rows may differ)."""
    from dit_accel.kernels.block_sparse import triton as bst
    from dit_accel.kernels.layout import UNIFORM_KV_ROWS

    layout = list(_whole_block_layouts())[-1]
    assert layout.derived.get(UNIFORM_KV_ROWS) is True
    for batch, heads in ((1, 2), (3, 2)):
        plan = tile_plan(layout, 64, 64)
        items = bst._work_order(layout, plan, 64, 64, batch, heads)
        assert torch.equal(items, tile_plans.work_order(plan, batch, heads))
        assert torch.equal(items, torch.arange(batch * heads * 6, dtype=torch.int32))
    drawn = next(_whole_block_layouts())  # ragged rows of visits
    assert UNIFORM_KV_ROWS not in drawn.derived
    plan = tile_plan(drawn, 64, 64)
    assert not torch.equal(bst._work_order(drawn, plan, 64, 64, 1, 2), torch.arange(6, dtype=torch.int32))


def test_classes_are_kept_with_the_mask_table_and_rebuilt_after_an_edit():
    layout = _layout(1, 128, 128, 64, 64, seed=2)
    table = layout.mask_table
    first = tile_plans._mask_classes(table, False, 128, 64, 64, 32, 32, None)
    assert tile_plans._mask_classes(table, False, 128, 64, 64, 32, 32, None) is first
    assert tile_plans._mask_classes(table, True, 128, 64, 64, 32, 32, None) is not first
    with torch.no_grad():
        table[0, 0, 0] = ~table[0, 0, 0]  # (layouts are values; an edit still must not read stale classes)
    assert tile_plans._mask_classes(table, False, 128, 64, 64, 32, 32, None) is not first
    ident = id(table)
    del layout, table, first
    gc.collect()
    assert ident not in tile_plans._CLASSES._entries


def test_layouts_without_masks_share_one_empty_table():
    """Layouts built per call without partial blocks (VSA on a grid its cubes divide) share their mask table, so
    the plan's classes are worked out once, not per call."""
    visited = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    a = BlockLayout.from_block_masks(visited, q_len=256, kv_len=256, block_q=64, block_k=64)
    b = BlockLayout.from_block_masks(~visited, q_len=256, kv_len=256, block_q=64, block_k=64)
    assert a.mask_table is b.mask_table and a.mask_table.shape == (0, 64, 64)
    tile_plan(a, 64, 64)
    classes = tile_plans._CLASSES.peek(a.mask_table)
    before = dict(classes)
    tile_plan(b, 64, 64)
    assert dict(classes) == before


def test_a_capture_keeps_no_classes(monkeypatch):
    """Tensors made inside a CUDA graph capture are the graph's and hold nothing until it replays: the classes
    built there are used, not kept."""
    layout = _layout(1, 128, 128, 64, 64, seed=4)
    monkeypatch.setattr(tile_plans, "in_graph", lambda: True)
    tile_plan(layout, 32, 32)
    assert tile_plans._CLASSES.peek(layout.mask_table) is None


# ------------------------------------------------------------------ VSA's per-call host path
_VIEWS = {"aten::view", "aten::reshape", "aten::alias", "aten::unsqueeze", "aten::transpose", "aten::expand",
          "aten::slice", "aten::select", "aten::expand_as", "aten::permute", "aten::contiguous", "aten::detach",
          "aten::_reshape_alias", "aten::as_strided", "aten::squeeze", "aten::lift_fresh"}


def _device_ops(fn) -> collections.Counter:
    """The top-level ATen ops ``fn`` dispatches that are not views (on a GPU, each is a launch or an allocation,
    about 10-20 us of host time in eager mode and a node of a captured graph)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = collections.Counter()
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("aten::") and e.name not in _VIEWS and not (parent and parent.name.startswith("aten::")):
            ops[e.name] += 1
    return ops


def _vsa_fine_call(monkeypatch, grid, heads=2):
    """The fine branch on ``grid`` at sparsity 0.9 as a zero-argument call, on the sm_90 launch path with the kernel
    itself stubbed (what is counted is everything around it), and the sm_90 launch path run on the CPU."""
    pytest.importorskip("triton")
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "0")
    from dit_accel.kernels.block_sparse import triton as bst
    from dit_accel.kernels.vsa import api, fine
    from dit_accel.kernels.vsa.naive import cubes_of, selected_count

    class _Stub:
        def __getitem__(self, grid):
            return lambda *args, **kw: None

    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    monkeypatch.setattr(bst, "_fwd_kernel", _Stub())
    monkeypatch.setattr(fine, "_TEMPLATES", {})
    cubes = cubes_of(grid, (4, 4, 4))
    count = selected_count(cubes.count, None, 0.9)
    g = torch.Generator().manual_seed(0)
    selection = torch.rand(1, heads, cubes.count, cubes.count, generator=g).topk(count, -1).indices.sort(-1).values
    q = torch.randn(1, heads, cubes.perm.num_padded, 128, generator=g).half()
    return lambda: api._fine_branch(q, q, q, cubes, cubes.perm, None, selection, 0.1, "triton")


def test_vsa_fine_branch_builds_its_layout_and_plan_in_few_launches(monkeypatch):
    """FastWan's grid (16, 28, 52), sparsity 0.9, every call on the general path (a layout per call): the layout,
    tile plan, work order and launch took 120 non-view ops per call before the plan became a lookup in per-table
    classes (``bench gpu`` on an H100: 3.9-5.6 ms of host time per VSA call, more than the kernels' 1.2 ms), 48
    after it (the H200 still spent 3.2 ms of host time per call), 30 since whole cubes plan as their lists and
    uniform rows skip the work order's sort, 27 since the layout's transposed side is built from its pairs
    (``layout._transposed_rows``)."""
    from dit_accel.kernels.vsa import fine

    call = _vsa_fine_call(monkeypatch, (16, 28, 52))
    monkeypatch.setattr(fine, "remember", lambda *args: None)  # no template: the general path every call
    call()
    ops = _device_ops(call)
    assert ops["aten::item"] == 0 and ops["aten::_local_scalar_dense"] == 0  # no host sync
    assert sum(ops.values()) <= 27, ops


@pytest.mark.parametrize("grid,most", [((16, 28, 52), 8), ((21, 30, 52), 16)], ids=["fastwan-whole", "wan480p-partial"])
def test_vsa_fine_branch_plans_later_calls_in_a_few_launches(monkeypatch, grid, most):
    """A class's later calls plan from the selection alone (:mod:`dit_accel.kernels.vsa.fine`): at FastWan's grid
    (whole cubes) the plan is the lists with a header (the outputs, the launch and the way back make the rest), at
    Wan 480p's (partial edge cubes) one sort more; no host sync either way. The H200 spent 1.07 ms of host time on
    the general path's 30 (cf9d9eb, ``docs/scripts/host_profile.py``)."""
    call = _vsa_fine_call(monkeypatch, grid)
    call()
    ops = _device_ops(call)
    assert ops["aten::item"] == 0 and ops["aten::_local_scalar_dense"] == 0
    assert sum(ops.values()) <= most, ops
