"""Per-head sliding-tile windows and FastVideo STA strategy files against a brute-force definition written here.

The definition is FastVideo's, per dimension: a query in tile ``q`` of ``n`` tiles sees the
key tiles ``c - w//2 .. c + w//2`` with ``c = min(max(q, w//2), n - 1 - w//2)``, every tile
when ``w >= n`` (an even ``w`` thus covers ``w + 1`` tiles). The mask of a head is the
product over dimensions, enumerated token by token. The strategy files are written here
in FastVideo's format: ``{"step_layer_head": [wt, wh, ww]}``.
"""

import itertools
import json
import math

import pytest
import torch

import dit_accel
from dit_accel.kernels import BlockLayout
from dit_accel.methods import TileStrategy
from dit_accel.models import tiny as T
from dit_accel.patterns import tile_layout, tile_mask
from dit_accel.patterns.separable import stack_heads
from dit_accel.pipelines.schedule import Schedule
from tests.utils import TOL, PerCallReference, make_qkv, reference


# ----------------------------------------------------------------- brute force
def _tiles_seen(q_tile, n, w):
    if w >= n:
        return set(range(n))
    c = min(max(q_tile, w // 2), n - 1 - w // 2)
    return set(range(c - w // 2, c + w // 2 + 1))


def _fastvideo_mask(grid, tile, window):
    """bool [N, N] in raster order, one window (tiles per dimension)."""
    n_tiles = [-(-g // t) for g, t in zip(grid, tile)]
    coords = list(itertools.product(*[range(g) for g in grid]))  # raster order
    key_tiles = torch.tensor(coords) // torch.tensor(tile)  # [N, dims]: tile coordinate of every key
    mask = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for i, q in enumerate(coords):
        for d in range(len(grid)):
            seen = torch.tensor(sorted(_tiles_seen(q[d] // tile[d], n_tiles[d], window[d])))
            mask[i] &= torch.isin(key_tiles[:, d], seen)
    return mask


def _write_strategy(path, table):
    """``table[(step, layer)] = [window of head 0, ...]`` as FastVideo's mask-strategy JSON."""
    data = {f"{s}_{layer}_{h}": list(w) for (s, layer), heads in table.items() for h, w in enumerate(heads)}
    path.write_text(json.dumps(data, indent=1))
    return path


GRID, TILE = (4, 6, 8), (2, 2, 4)  # tiles (2, 3, 2); tile volume 16: no block box, so a default tile permutes
TABLE = {  # 2 steps x 2 layers x 3 heads; even windows as FastVideo's search produces them
    (0, 0): [(2, 3, 2), (2, 3, 2), (2, 3, 2)],  # the full window: dense
    (0, 1): [(2, 3, 2), (2, 3, 2), (2, 3, 2)],
    (1, 0): [(1, 1, 1), (2, 2, 1), (1, 3, 2)],
    (1, 1): [(1, 2, 2), (2, 1, 1), (1, 1, 1)],
}


# ----------------------------------------------------------------- per-head masks and layouts
def test_per_head_mask_and_layout_match_brute_force():
    windows = ((1, 1, 1), (2, 2, 1), (1, 3, 2), (1, 1, 1))
    masks = tile_mask(GRID, TILE, windows)
    assert masks.shape == (4, math.prod(GRID), math.prod(GRID))
    for h, w in enumerate(windows):
        assert torch.equal(masks[h], _fastvideo_mask(GRID, TILE, w)), w
    perm, layout = tile_layout(GRID, TILE, windows)
    assert layout.num_heads == 4
    real = perm.order >= 0
    order = perm.order[real]
    dense = layout.to_dense_mask()[:, real][:, :, real]
    for h in range(4):
        assert torch.equal(dense[h], masks[h][order][:, order])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_head_plan_runs_one_launch_like_the_masked_oracle(backend):
    windows = ((1, 1, 1), (2, 3, 2), (1, 2, 1))
    plan = dit_accel.Tile(tile=TILE, window=windows).plan(GRID)
    assert plan.kind == "layout" and plan.layout.num_heads == 3
    n = math.prod(GRID)
    q, k, v = make_qkv(1, 3, n, n, 16)
    out, density = plan.run(q, k, v, backend=backend)
    ref, _ = reference(q, k, v, tile_mask(GRID, TILE, windows))
    tol = TOL[torch.float32][0] if backend == "triton" else 1e-4  # fp32 through tl.dot is tf32 on a GPU
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert density == pytest.approx(plan.layout.density())


def test_stack_heads_shares_masks_and_checks_shapes():
    _, a = tile_layout(GRID, TILE, (1, 1, 1))
    _, b = tile_layout(GRID, TILE, (2, 2, 1))
    stacked = stack_heads([a, b, a])
    assert stacked.num_heads == 3
    assert stacked.mask_table.shape[0] == a.mask_table.shape[0] + b.mask_table.shape[0]  # a's masks once
    for h, lay in enumerate((a, b, a)):
        assert torch.equal(stacked.to_dense_mask()[h], lay.to_dense_mask()[0])
    other = BlockLayout.from_dense_mask(torch.ones(10, 10, dtype=torch.bool), 8, 8)
    with pytest.raises(ValueError, match="stack_heads needs single-head layouts"):
        stack_heads([a, other])
    with pytest.raises(TypeError, match="BlockLayout"):
        stack_heads([])


def test_per_head_window_validation():
    tile = dit_accel.Tile(tile=(2, 2, 4), window=[(1, 1, 1), 3])
    assert tile.window == ((1, 1, 1), 3) and tile.heads == 2
    assert dit_accel.Tile().heads is None
    with pytest.raises(ValueError, match=r"Tile.window\[1\]"):
        dit_accel.Tile(window=((3, 3, 3), (0, 3, 3)))
    with pytest.raises(ValueError, match="Tile.window.*as many dimensions as tile"):
        dit_accel.Tile(tile=(6, 8, 8), window=((3, 3, 3), (3, 3)))
    with pytest.raises(ValueError, match="per-head windows; tile_relations takes one window"):
        from dit_accel.patterns.tile import tile_relations

        tile_relations(GRID, TILE, ((1, 1, 1),))


def test_all_heads_covering_the_grid_is_dense():
    plan = dit_accel.Tile(tile=TILE, window=((2, 3, 2), (3, 4, 2))).plan(GRID)
    assert plan.is_dense and "covers the whole grid" in plan.dense_reason


# ----------------------------------------------------------------- strategy files
def test_strategy_file_gives_the_brute_force_per_head_masks(tmp_path):
    path = _write_strategy(tmp_path / "mask_strategy.json", TABLE)
    strategy = dit_accel.Tile.from_strategy(path, tile=TILE)
    assert strategy.name == "tile_strategy" and strategy.heads == 3 and strategy.steps == (0, 1)
    schedule = Schedule(method=strategy)
    for (step, layer), windows in TABLE.items():
        method = schedule.method_for(layer, step, 2)
        assert method == dit_accel.Tile(tile=TILE, window=tuple(windows))
        masks = tile_mask(GRID, method.tile, method.window)
        for h, w in enumerate(windows):
            assert torch.equal(masks[h], _fastvideo_mask(GRID, TILE, w)), (step, layer, h)
    assert schedule.method_for(0, 0, 2).plan(GRID).is_dense  # the full window of the early steps
    assert schedule.method_for(0, 5, 6) is None  # a step the file does not list runs dense
    assert schedule.method_for(7, 1, 2) is None
    assert Schedule(method=strategy, dense_steps=2).method_for(0, 1, 2) is None  # the schedule still applies


def test_strategy_runs_through_apply_with_its_per_head_windows(tmp_path):
    model = T.build_tiny_transformer("wan")  # 2 layers, 2 heads
    grid = (4, 8, 8)
    table = {(0, 0): [(2, 2, 1), (1, 1, 2)], (0, 1): [(1, 2, 2), (2, 2, 2)],
             (1, 0): [(1, 1, 1), (1, 2, 1)], (1, 1): [(2, 1, 1), (1, 1, 1)]}
    strategy = dit_accel.Tile.from_strategy(_write_strategy(tmp_path / "s.json", table), tile=(2, 4, 4))
    kwargs = T.tiny_transformer_inputs("wan", model, grid=grid)
    for step in (0, 1):
        with dit_accel.apply(model, strategy, backend="torch") as handle, torch.no_grad():
            handle.set_step(step, 2)
            out = model(**kwargs)[0]
            rows = handle.stats()
        assert [row["method"] for row in rows] == ["tile_strategy"] * 2
        assert all(row["sparse_calls"] == 1 and row["dense_calls"] == 0 for row in rows)
        masks = [tile_mask(grid, (2, 4, 4), tuple(table[(step, layer)])) for layer in (0, 1)]
        with PerCallReference(masks) as oracle, torch.no_grad():
            ref = model(**kwargs)[0]
        assert oracle.calls == 2
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON object"),
    ('{"1_2": [1, 1, 1]}', "is not \\\"step_layer_head\\\""),
    ('{"0_0_0": [1, 0, 1]}', "expected a window in tiles"),
    ('{"0_0_0": [1, 1, 1], "0_0_2": [1, 1, 1]}', "lacks heads \\[1\\]"),
    ('{"0_0_0": [1, 1, 1], "0_1_0": [1, 1]}', "mixes windows of \\[2, 3\\] dimensions"),
], ids=["json", "list", "key", "value", "missing-head", "mixed-dims"])
def test_bad_strategy_files_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        dit_accel.Tile.from_strategy(path)


def test_strategy_config_errors(tmp_path):
    with pytest.raises(ValueError, match="TileStrategy.path"):
        TileStrategy()
    with pytest.raises(ValueError, match="cannot read"):
        dit_accel.Tile.from_strategy(tmp_path / "missing.json")
    path = _write_strategy(tmp_path / "s.json", {(0, 0): [(1, 1, 1)]})
    with pytest.raises(ValueError, match="as many dimensions as tile"):
        dit_accel.Tile.from_strategy(path, tile=(8, 8))
    with pytest.raises(ValueError, match="for_layer_step"):
        dit_accel.Tile.from_strategy(path).plan((4, 8, 8))


# ----------------------------------------------------------------- GNA kernel sizes per head
def test_gna_kernel_size_per_head():
    from dit_accel.patterns import gna_layout, gna_mask
    from dit_accel.patterns.gna import check_gna_args

    grid, kernels = (4, 6, 8), ((2, 3, 3), (3, 5, 2), (2, 3, 3))
    masks = gna_mask(grid, kernels, stride=(1, 1, 2))
    assert masks.shape == (3, math.prod(grid), math.prod(grid))
    for h, k in enumerate(kernels):
        assert torch.equal(masks[h], gna_mask(grid, k, stride=(1, 1, 2)))
    perm, layout = gna_layout(grid, kernels, stride=(1, 1, 2))
    real = perm.order >= 0
    order = perm.order[real]
    dense = layout.to_dense_mask()[:, real][:, :, real]
    assert layout.num_heads == 3 and all(torch.equal(dense[h], masks[h][order][:, order]) for h in range(3))
    assert check_gna_args([(3, 3), [2, 5]], 1)[0] == ((3, 3), (2, 5))
    with pytest.raises(ValueError, match="stride.*<= kernel_size"):
        check_gna_args(((3, 3), (2, 2)), 3)
