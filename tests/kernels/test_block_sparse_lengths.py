"""The forward's length tiles (a visited tile whose allowed pairs are its first c key columns, run by a column
count): the tile plan's classification against a brute-force one written here, and the kernel's numbers under
the interpreter against the fp32 reference and against the bit-mask path, on hand-made layouts with ragged
blocks and on packed Tile and VSA layouts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from dit_accel.kernels import BlockLayout  # noqa: E402
from dit_accel.kernels._selfchecks import prefix_layout  # noqa: E402
from dit_accel.kernels.block_sparse import triton as bst  # noqa: E402
from dit_accel.kernels.block_sparse.lengths import prefix_masks  # noqa: E402
from dit_accel.kernels.block_sparse.tile_plans import tile_plan  # noqa: E402
from tests.utils import assert_attention_close, make_qkv  # noqa: E402


@pytest.fixture(autouse=True)
def _trusted(monkeypatch):
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "0")


def _brute_kinds(layout: BlockLayout, tile_r: int, tile_c: int, ragged_lengths: bool):
    """Per head and owned tile: {streamed tile: ("full" | ("len", c) | "part")}, from the dense mask."""
    dense = layout.to_dense_mask()
    visited, _ = layout.block_masks()
    out = []
    for hh in range(dense.shape[0]):
        rows = []
        for r0 in range(0, layout.q_len, tile_r):
            kinds = {}
            for c0 in range(0, layout.kv_len, tile_c):
                if not visited[hh, r0 // layout.block_q, c0 // layout.block_k]:
                    continue
                sub = torch.zeros(tile_r, tile_c, dtype=torch.bool)
                d = dense[hh, r0:r0 + tile_r, c0:c0 + tile_c]
                sub[:d.shape[0], :d.shape[1]] = d  # (q_len is a multiple of the tile here)
                if not sub.any():
                    continue
                ragged = c0 + tile_c > layout.kv_len
                c = int(sub[0].sum())
                is_prefix = bool((sub == (torch.arange(tile_c) < c)[None, :]).all())
                if sub.all() and not ragged:
                    kinds[c0 // tile_c] = "full"
                elif is_prefix and (ragged_lengths or not ragged):
                    kinds[c0 // tile_c] = ("len", c)
                else:
                    kinds[c0 // tile_c] = "part"
            rows.append(kinds)
        out.append(rows)
    return out


def _plan_kinds(layout, tile_r, tile_c, lengths):
    plan = tile_plan(layout, tile_r, tile_c, lengths=lengths)
    out = []
    for head in plan.plan:
        rows = []
        for row in head.tolist():
            n_full, n_rest, n_len = row[:3]
            tiles, entries = row[3:3 + plan.w], row[3 + plan.w:]
            kinds = {}
            for i in range(n_full + n_rest):
                kinds[tiles[i]] = "full" if i < n_full else ("len", entries[i]) if i < n_full + n_len else "part"
            rows.append(kinds)
        out.append(rows)
    return out


@pytest.mark.parametrize("ragged_lengths", [True, False])
def test_plan_classifies_lengths_like_brute_force(ragged_lengths):
    # q_len a multiple of the tile: the brute force's rows are then the mask's own
    layout = prefix_layout(2, 128, 2 * 64 + 11, 64, 64, seed=5)
    for tile_r, tile_c in ((64, 64), (32, 32), (16, 32)):
        got = _plan_kinds(layout, tile_r, tile_c, ragged_lengths)
        want = _brute_kinds(layout, tile_r, tile_c, ragged_lengths)
        assert [[sorted(r.items(), key=str) for r in h] for h in got] == \
            [[sorted(r.items(), key=str) for r in h] for h in want]
    assert any(isinstance(k, tuple) for h in got for r in h for k in r.values())


def _run(layout, q, k, v, lengths):
    return bst.triton_forward(q, k, v, layout, q.shape[-1] ** -0.5, lengths=lengths)


def _runs_by_length_exactly(layout, q, k, v, dtype):
    """The forward with lengths matches the fp32 reference and the bit-mask path, and its launch did run length
    tiles (the plan without lengths has bit-masked tiles where this one counts)."""
    o, lse = _run(layout, q, k, v, True)
    assert_attention_close(o, lse, q, k, v, layout.to_dense_mask())
    cfg = next(x.cfg for x in bst._PLANS.values(layout).values() if isinstance(x, bst._Launch))
    assert cfg.lengths and int(bst._plan(layout, cfg.block_m, cfg.block_n, False, lengths=False).plan[..., 2].sum())
    o0, _ = _run(layout, q, k, v, False)
    torch.testing.assert_close(o.float(), o0.float(), atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("blocks,d", [((64, 64), 64), ((32, 64), 40), ((64, 32), 32)])
def test_forward_by_length_matches_reference_and_mask_path(dtype, blocks, d):
    bq, bk = blocks
    n, m = 3 * bq + 7, 3 * bk + 13  # odd: ragged last query and key blocks
    layout = prefix_layout(2, n, m, bq, bk, seed=7)
    q, k, v = make_qkv(1, 2, n, m, d, dtype, seed=1, device="cpu")
    o, lse = _run(layout, q, k, v, True)
    assert_attention_close(o, lse, q, k, v, layout.to_dense_mask())
    o0, lse0 = _run(layout, q, k, v, False)
    torch.testing.assert_close(o.float(), o0.float(), atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0)
    launch = [x for x in bst._PLANS.values(layout).values() if isinstance(x, bst._Launch)]
    assert any(x.kw.get("LENGTHS") for x in launch) and any(not x.kw.get("LENGTHS") for x in launch)


def _lengths_launched(layout):
    return [x.cfg.lengths for x in bst._PLANS.values(layout).values() if isinstance(x, bst._Launch)]


def test_length_tiles_are_opt_in_and_the_default_runs_bit_masks(monkeypatch):
    """Timed on an H100 the bit-mask path was faster: without DIT_ACCEL_LENGTHS a layout with column-prefix tiles
    runs them bit-masked (and never asks the length variant's self-check); the self-check says why it is off."""
    from dit_accel.kernels import _selfchecks, selfcheck
    from dit_accel.kernels.block_sparse.configs import LENGTHS_OFF_REASON

    monkeypatch.delenv("DIT_ACCEL_LENGTHS", raising=False)
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "1")
    asked = []
    monkeypatch.setattr(selfcheck, "usable_fast", lambda *a, **k: asked.append(a[0]) or True)
    n, m = 64 + 9, 2 * 64 + 5
    layout = prefix_layout(2, n, m, 64, 64, seed=11)
    q, k, v = make_qkv(1, 2, n, m, 32, torch.float16, seed=2, device="cpu")
    o, lse = bst.triton_forward(q, k, v, layout, 32 ** -0.5)
    assert_attention_close(o, lse, q, k, v, layout.to_dense_mask())
    assert _lengths_launched(layout) == [False] and "block_sparse.triton.fwd_len" not in asked
    assert _selfchecks._lengths_applies(torch.device("cpu")) == LENGTHS_OFF_REASON
    monkeypatch.setenv("DIT_ACCEL_LENGTHS", "1")
    assert _selfchecks._lengths_applies(torch.device("cpu")) is None


