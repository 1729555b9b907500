"""The tiny pipelines of the Wan lineage and the image families (issue 28 item 2): each is a real Diffusers
pipeline built offline that generates in seconds, that dit_accel makes sparse at its grid-sized method options
(every wrapped layer, an output different from dense) and that ``Dense()`` leaves bit-exact."""
from importlib.util import find_spec

import pytest
import torch

import dit_accel
from dit_accel.methods import GNA, Dense
from dit_accel.models.tiny import TINY_DEFAULTS, TINY_METHOD_DEFAULTS, build_tiny_pipeline

# Diffusers' SkyReels-V2 and Wan VACE pipelines clean every prompt with ftfy (declared in pyproject.toml).
_NEEDS_FTFY = pytest.mark.skipif(find_spec("ftfy") is None, reason="this Diffusers pipeline needs ftfy to clean prompts")

# name -> (pipeline class, its token grid at the tiny defaults)
PIPES = {
    "tiny-skyreels-v2": ("SkyReelsV2Pipeline", (5, 8, 8)),
    "tiny-wan-vace": ("WanVACEPipeline", (5, 8, 8)),
    "tiny-sd3": ("StableDiffusion3Pipeline", (16, 16)),
    "tiny-chroma": ("ChromaPipeline", (16, 16)),
    "tiny-cogview4": ("CogView4Pipeline", (16, 16)),
    "tiny-qwenimage": ("QwenImagePipeline", (16, 16)),
    "tiny-flux2": ("Flux2KleinPipeline", (16, 16)),
}
NAMES = [pytest.param(n, marks=_NEEDS_FTFY) if n in ("tiny-skyreels-v2", "tiny-wan-vace") else n for n in PIPES]


def _call(pipe, name: str, **overrides):
    import inspect

    accepts = set(inspect.signature(pipe.__call__).parameters)
    call = {k: v for k, v in TINY_DEFAULTS[name].items() if k in accepts}
    call.update(num_inference_steps=2, max_sequence_length=16, **overrides)
    with torch.no_grad():
        out = pipe(prompt="a red panda", generator=torch.Generator().manual_seed(0), **call)
    return out.frames if hasattr(out, "frames") else out.images


@pytest.fixture(scope="module", params=NAMES)
def tiny(request):
    pipe = build_tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def test_builds_the_family_pipeline_at_a_sparse_sized_grid(tiny):
    name, pipe = tiny
    cls, grid = PIPES[name]
    assert type(pipe).__name__ == cls
    d, patch = TINY_DEFAULTS[name], pipe.transformer.config.patch_size
    if len(grid) == 3:
        pt, ph, pw = patch
        got = (((d["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1) // pt,
               d["height"] // pipe.vae_scale_factor_spatial // ph, d["width"] // pipe.vae_scale_factor_spatial // pw)
    else:
        patch *= 2 if type(pipe).__name__ in ("ChromaPipeline", "Flux2KleinPipeline") else 1  # 2x2 packed latents
        got = (d["height"] // pipe.vae_scale_factor // patch, d["width"] // pipe.vae_scale_factor // patch)
    assert got == grid
    assert {"tile", "gna", "sla"} <= set(TINY_METHOD_DEFAULTS[name])


def test_two_steps_generate_offline(tiny):
    name, pipe = tiny
    d = TINY_DEFAULTS[name]
    small = dict(num_frames=5, height=32, width=32) if len(PIPES[name][1]) == 3 else {}  # video: decode less
    out = _call(pipe, name, output_type="np", **small)
    shape = (1, 5, 32, 32, 3) if small else (1, d["height"], d["width"], 3)
    assert out.shape == shape and torch.isfinite(torch.as_tensor(out)).all()
    assert out.min() >= 0.0 and out.max() <= 1.0 and out.std() > 0


def test_sparse_method_is_sparse_everywhere_and_dense_is_bit_exact(tiny):
    name, pipe = tiny
    reference = _call(pipe, name, output_type="latent")

    handle = dit_accel.apply(pipe, Dense())
    try:
        again = _call(pipe, name, output_type="latent")
    finally:
        handle.remove()
    assert torch.equal(again, reference), "Dense() must reproduce the unwrapped pipeline bit-exactly"

    handle = dit_accel.apply(pipe, GNA(**TINY_METHOD_DEFAULTS[name]["gna"]))
    try:
        sparse = _call(pipe, name, output_type="latent")
        rows = handle.stats()
    finally:
        handle.remove()
    assert rows and len(rows) == len(handle.layers)
    for r in rows:  # every wrapped layer ran sparse at every call, skipping blocks
        assert r["sparse_calls"] >= 2 and r["dense_calls"] == 0 and r["density"] < 1, r
    assert not torch.allclose(sparse, reference, atol=1e-4), "a sparse method must change the output"
    assert torch.equal(_call(pipe, name, output_type="latent"), reference), "remove() restores dense"
