"""Round 13: eval metrics on edge inputs against fp64 formulas written here, bench figures against brute-force
counts, and the patterns' masks against their definitions at odd grids."""

import itertools
import math

import numpy as np
import pytest
import torch

from dit_accel.eval.metrics import LPIPSScorer, psnr_per_frame, ssim_per_frame, to_frames
from dit_accel.eval.temporal import temporal_report


# ----------------------------------------------------------------------------- fp64 references
def _ssim64(pred: np.ndarray, ref: np.ndarray, kernel: int) -> float:
    """SSIM of one [3, H, W] pair in float64: Gaussian window (sigma 1.5 * kernel / 11), reflection padding, the
    map's mean (torchmetrics' definition, written out)."""
    sigma = 1.5 * kernel / 11
    x = np.arange(kernel) - kernel // 2
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    w = np.outer(g, g)
    pad = kernel // 2

    def blur(img):
        img = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        h, wd = img.shape[1] - 2 * pad, img.shape[2] - 2 * pad
        out = np.zeros((img.shape[0], h, wd))
        for i, j in itertools.product(range(kernel), range(kernel)):
            out += w[i, j] * img[:, i:i + h, j:j + wd]
        return out

    a, b = pred.astype(np.float64), ref.astype(np.float64)
    mu_a, mu_b = blur(a), blur(b)
    var_a = np.maximum(blur(a * a) - mu_a ** 2, 0)
    var_b = np.maximum(blur(b * b) - mu_b ** 2, 0)
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim.mean())


def _kernel(h: int, w: int) -> int:
    side = min(h, w)
    return 11 if side >= 11 else 1 if side < 2 else max(3, side - (1 - side % 2))


