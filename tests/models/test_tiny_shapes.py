"""The shipped tiny-shapes pipeline: stock Diffusers folder, sizes, exact pixel codec, and its quality.

The quality checks generate a few videos with the trained weights and judge them with the
ground-truth metric (dit_accel.eval.groundtruth): dense must stay above a floor a little below
its measured figure, and Tile / GNA / Radial at their tiny-shapes settings within a stated
margin of dense (``MARGIN``) on the criteria they keep on these weights (``MARGIN_KEYS``).
``FarOnly``, a method that keeps every key except each query's neighbourhood, checks that the
metric sees broken attention: its object falls apart (consistency).

Every figure that depends on the weights lives in the block below. After new weights are
dropped into dit_accel/models/weights/tiny-shapes, re-measure with

    nice python tests/models/test_tiny_shapes.py

(same prompts, seeds, steps and methods as the tests; ~1 min on 2 idle cores) and update
``WEIGHTS`` and ``MEASURED``; keep the floors a little below the measured figures and the
margins at the measured losses plus one video.
"""
import dataclasses
import json
import os
import subprocess
import sys
from typing import ClassVar

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.eval.groundtruth import score_many
from dit_accel.models.clips import render_batch
from dit_accel.models.tiny_shapes import (TINY_SHAPES_DEFAULTS, TINY_SHAPES_DIR, TINY_SHAPES_GRID, TINY_SHAPES_LABEL,
                                          TINY_SHAPES_METHODS, balanced_prompts, evaluate, load_tiny_shapes)
from dit_accel.models.train_tiny import pack_latents

# ----------------------------------------------------------------------------- weight-dependent figures
WEIGHTS = ("train_tiny final EMA weights, step 3600 of 3600 (/tmp/ts3600, 16:59 UTC 2026-11-22); "
           "call settings guidance 2.0")
CHECK = {"prompts": 8, "seeds": (0,), "num_inference_steps": 8}  # what the quality tests generate
CHECK_METHODS = {name: TINY_SHAPES_METHODS[name] for name in ("sla", "tile", "gna", "radial")}
# Ground-truth accuracies measured with the command in the module docstring for WEIGHTS (8 videos each).
MEASURED = {  # since the motion rule fails drifts over 30 degrees off the prompt's axis (2026-11-23)
    "dense": {"colour": 1.0, "shape": 1.0, "motion": 0.75, "consistency": 1.0, "all": 0.75},
    "sla": {"colour": 1.0, "shape": 0.75, "motion": 0.25, "consistency": 0.375, "all": 0.125},  # density 0.333
    "tile": {"colour": 1.0, "shape": 0.75, "motion": 0.375, "consistency": 0.0, "all": 0.0},  # density 0.333
    "gna": {"colour": 1.0, "shape": 0.5, "motion": 0.125, "consistency": 0.0, "all": 0.0},  # density 0.605
    "radial": {"colour": 1.0, "shape": 0.875, "motion": 0.75, "consistency": 1.0, "all": 0.75},  # density 0.951
    "far_only": {"colour": 1.0, "shape": 0.5, "motion": 0.75, "consistency": 0.0, "all": 0.0},
}
DENSE_FLOOR = {"colour": 0.875, "shape": 0.875, "motion": 0.625, "consistency": 0.875, "all": 0.625}
# Stated margins: how much of each guarded dense accuracy a method may lose (the measured loss plus one
# video of 8). SLA, Tile and GNA are not guarded on consistency and "all" here: at these densities Tile and
# GNA split the object into pieces along tile edges (consistency 1.0 -> 0.0), as the locality-breaking
# control does, and SLA keeps it whole in some videos only; SLA_OVER_TILE guards why SLA is the default.
MARGIN = {"sla": 0.625, "tile": 0.5, "gna": 0.75, "radial": 0.25}
MARGIN_KEYS = {"sla": ("colour", "shape", "motion"), "tile": ("colour", "shape", "motion"),
               "gna": ("colour", "shape", "motion"), "radial": ("colour", "shape", "motion", "consistency", "all")}
