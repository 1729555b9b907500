"""The shipped tiny-shapes-long pipeline: a stock Diffusers folder under 10 MB, its 2,304-token grid, frame-window
settings against a brute-force frame mask, and its dense ground truth at the shipped call."""
import json

import pytest
import torch

from dit_accel.models.tiny_shapes import (SHAPES_MODELS, TINY_SHAPES_LONG_DEFAULTS, TINY_SHAPES_LONG_DIR,
                                          TINY_SHAPES_LONG_GRID, TINY_SHAPES_LONG_METHODS, balanced_prompts, evaluate)

# Dense ground truth of the shipped weights at the shipped call (31 frames, 12 steps, guidance 2) on
# balanced_prompts(8) x seed 0, measured with `python tests/models/test_tiny_shapes_long.py`; the floor is one
# video of 8 below the measured figure. train_tiny's own eval of these weights (32 prompts x seed 0) is in
# train_log.json.
MEASURED_DENSE = {"colour": 1.0, "shape": 1.0, "motion": 0.75, "consistency": 0.875, "all": 0.75}  # 2026-11-26
DENSE_FLOOR = {"colour": 0.875, "shape": 0.875, "motion": 0.625, "consistency": 0.75, "all": 0.625}
CHECK = {"prompts": 8, "seeds": (0,)}


def test_folder_is_a_stock_diffusers_pipeline_under_10_mb():
    index = json.loads((TINY_SHAPES_LONG_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    files = [p for p in TINY_SHAPES_LONG_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    log = json.loads((TINY_SHAPES_LONG_DIR / "train_log.json").read_text())
    assert log["settings"]["frames"] == TINY_SHAPES_LONG_DEFAULTS["num_frames"]  # trained at the shipped size


def test_the_default_call_has_2304_video_tokens():
    from dit_accel.models.loading import load_pipeline

    pipe = load_pipeline("tiny-shapes-long")
    d, patch = TINY_SHAPES_LONG_DEFAULTS, pipe.transformer.config.patch_size
    grid = ((d["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1,
            d["height"] // pipe.vae_scale_factor_spatial // patch[1],
            d["width"] // pipe.vae_scale_factor_spatial // patch[2])
    assert grid == TINY_SHAPES_LONG_GRID == SHAPES_MODELS["tiny-shapes-long"].grid
    assert grid[0] * grid[1] * grid[2] >= 2304


def _frame_window_mask(grid, frames):
    """Brute force: query frame t sees the `frames` frames of a window centred on t, slid inside the clip at its
    ends (NATTEN's rule), every token of those frames."""
    t_len, per_frame = grid[0], grid[1] * grid[2]
    mask = torch.zeros(t_len, t_len, dtype=torch.bool)
    for t in range(t_len):
        start = min(max(t - frames // 2, 0), t_len - frames)
        mask[t, start:start + frames] = True
    return mask.repeat_interleave(per_frame, 0).repeat_interleave(per_frame, 1)


@pytest.mark.parametrize("name", ["tile", "gna"])
def test_frame_window_settings_visit_three_whole_frames(name):
    from dit_accel.methods import method_from_name

    plan = method_from_name(name, **TINY_SHAPES_LONG_METHODS[name]).plan(TINY_SHAPES_LONG_GRID)
    expected = _frame_window_mask(TINY_SHAPES_LONG_GRID, 3)
    tiled = plan.layout.to_dense_mask()
    tiled = tiled[0] if tiled.dim() == 3 else tiled
    inv = plan.perm.inverse if plan.perm is not None else torch.arange(expected.shape[0])
    assert torch.equal(tiled[inv][:, inv], expected)
    assert plan.density == pytest.approx(expected.float().mean().item())


def _measure():
    from dit_accel.models.loading import load_pipeline

    prompts = balanced_prompts(CHECK["prompts"])
    pipe = load_pipeline("tiny-shapes-long")
    result = evaluate(pipe, prompts=prompts, seeds=CHECK["seeds"], **TINY_SHAPES_LONG_DEFAULTS)
    result.pop("settings")
    return result


def test_dense_ground_truth_is_above_the_floor():
    result = _measure()
    assert all(result[key] >= floor for key, floor in DENSE_FLOOR.items()), (result, MEASURED_DENSE)


if __name__ == "__main__":
    torch.set_num_threads(2)
    print(json.dumps(_measure(), indent=2))