@pytest.mark.parametrize("h,w", [(1, 20), (20, 1), (2, 9), (5, 7), (13, 17)], ids=lambda v: str(v))
def test_ssim_of_odd_and_one_pixel_frames_is_the_float64_formula(h, w):
    gen = torch.Generator().manual_seed(h * 100 + w)
    pred, ref = torch.rand(2, 3, h, w, generator=gen), torch.rand(2, 3, h, w, generator=gen)
    got = ssim_per_frame(pred, ref)  # a 1-pixel side raised torch's "Padding size should be less than ..."
    want = [_ssim64(p.numpy(), r.numpy(), _kernel(h, w)) for p, r in zip(pred, ref)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert ssim_per_frame(pred, pred).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_psnr_of_uint8_against_float_frames_is_the_float64_formula():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    ref = rng.random((3, 7, 5, 3)).astype(np.float32)
    mse = ((pred.astype(np.float64) / 255 - ref.astype(np.float64)) ** 2).reshape(3, -1).mean(1)
    assert psnr_per_frame(pred, ref).tolist() == pytest.approx((-10 * np.log10(mse)).tolist(), abs=1e-3)
    flat = np.full((1, 4, 4, 3), 128, np.uint8)
    assert psnr_per_frame(flat, flat).tolist() == [100.0]  # identical: the cap, not inf


@pytest.mark.parametrize("video", [np.zeros((2, 5, 7, 4), np.float32), np.zeros((2, 4, 5, 7), np.float32),
                                   np.zeros((2, 5, 7, 2), np.uint8)], ids=["rgba-last", "rgba-first", "two"])
def test_frames_without_a_three_channel_axis_are_refused_not_scored_as_other_images(video):
    with pytest.raises(ValueError, match=r"RGB.*video\[\.\.\., :3\]"):
        to_frames(video)
    with pytest.raises(ValueError, match="RGB"):  # SSIM read 5 "channels" of 7 x 4 images
        ssim_per_frame(video, video)


def test_nan_frames_are_named_as_nan_not_as_frames_of_another_range():
    video = np.full((3, 4, 4, 3), 0.5, np.float32)
    video[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf values in 1 of its 3 frames") as err:
        psnr_per_frame(video, np.full((3, 4, 4, 3), 0.5, np.float32))
    assert "255" not in str(err.value)  # (it said to divide by 255)


class _AbsDiff(torch.nn.Module):
    def forward(self, a, b):
        return (a - b).abs().mean()

    def reset(self):
        pass


def test_lpips_of_videos_of_other_frame_counts_is_refused_not_scored_on_the_shorter():
    scorer = LPIPSScorer(_AbsDiff())
    ref = torch.zeros(3, 3, 8, 8)
    assert scorer(torch.full((3, 3, 8, 8), 0.25), ref).tolist() == pytest.approx([0.25] * 3)
    with pytest.raises(ValueError, match="frame shapes differ"):  # scored 3 of the 5 frames
        scorer(torch.full((5, 3, 8, 8), 0.25), ref)


def test_clip_score_many_refuses_videos_without_a_prompt_each():
    from dit_accel.eval.clip import ClipScorer

    class Fixed(ClipScorer):
        def __init__(self):
            pass

        def per_frame(self, frames, prompt):
            return torch.full((to_frames(frames).shape[0],), float(len(prompt)))

    videos = [torch.zeros(2, 3, 4, 4)] * 3
    assert Fixed().score_many(videos, ["a", "bb", "ccc"]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="one prompt per video.*3 videos and 2 prompts"):  # was the mean of 2
        Fixed().score_many(videos, ["a", "bb"])
    with pytest.raises(ValueError, match="at least one video"):
        Fixed().score_many([], [])


def test_fid_of_a_list_of_videos_of_other_sizes_names_the_video():
    from dit_accel.eval.fid import frechet_distance

    class Pool(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)

    ref = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"video 0 has 8x8 frames.*video 1 6x6"):  # torch.cat's size error
        frechet_distance([torch.rand(3, 3, 8, 8), torch.rand(2, 3, 6, 6)], ref, Pool())


def test_temporal_report_of_constant_and_one_frame_videos_is_the_formula():
    still = torch.full((5, 3, 6, 6), 0.5)
    ramp = torch.stack([torch.full((3, 6, 6), 0.1 * t) for t in range(5)])
    out = temporal_report(still, ramp)
    assert out["motion"] == 0.0 and out["frozen"] and out["loop_period"] is None
    assert out["motion_ratio"] == 0.0 and out["temporal_error"] == pytest.approx(0.1, abs=1e-6)
    one = temporal_report(still[:1], ramp[:1])
    assert one == {"motion": 0.0, "frozen": False, "loop_period": None, "motion_ratio": None, "temporal_error": 0.0}


# ----------------------------------------------------------------------------- bench figures
def _brute_figures(layout, real):
    """(density, padded work, masked tiles) counted on the layout's dense mask, block by block."""
    dense = layout.to_dense_mask()
    r = torch.ones(layout.q_len, dtype=torch.bool) if real is None else real.bool()
    allowed = dense & r[None, :, None] & r[None, None, :]
    visited, _ = layout.block_masks()
    bq, bk = layout.block_q, layout.block_k
    masked = 0
    for h, a, b in visited.nonzero().tolist():
        block = torch.zeros(bq, bk, dtype=torch.bool)
        part = allowed[h, a * bq:(a + 1) * bq, b * bk:(b + 1) * bk]
        block[:part.shape[0], :part.shape[1]] = part
        rect = torch.zeros(bq, bk, dtype=torch.bool)
        rect[:int(block.any(1).sum()), :int(block.any(0).sum())] = True
        masked += not torch.equal(block, rect)
    pairs, n, tiles = int(allowed.sum()), int(r.sum()), int(visited.sum())
    return pairs / (dense.shape[0] * n * n), tiles * bq * bk / pairs, masked / tiles


def test_bench_layouts_figures_at_an_odd_grid_are_the_brute_force_counts():
    from dit_accel.eval.bench_layouts import _plan_layout, figures_row
    from dit_accel.methods import GNA, Radial

    for config in (Radial(block_size=64), GNA(kernel_size=(3, 3, 3))):
        row = figures_row("odd", (5, 7, 9), "m", "test", config)
        layout, real, _ = _plan_layout(config, (5, 7, 9), 1, 0)
        density, padded, masked = _brute_figures(layout, real)
        assert (row["density"], row["padded_work"], row["masked_tiles"]) == pytest.approx(
            (density, padded, masked), abs=1e-4)


def test_bench_gpu_work_counts_a_ragged_last_block_in_full():
    from dit_accel.eval import bench_gpu_cases as cases
    from dit_accel.eval.bench import ModelShape
    from dit_accel.methods import Radial

    shape = ModelShape("odd", (5, 7, 9), 1, 16)  # 315 tokens: 5 blocks of 64, the last one of 59
    s = cases._Shape(shape, torch.device("cpu"), torch.float32, False, None, 1, 1, lambda: 1, [], [], print)
    case = cases._LayoutCase(s, Radial(block_size=64))
    visited = int(case.layout.block_masks()[0].sum())
    assert case.work == pytest.approx(visited * 64 * 64 / 315 ** 2)  # was 0.720 for 0.743
    density, padded, _ = _brute_figures(case.layout, None)
    assert case.density == pytest.approx(density)
    assert case.work / case.density == pytest.approx(padded) and padded > 1  # the record's padded_work was 0.995


def test_bench_layouts_timing_refuses_a_grid_its_layouts_cannot_take(capsys):
    from dit_accel.eval.bench_layouts import main

    with pytest.raises(SystemExit) as err:  # a child process's CalledProcessError, its script as the message
        main(["4", "5"])
    assert err.value.code == 2
    assert "give T H W, at least 18 24 24" in capsys.readouterr().err


# ----------------------------------------------------------------------------- patterns
def _sta_brute(grid, tile, window):
    coords = list(itertools.product(*[range(g) for g in grid]))
    mask = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for (i, q), (j, k) in itertools.product(enumerate(coords), enumerate(coords)):
        ok = True
        for d, (g, t, w) in enumerate(zip(grid, tile, window)):
            n, h = -(-g // t), w // 2
            if 2 * h + 1 >= n:
                continue  # the window covers the dimension
            centre = min(max(q[d] // t, h), n - 1 - h)
            ok &= abs(k[d] // t - centre) <= h
        mask[i, j] = ok
    return mask


@pytest.mark.parametrize("grid,tile,window", [((1, 5, 7), (1, 2, 3), (1, 1, 1)), ((3, 1, 7), (1, 1, 2), (2, 1, 2)),
                                              ((5, 3, 2), (2, 2, 2), (9, 9, 9)), ((7,), (2,), (4,))],
                         ids=["one-frame", "one-row-even", "window-over-grid", "1d-even"])
def test_tile_mask_and_layout_are_the_sta_definition_at_odd_grids(grid, tile, window):
    from dit_accel.patterns import tile_layout, tile_mask

    want = _sta_brute(grid, tile, window)
    assert torch.equal(tile_mask(grid, tile, window), want)
    perm, layout = tile_layout(grid, tile, window, block_q=4, block_k=8)
    dense, real = layout.to_dense_mask()[0], perm.order >= 0
    back = torch.zeros_like(want)
    idx = perm.order[real]
    back[idx[:, None], idx[None, :]] = dense[real][:, real]
    assert torch.equal(back, want) and not dense[real][:, ~real].any()
    assert math.isclose(float(want.float().mean()), float(tile_mask(grid, tile, window).float().mean()))


def test_bench_kernels_vsa_row_has_the_true_density_and_the_padded_work_of_its_cubes():
    from dit_accel.eval.bench import ModelShape, _shape_row, _vsa_contender
    from dit_accel.kernels.vsa.api import vsa_attention

    grid = (5, 7, 9)  # 4x4x4 cubes: 2 x 2 x 3, most of them partial; 315 tokens in 768 positions
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(3))
    _, meta = _vsa_contender(grid, 0.25, q, k, v)
    row = _shape_row(ModelShape("odd", grid, 2, 16), 1, "VSA", [1.0], [2.0], meta.pop("density"), **meta)
    selection = vsa_attention(q, k, v, grid, topk=meta["topk"], tile=(4, 4, 4), return_selection=True)[1]
    t, h, w = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    cube = ((t // 4) * 2 + h // 4) * 3 + w // 4  # raster order of the cubes
    cube = cube.flatten()
    mask = (cube[None, None, None, :] == selection[:, :, cube, :, None]).any(-2)  # [B, H, N, N]
    assert row["true_density"] == pytest.approx(float(mask.double().mean()))  # was 3 of 12 cubes: 0.25 for 0.152
    visited = meta["topk"] * 12 * 64 * 64 / n ** 2
    assert row["padded_work"] == pytest.approx(visited / row["true_density"])  # was 1.0


def _plan_mask(method, grid):
    """The raster token mask of what ``method``'s plan runs on ``grid`` (its layout, unpermuted)."""
    plan = method.plan(grid)
    dense, order = plan.layout.to_dense_mask()[0], plan.perm.order
    real = order >= 0
    idx = order[real]
    out = torch.zeros(len(idx), len(idx), dtype=torch.bool)
    out[idx[:, None], idx[None, :]] = dense[real][:, real]
    return out


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("method,grid", [("tile", (7, 12, 12)), ("gna", (4, 12, 12))], ids=["tile-fit", "gna-fit"])
def test_the_locality_term_measures_the_pattern_a_fitted_config_runs(method, grid):
    from dit_accel.methods import GNA, Tile
    from dit_accel.models.attention_locality import pattern_mask

    config = Tile(tile=(1, 8, 8), window=(3, 1, 1), fit=True) if method == "tile" else GNA(kernel_size=7, fit=True)
    # Tile: the plan runs tile (7, 6, 6) / window 1 (density 0.25); the term measured (1, 8, 8) / (3, 1, 1) (0.132).
    # GNA: a kernel of 7 over 4 frames runs clamped to 4; the term refused it.
    assert torch.equal(pattern_mask(config, grid), _plan_mask(config, grid))


def test_stage_timer_after_a_run_that_raised_in_the_transformer_times_only_the_next_run():
    import time

    from dit_accel.eval.timing import StageTimer

    class Transformer(torch.nn.Module):
        fail = False

        def forward(self, x):
            time.sleep(0.02)
            if self.fail:
                raise RuntimeError("a kernel failed")
            return x

    class Pipe:
        transformer = Transformer()

    pipe = Pipe()
    with StageTimer(pipe) as timer:
        pipe.transformer.fail = True
        timer.start()
        with pytest.raises(RuntimeError):  # an eval row whose method fails; the next row reuses the timer
            pipe.transformer(torch.zeros(1))
        pipe.transformer.fail = False
        timer.start()
        pipe.transformer(torch.zeros(1))
        times = timer.stop()
    assert timer.calls("transformer") == 1
    assert 0 < times["transformer"] <= times["total"]  # it was 0.046 s in a 0.023 s run


def test_the_report_shows_a_strategy_windows_hash_by_its_first_twelve_digits():
    """A TileStrategy's record carries the 64-digit hash of its windows: the eval table shows 12 of them."""
    from dit_accel.eval.report import _config_text

    text = _config_text({"label": "s", "method": "tile_strategy", "path": "s.json", "windows_sha256": "ab" * 32})
    assert text == "path=s.json, windows_sha256=" + ("ab" * 6)
