"""`dit-accel bench layouts`: every key against a brute-force count written here, on small grids.

The brute force walks the kernels' token mask (``BlockLayout.to_dense_mask``) block by block in plain Python:
allowed real pairs, visited blocks, and whether each visited block's allowed real pairs are a rectangle of
its first rows and columns. The densities are checked once more against the patterns defined here from
METHODS.md (STA's clamped tile window, NATTEN's 1-D rule), in raster order.
"""

import itertools
import json
import math

import pytest
import torch

import dit_accel
from dit_accel.cli.main import main
from dit_accel.eval import bench_layouts
from dit_accel.kernels.geometry import block_figures, efficiency


def _brute(layout, real):
    """(true density, padded work, masked tiles) by walking every visited block."""
    mask = layout.to_dense_mask()
    visited, _ = layout.block_masks()
    real = torch.ones(layout.q_len, dtype=torch.bool) if real is None else real
    n = int(real.sum())
    bq, bk = layout.block_q, layout.block_k
    pairs = tiles = masked = 0
    for h, i, j in visited.nonzero().tolist():
        rows = []
        for r in range(bq):
            row = []
            for c in range(bk):
                qi, kj = i * bq + r, j * bk + c
                ok = qi < layout.q_len and kj < layout.kv_len and bool(mask[h, qi, kj]) and bool(real[qi]) \
                    and bool(real[kj])
                row.append(ok)
            rows.append(row)
        pairs += sum(map(sum, rows))
        tiles += 1
        n_rows = sum(any(r) for r in rows)
        n_cols = sum(any(r[c] for r in rows) for c in range(bk))
        rect = all(rows[r][c] == (r < n_rows and c < n_cols) for r in range(bq) for c in range(bk))
        masked += not rect
    heads = visited.shape[0]
    return pairs / (heads * n * n), tiles * bq * bk / pairs, masked / tiles