SLA_OVER_TILE = 0.25  # at the same density 0.333, SLA's consistency exceeds Tile's by at least this (measured 0.375)
CONTROL_MARGIN = 0.25  # the control must lose more than this on consistency
# -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny operations: one thread is fastest, and the suite shares the machine
    yield load_tiny_shapes()
    torch.set_num_threads(threads)


def test_folder_is_a_small_stock_diffusers_pipeline():
    index = json.loads((TINY_SHAPES_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    for name in ("tokenizer", "text_encoder", "transformer", "vae", "scheduler"):
        assert index[name][0] in ("diffusers", "transformers"), f"{name} must be a stock class, got {index[name]}"
    files = [p for p in TINY_SHAPES_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")], "weights must be safetensors"
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert TINY_SHAPES_LABEL == "tiny model trained on synthetic clips (coloured shapes)"


def test_loads_offline_in_a_fresh_process_without_dit_accel():
    code = ("from diffusers import DiffusionPipeline; import sys; "
            "p = DiffusionPipeline.from_pretrained(sys.argv[1], local_files_only=True); "
            "assert 'dit_accel' not in sys.modules; print(type(p).__name__, type(p.vae).__name__)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(TINY_SHAPES_DIR)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["WanPipeline", "AutoencoderKLWan"]


def test_loads_by_name_through_load_pipeline():
    from dit_accel.models.loading import load_pipeline, resolve_model_kind

    assert resolve_model_kind("tiny-shapes") == "embedded"
    pipe = load_pipeline("tiny-shapes")
    assert type(pipe).__name__ == "WanPipeline" and pipe.transformer.dtype == torch.float32


def test_parameter_and_token_counts(pipe):
    # "About 1-5 M parameters": the transformer has 0.95 M, 1.04 M with the text encoder trained with it.
    params = sum(p.numel() for p in pipe.transformer.parameters())
    text = sum(p.numel() for p in pipe.text_encoder.parameters())
    assert 900_000 <= params <= 5_000_000 and params + text >= 1_000_000
    d = TINY_SHAPES_DEFAULTS
    patch = pipe.transformer.config.patch_size
    grid = ((d["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1,
            d["height"] // pipe.vae_scale_factor_spatial // patch[1],
            d["width"] // pipe.vae_scale_factor_spatial // patch[2])
    assert grid == TINY_SHAPES_GRID == (4, 12, 12) and int(np.prod(grid)) >= 512


def test_vae_is_an_exact_pixel_codec(pipe):
    g = torch.Generator().manual_seed(0)
    video = render_batch(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([3, 1]), generator=g, frames=9,
                         height=32, width=48)
    x = video.permute(0, 4, 1, 2, 3) * 2 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mode()
        torch.testing.assert_close(z, pack_latents(video), atol=1e-4, rtol=0)
        decoded = pipe.vae.decode(z[:, :, :4]).sample  # any latent length: 4 latent frames -> 7 frames
    pooled = torch.nn.functional.avg_pool3d(x[:, :, :7], (1, 2, 2))
    torch.testing.assert_close(decoded, pooled.repeat_interleave(2, -1).repeat_interleave(2, -2), atol=1e-4, rtol=0)


def test_output_shape_and_padding_independence(pipe):
    kwargs = {**TINY_SHAPES_DEFAULTS, "num_inference_steps": 4}
    runs = [pipe("a green circle moving down", generator=torch.Generator().manual_seed(1), output_type="np",
                 **{**kwargs, "max_sequence_length": length}).frames[0] for length in (16, 226)]
    assert runs[0].shape == (7, 48, 48, 3) and 0.0 <= runs[0].min() and runs[0].max() <= 1.0
    # Trained with random text padding: the pipeline's default length (226) gives nearly the same video.
    assert np.abs(runs[0] - runs[1]).mean() < 0.05
    assert score_many(runs, ["a green circle moving down"] * 2)["colour"] == 1.0


def test_method_settings_are_sparse_on_the_default_grid():
    from dit_accel.methods import method_from_name

    densities = {name: method_from_name(name, **options).plan(TINY_SHAPES_GRID).density
                 for name, options in TINY_SHAPES_METHODS.items() if name != "sla"}
    assert densities["tile"] == pytest.approx(1 / 3) and all(d < 1.0 for d in densities.values()), densities


# ----------------------------------------------------------------------------- quality against ground truth
@dataclasses.dataclass(frozen=True)
class FarOnly(dit_accel.Method):
    """Negative control: every key except those within ``reach`` rows and columns of the query (all frames).
    The opposite of the locality Tile, GNA and Radial rely on."""

    name: ClassVar[str] = "far_only"
    reach: int = 3

    def plan(self, grid):
        from dit_accel.kernels import BlockLayout
        from dit_accel.plans.plan import LayoutPlan

        t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
        rows, cols = h.flatten(), w.flatten()
        near = ((rows[:, None] - rows[None, :]).abs() <= self.reach) & ((cols[:, None] - cols[None, :]).abs()
                                                                          <= self.reach)
        return LayoutPlan(self, grid, BlockLayout.from_dense_mask(~near, 64, 64))


def measure(pipe, methods: dict) -> dict:
    """Ground-truth accuracies (and density) of dense and each method on the CHECK prompts, seeds and steps."""
    prompts, seeds, steps = balanced_prompts(CHECK["prompts"]), CHECK["seeds"], CHECK["num_inference_steps"]
    out = {"dense": evaluate(pipe, prompts=prompts, seeds=seeds, num_inference_steps=steps)}
    for name, method in methods.items():
        with dit_accel.apply(pipe, method, backend="torch") as handle:
            out[name] = evaluate(pipe, prompts=prompts, seeds=seeds, num_inference_steps=steps)
            out[name]["density"] = handle.summary()["mean_density"]
    for result in out.values():
        result.pop("settings", None)
    return out


@pytest.fixture(scope="module")
def quality(pipe):
    from dit_accel.methods import method_from_name

    methods = {name: method_from_name(name, **options) for name, options in CHECK_METHODS.items()}
    return measure(pipe, {**methods, "far_only": FarOnly()})


def test_dense_quality_is_above_the_floor(quality):
    dense = quality["dense"]
    assert dense["n"] == CHECK["prompts"] * len(CHECK["seeds"])
    assert all(dense[key] >= floor for key, floor in DENSE_FLOOR.items()), (dense, DENSE_FLOOR, WEIGHTS)


@pytest.mark.parametrize("name", list(CHECK_METHODS))
def test_sparse_method_stays_near_dense(quality, name):
    dense, sparse = quality["dense"], quality[name]
    assert sparse["density"] is not None and sparse["density"] < 1.0
    lost = {key: dense[key] - sparse[key] for key in MARGIN_KEYS[name]}
    assert all(v <= MARGIN[name] for v in lost.values()), (name, lost, MARGIN[name], sparse, dense, WEIGHTS)


def test_default_method_keeps_the_object_whole_more_often_than_tile(quality):
    """`dit-accel generate` runs SLA on this model: at Tile's density it keeps one object per frame more often."""
    assert quality["sla"]["density"] == pytest.approx(quality["tile"]["density"])
    assert quality["sla"]["consistency"] - quality["tile"]["consistency"] >= SLA_OVER_TILE, (quality, WEIGHTS)


def test_breaking_locality_is_seen_by_the_metric(quality):
    """The metric sees broken attention: without each query's neighbourhood the object falls apart
    (consistency drops by more than CONTROL_MARGIN from dense)."""
    dense, far = quality["dense"], quality["far_only"]
    assert dense["consistency"] - far["consistency"] > CONTROL_MARGIN, (far, dense, WEIGHTS)


if __name__ == "__main__":  # re-measure MEASURED for the current weights
    from dit_accel.methods import method_from_name

    torch.set_num_threads(1)
    methods = {name: method_from_name(name, **options) for name, options in CHECK_METHODS.items()}
    result = measure(load_tiny_shapes(), {**methods, "far_only": FarOnly()})
    keys = ("colour", "shape", "motion", "consistency", "all")
    print(json.dumps({name: {k: r[k] for k in (*keys, "density", "seconds_per_sample") if k in r}
                      for name, r in result.items()}, indent=1))