def test_opted_in_lengths_run_only_where_the_self_check_passed(monkeypatch):
    """DIT_ACCEL_LENGTHS=1: the length variant runs after its self-check passed; with its output corrupted the
    check fails, the variant is disabled with a warning, and the bit-mask path gives the right numbers."""
    from dit_accel.kernels import selfcheck

    monkeypatch.setenv("DIT_ACCEL_LENGTHS", "1")
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "1")
    monkeypatch.setattr(selfcheck, "_FAST", {})
    n, m = 64 + 9, 2 * 64 + 5
    layout = prefix_layout(2, n, m, 64, 64, seed=11)
    q, k, v = make_qkv(1, 2, n, m, 32, torch.float16, seed=2, device="cpu")
    o, lse = bst.triton_forward(q, k, v, layout, 32 ** -0.5)
    assert_attention_close(o, lse, q, k, v, layout.to_dense_mask())
    assert _lengths_launched(layout) == [True]

    monkeypatch.setenv(selfcheck.ENV_FAULT, "block_sparse.triton.fwd_len")
    layout = prefix_layout(2, n, m, 64, 64, seed=11)
    with pytest.warns(Warning, match="block_sparse.triton.fwd_len failed its self-check"):
        o, lse = bst.triton_forward(q, k, v, layout, 32 ** -0.5)
    assert_attention_close(o, lse, q, k, v, layout.to_dense_mask())
    assert _lengths_launched(layout) == [False]