def _sta_density(grid, tile, window):
    """STA from METHODS.md: the key tiles within w//2 (w odd-ified) of the clamped query tile, per dimension."""
    coords = list(itertools.product(*[range(g) for g in grid]))
    allowed = 0
    for qc in coords:
        for kc in coords:
            ok = True
            for x, y, g, t, w in zip(qc, kc, grid, tile, window):
                n, half = -(-g // t), (w | 1) // 2
                if half * 2 + 1 >= n:
                    continue
                centre = min(max(x // t, half), n - 1 - half)
                ok &= abs(y // t - centre) <= half
            allowed += ok
    return allowed / len(coords) ** 2


def _gna_density(grid, kernel):
    """NATTEN's stride-1, non-causal 1-D rule (METHODS.md), separable."""
    density = 1.0
    for g, k in zip(grid, kernel):
        left, right = k // 2, k // 2 + k % 2 - 1
        count = 0
        for i in range(g):
            centre = min(max(i, left), g - 1 - right)
            count += sum(centre - left <= j <= centre + right for j in range(g))
        density *= count / g ** 2
    return density


CASES = [
    pytest.param(dit_accel.Tile(tile=(2, 4, 8), window=(1, 3, 1)), (5, 6, 10), id="tile-padded-grid"),
    pytest.param(dit_accel.Tile(tile=(1, 4, 16), window=(1, 1, 1)), (3, 8, 16), id="tile-divides"),
    pytest.param(dit_accel.GNA(kernel_size=(3, 3, 5)), (5, 6, 10), id="gna-stride1"),
    pytest.param(dit_accel.GNA(kernel_size=(4, 4, 8), stride=(2, 4, 8), tile=(2, 4, 8)), (4, 8, 16),
                 id="gna-strided"),
    pytest.param(dit_accel.Radial(block_size=64, decay=1.0), (6, 4, 20), id="radial"),
]


@pytest.mark.parametrize("config, grid", CASES)
def test_figures_row_matches_a_brute_force_count(config, grid):
    row = bench_layouts.figures_row("small", grid, "m", "test", config)
    plan = config.plan(grid)
    real = None if plan.perm is None else plan.perm.order >= 0
    density, padded, masked = _brute(plan.layout, real)
    assert row["density"] == pytest.approx(density, abs=1e-5)
    assert row["padded_work"] == pytest.approx(padded, abs=1e-4)
    assert row["masked_tiles"] == pytest.approx(masked, abs=1e-4)
    assert row["grid"] == list(grid) and row["selection"] == "static"
    if isinstance(config, dit_accel.Tile):
        assert density == pytest.approx(_sta_density(grid, config.tile, config.window), abs=1e-9)
    if isinstance(config, dit_accel.GNA) and config.stride == (1, 1, 1):
        assert density == pytest.approx(_gna_density(grid, config.kernel_size), abs=1e-9)


def test_a_dividing_tile_with_a_ragged_last_block_is_counted_by_lengths_not_masks():
    # Keys 0..99 in blocks of 64: the last block's 36 real keys are a column count; a hole is a mask.
    from dit_accel.kernels import BlockLayout

    visited = torch.ones(2, 2, dtype=torch.bool)
    layout = BlockLayout.from_block_masks(visited, q_len=100, kv_len=100, block_q=64, block_k=64)
    fig = block_figures(layout)
    assert fig.masked_tiles == 0 and fig.density == 1.0
    assert fig.padded_work == pytest.approx(128 * 128 / 100 ** 2)
    real = torch.ones(100, dtype=torch.bool)
    real[10] = False  # a padded position inside the first block: its tiles need an element mask
    fig = block_figures(layout, real, real)
    assert fig.masked_tiles == pytest.approx(3 / 4)
    assert fig.density == pytest.approx(99 * 99 / 99 ** 2)


@pytest.mark.parametrize("config, grid", [
    pytest.param(dit_accel.VSA(sparsity=0.5), (5, 6, 10), id="vsa-partial-cubes"),
    pytest.param(dit_accel.VSA(topk=3), (8, 8, 12), id="vsa-whole-cubes"),
    pytest.param(dit_accel.SLA(topk=0.3), (3, 7, 10), id="sla"),
])
def test_runtime_selection_rows_match_a_brute_force_count(config, grid):
    row = bench_layouts.figures_row("small", grid, "m", "test", config)
    assert row["selection"] == "runtime"
    layout, real, _ = bench_layouts._plan_layout(config, grid, 1, 0)
    density, padded, masked = _brute(layout, real)
    assert (row["density"], row["padded_work"], row["masked_tiles"]) == pytest.approx((density, padded, masked),
                                                                                     abs=1e-4)
    visited, _ = layout.block_masks()
    kept = int(visited[0, 0].sum())
    assert row["masked_tiles"] == 0.0  # SLA's ragged last block, VSA's partial cubes: lengths (packed cubes)
    if isinstance(config, dit_accel.VSA):
        cubes = math.prod(-(-g // 4) for g in grid)
        assert kept == row["topk"] == (3 if config.topk else math.ceil(0.5 * cubes))
    else:
        assert kept == row["topk_blocks"] == math.ceil(0.3 * -(-math.prod(grid) // 64))


@pytest.mark.parametrize("grid, padded", [((16, 28, 52), 1.0), ((21, 30, 52), None)], ids=["fastwan", "wan480p"])
def test_vsa_cubes_waste_nothing_at_fastwans_shape_and_mask_nothing_at_wans(grid, padded):
    config, _ = dit_accel.recommended("WanTransformer3DModel", "vsa")
    assert config.tile == (4, 4, 4)
    row = bench_layouts.figures_row("g", grid, "vsa", "recommended", config)
    assert row["masked_tiles"] == 0.0
    if padded is not None:
        assert row["padded_work"] == pytest.approx(padded)


def test_the_main_jobs_whole_frames_run_on_a_gpu_over_packed_frames_by_counts():
    """The main job's plan (frame tiles of 12 x 12 tokens, 32 frames, windows of 3 and 17 frames): what a GPU runs,
    64-token blocks over frames packed into 192 positions, is counted here from the definition: a frame sees w
    whole frames (w / 32 of the pairs), the blocks do (192 / 144)^2 of that work, and no tile needs a bit mask."""
    rows = bench_layouts.layout_rows(["tiny-shapes-63"])
    assert sorted(r["config"] for r in rows) == sorted(
        f"Tile(tile=(1, 12, 12), window=({w}, 1, 1), block_size=144, fit=False)" for w in (3, 17))
    for r in rows:
        w = int(r["config"].split("window=(")[1].split(",")[0])
        assert r["grid"] == [32, 12, 12] and r["block"] == [64, 64]
        assert r["density"] == pytest.approx(w / 32, abs=1e-5)
        assert r["padded_work"] == pytest.approx((192 / 144) ** 2, abs=1e-4)
        assert r["masked_tiles"] == 0.0 and r["kernel_lengths"] == 1.0


def test_efficiency_is_speedup_times_true_density():
    assert efficiency(10.95, 0.049) == pytest.approx(0.53655)
    with pytest.raises(ValueError, match="density in"):
        efficiency(2.0, 1.5)


def test_cli_prints_one_json_object_per_configuration(monkeypatch, capsys):
    monkeypatch.setattr(bench_layouts, "GRIDS", {"Wan small": (5, 6, 10), "Hunyuan small": (6, 8, 10)})
    monkeypatch.setattr(bench_layouts, "MODEL_OF_GRID", {"Wan small": ("WanTransformer3DModel", "Wan 2.1"),
                                                         "Hunyuan small": ("HunyuanVideoTransformer3DModel",
                                                                           "HunyuanVideo")})
    assert main(["bench", "layouts", "--json", "--methods", "tile,gna,vsa,sla"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["grid_name"], r["method"]) for r in rows} >= {
        ("Wan small", "tile"), ("Wan small", "gna"), ("Wan small", "vsa"), ("Wan small", "sla"),
        ("Hunyuan small", "tile"), ("Hunyuan small", "gna")}
    for r in rows:
        assert {"grid", "method", "density", "padded_work", "masked_tiles", "selection"} <= set(r)
        assert 0 < r["density"] <= 1 and r["padded_work"] >= 1 - 1e-9 and 0 <= r["masked_tiles"] <= 1
    assert main(["bench", "layouts", "--grids", "nowhere"]) == 2
    assert "--grids takes" in capsys.readouterr().err