def test_no_length_variant_for_a_layout_without_column_prefix_masks(monkeypatch):
    from dit_accel.kernels import selfcheck

    monkeypatch.setenv("DIT_ACCEL_LENGTHS", "1")
    monkeypatch.setenv("DIT_ACCEL_SELFCHECK", "1")
    asked = []
    monkeypatch.setattr(selfcheck, "usable_fast", lambda *a, **k: asked.append(a[0]) or True)
    mask = torch.rand(1, 100, 100, generator=torch.Generator().manual_seed(0)) < 0.5
    layout = BlockLayout.from_dense_mask(mask, block_q=64, block_k=64)
    q, k, v = make_qkv(1, 1, 100, 100, 32, torch.float32, seed=3, device="cpu")
    o, lse = bst.triton_forward(q, k, v, layout, 32 ** -0.5)
    assert_attention_close(o, lse, q, k, v, mask)
    assert _lengths_launched(layout) == [False] and "block_sparse.triton.fwd_len" not in asked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_tile_layout_runs_by_length(dtype):
    """STA over packed tile order: the ragged last block of each key tile is a column prefix."""
    from dit_accel.patterns.tile import packed_tile_layout

    perm, layout = packed_tile_layout((3, 5, 7), (2, 3, 5), (3, 3, 3), block=32)
    assert layout.q_len <= 512 and prefix_masks(layout) > 0
    n = layout.q_len
    q, k, v = make_qkv(1, 2, n, n, 32, dtype, seed=4, device="cpu")
    _runs_by_length_exactly(layout, q, k, v, dtype)


def test_kernel_length_tiles_counts_column_prefix_masks_like_brute_force():
    from dit_accel.kernels.geometry import kernel_length_tiles

    layout = prefix_layout(2, 150, 170, 32, 32, seed=13)
    visited, ids = layout.block_masks()
    masked = by_count = 0
    for hh, i, j in visited.nonzero().tolist():
        mid = int(ids[hh, i, j])
        if mid < 0:
            continue
        masked += 1
        t = layout.mask_table[mid]
        c = int(t[0].sum())
        by_count += bool(c > 0 and (t == (torch.arange(32) < c)[None, :]).all())
    assert 0 < by_count < masked
    assert kernel_length_tiles(layout) == pytest.approx(by_count / masked)
    full = BlockLayout.from_block_masks(torch.ones(2, 2, dtype=torch.bool), q_len=64, kv_len=64, block_q=32,
                                        block_k=32)
    assert kernel_length_tiles(full) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vsa_fine_layout_runs_by_length(dtype):
    """VSA's fine branch over (4, 4, 4) cubes of a grid no cube divides: the partial cubes' real keys are a
    column prefix of their block (packed order), run by a count."""
    from dit_accel.kernels.vsa.api import vsa_layout
    from dit_accel.kernels.vsa.naive import cubes_of

    cubes = cubes_of((5, 6, 7), (4, 4, 4))
    assert cubes.perm.num_padded <= 512
    g = torch.Generator().manual_seed(6)
    selection = torch.rand(1, 2, cubes.count, cubes.count, generator=g).argsort(-1)[..., :3].sort(-1).values
    layout = vsa_layout(cubes, selection)
    assert prefix_masks(layout) > 0
    n = layout.q_len
    q, k, v = make_qkv(1, 2, n, layout.kv_len, 32, dtype, seed=8, device="cpu")
    _runs_by_length_exactly(layout, q, k, v, dtype)


def test_length_variants_ship_except_where_they_spill():
    """Every forward configuration ships its length variant (compiled and checked for spills with the others in
    test_compile_block_sparse.py) except those of LENGTHS_SPILL, where the launcher keeps the bit masks."""
    from dit_accel.kernels.block_sparse.configs import LENGTHS_SPILL, length_config, shipped_configs

    for arch in (80, 89, 90, 100):
        shipped = shipped_configs(arch)
        base = [c for c in shipped if c.kernel == "fwd" and not (c.ws or c.resume or c.lengths or c.gather)]
        for cfg in base:
            spills = (arch, cfg.block_d, cfg.block_m, cfg.block_n, cfg.tma) in LENGTHS_SPILL
            assert (length_config(cfg, arch) is None) == spills, (arch, cfg)
            assert (dataclasses.replace(cfg, lengths=True) in shipped) != spills, (arch, cfg)
    assert sum(length_config(c, 100) is None for c in shipped_configs(100) if c.kernel == "fwd" and not c.lengths
               and not c.ws and not c.resume and not c.gather) == 4  # fp16 and bf16 of the two spilling tiles


def test_prefix_masks_reads_a_shared_table_once_and_again_after_an_edit(monkeypatch):
    """Layouts built per call around one mask table (VSA's fine branch) read its prefix count back once; a table
    edited in place is counted again."""
    import builtins

    from dit_accel.kernels.block_sparse import lengths

    table = torch.zeros(2, 64, 64, dtype=torch.bool)
    table[0, :, :40] = True  # a column prefix
    table[1, ::2, :10] = True  # not one: rows differ

    class Layout:
        mask_table = table

    reads = []  # the host reads: int() of the count tensor, looked up in the module before the builtins
    monkeypatch.setattr(lengths, "int", lambda x: reads.append(1) or builtins.int(x), raising=False)
    assert [prefix_masks(Layout()) for _ in range(3)] == [1, 1, 1] and len(reads) == 1
    table[1, 1::2, :10] = True  # now every row allows the first 10 columns
    assert prefix_masks(Layout()) == 2 and len(reads) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("blocks,d", [((64, 64), 64), ((32, 32), 40)])
def test_sm90_loop_runs_length_tiles_by_their_entry(monkeypatch, dtype, blocks, d):
    """The TMA one-loop forward (sm_90, run here by pretending the device is one): length tiles told by the low
    bits of their column entry and masked by the bias product, exact against the reference and the bit-mask
    path."""
    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    bq, bk = blocks
    n, m = 3 * bq + 7, 3 * bk + 13
    layout = prefix_layout(2, n, m, bq, bk, seed=7)
    q, k, v = make_qkv(1, 2, n, m, d, dtype, seed=1, device="cpu")
    o, lse = _run(layout, q, k, v, True)
    assert_attention_close(o, lse, q, k, v, layout.to_dense_mask())
    launch = [x for x in bst._PLANS.values(layout).values() if isinstance(x, bst._Launch)]
    assert [(x.cfg.tma, x.cfg.lengths) for x in launch] == [(True, True)]
    o0, _ = _run(layout, q, k, v, False)
    torch.testing.assert_close(o.float(), o0.float(), atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=0)


def test_masked_columns_with_the_largest_scores_contribute_nothing(monkeypatch):
    """The bias product sets a length tile's masked scores to -inf, whatever they were: keys past the count that
    score far above the allowed ones and carry values of 1000 change nothing."""
    monkeypatch.setattr(bst, "_arch", lambda device: 90)
    n = m = 64 + 64
    visited = torch.ones(1, 2, 2, dtype=torch.bool)
    cols = torch.arange(64)
    table = torch.stack([cols[None, :].expand(64, 64) < 9])  # every block: its first 9 keys
    layout = BlockLayout.from_block_masks(visited, q_len=n, kv_len=m, block_q=64, block_k=64,
                                          mask_ids=torch.zeros(1, 2, 2, dtype=torch.long), mask_table=table)
    assert prefix_masks(layout) == 1
    q, k, v = make_qkv(1, 1, n, m, 64, torch.float16, seed=3, device="cpu")
    q = q.abs()  # positive queries: keys of +4 in every dimension score about 250 x 64 ...
    k[..., 9:64, :] = 4.0
    k[..., 64 + 9:, :] = 4.0
    v[..., 9:64, :] = 1000.0  # ... and carry values that would show
    v[..., 64 + 9:, :] = 1000.0
    o, lse = _run(layout, q, k, v, True)
    assert_attention_close(o, lse, q, k, v, layout.to_dense_mask())
    assert float(o.abs().max()) < 10


def test_column_offsets_encode_each_tile_like_brute_force():
    """The sm_90 plan's entries decoded by hand: column = entry with the low and PARTIAL bits cleared, a length
    tile's masked column count in the low bits (its count of allowed columns from the plan with lengths), a
    bit-masked tile with PARTIAL, a full one with neither."""
    from dit_accel.kernels.block_sparse.lengths import PARTIAL, column_offsets

    layout = prefix_layout(2, 150, 200, 64, 64, seed=17)
    plan = tile_plan(layout, 64, 64, lengths=True)
    packed = column_offsets(plan, 64)
    assert torch.equal(packed.plan[..., :3], plan.plan[..., :3]) and packed.bits is plan.bits
    kinds = set()
    for row, prow in zip(plan.plan.reshape(-1, plan.plan.shape[-1]).tolist(),
                         packed.plan.reshape(-1, plan.plan.shape[-1]).tolist()):
        n_full, n_rest, n_len = row[:3]
        for i in range(n_full + n_rest):
            tile, entry, got = row[3 + i], row[3 + plan.w + i], prow[3 + i]
            assert got & ~(PARTIAL.value | 63) == tile * 64
            if i < n_full:
                kind, want = "full", (got & 63, got & PARTIAL.value) == (0, 0)
            elif i < n_full + n_len:
                kind, want = "length", got & 63 == 64 - entry and 0 < entry < 64 and not got & PARTIAL.value
            else:
                kind, want = "masked", got & 63 == 0 and got & PARTIAL.value
            assert want, (kind, i, row, prow)
            kinds.add(kind)
    assert kinds == {"full", "length", "masked"}


def test_the_bias_table_reads_count_zeros_then_minus_inf():
    from dit_accel.kernels.block_sparse.lengths import len_bias_table

    table = len_bias_table(torch.device("cpu"), torch.float16, 64)
    assert table is len_bias_table("cpu", torch.float16, 64) and table.shape == (128, 16)
    for r in (1, 9, 63):
        rows = table[r:r + 64]  # the rows a tile masking its last r columns reads
        assert torch.equal(rows[:64 - r], torch.zeros(64 - r, 16, dtype=torch.float16))
        assert (rows[64 - r:, 0] == float("-inf")).all() and not rows[64 - r:, 1:].any()


def test_a_bias_table_made_inside_a_capture_is_not_kept(monkeypatch):
    """Inside a CUDA graph capture the table's values are written only on replay: the table made there serves that
    call and is not cached for later eager calls, which make their own."""
    from dit_accel.kernels.block_sparse import lengths

    monkeypatch.setattr(lengths, "_TABLES", {})
    monkeypatch.setattr(lengths, "in_graph", lambda: True)
    captured = lengths.len_bias_table("cpu", torch.float32, 32)
    assert lengths._TABLES == {} and captured[32:, 0].eq(float("-inf")).all()
    monkeypatch.setattr(lengths, "in_graph", lambda: False)
    eager = lengths.len_bias_table("cpu", torch.float32, 32)
    assert eager is not captured and lengths.len_bias_table("cpu", torch.float32, 32) is eager
