"""Every tiny transformer, sparse against the masked-dense reference at grids ``test_apply.py`` does not use.

``test_apply.py`` runs each family at its default grid. Here each family runs GNA (a small kernel; ``fit=True``
where an extent is 1) or Tile (a tile that divides no extent, so the permutation pads) at one frame, odd and
non-square extents, extents of 1 (a one-row image, a one-column video) and the smallest grids, and batch 2 with
text padding where the family has a padding mask. A preset that read a wrong grid, or whose token order were
not the raster order its text position says, would give a silent wrong answer here: the output must match
``tests.utils.ReferenceAttention`` within 2e-4 (fp32) and differ from dense.

The reference replaces the SDPA calls of the sparse layers only (``handle.layers``; every other attention
module is ``text_only``): at these small grids a text refiner or a cross-attention can have as many tokens as
the image (7 text tokens, a 1 x 7 image), which the reference would otherwise take for a joint call. The count
of replaced calls must equal the count of sparse calls.
"""

import warnings

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask, tile_mask
from dit_accel.pipelines.presets import PRESETS
from tests.pipelines.test_apply import PADDED
from tests.utils import ReferenceAttention

# (grid, method) per rank: one frame, odd extents, extents of 1, the smallest sparse grid, non-square images.
VIDEO = [((1, 5, 7), "gna"), ((3, 5, 7), "tile"), ((5, 3, 2), "gna"), ((3, 1, 5), "tile"), ((2, 7, 1), "gna"),
         ((1, 2, 3), "tile")]
IMAGE = [((3, 7), "gna"), ((7, 3), "tile"), ((1, 7), "tile"), ((9, 2), "gna"), ((2, 3), "tile")]
# Grids the tiny model itself cannot take, replaced by the nearest it can (not faults of the presets).
ALTERNATIVES = {
    # Qwen-Image 2.1 packs 2x2 token slots: its grids have a multiple of 4 tokens.
    "qwenimage21": [((3, 8), "gna"), ((8, 3), "tile"), ((1, 8), "tile"), ((9, 4), "gna"), ((2, 6), "tile")],
    # DiT unpatchifies its output as a square (height = width = sqrt(N)).
    "dit": [((3, 3), "tile"), ((5, 5), "gna"), ((7, 7), "tile"), ((2, 2), "tile")],
}
SMALLEST = {3: (1, 1, 1), 2: (1, 1)}  # one token: any method is dense
NO_SINGLE_TOKEN = {"allegro"}  # the model cannot run one token (dense too): the preset refuses it clearly


def _cases():
    for name in T.TRANSFORMER_NAMES:
        rank = len(T.TRANSFORMER_GRIDS[name])
        grids = ALTERNATIVES.get(name, VIDEO if rank == 3 else IMAGE)
        for grid, method in grids:
            yield pytest.param(name, grid, method, 1, id=f"{name}-{'x'.join(map(str, grid))}-{method}")
        if name in PADDED:  # batch 2, the second sample's text padded to 3 tokens
            grid, _ = grids[0]
            yield pytest.param(name, grid, "gna", 2, id=f"{name}-{'x'.join(map(str, grid))}-gna-b2-padded")
        if name not in ALTERNATIVES and name not in NO_SINGLE_TOKEN:
            yield pytest.param(name, SMALLEST[rank], "tile", 1, id=f"{name}-smallest-tile")


def _gna(grid):
    """GNA with kernel 2 or 3 per extent (fit=True clamps it on extents of 1), and its raster mask."""
    ks = tuple(3 if g > 3 else 2 for g in grid)
    wide = [d for d, g in enumerate(grid) if g > 1]
    # An extent of 1 does not change the raster order: the mask is that of the grid without it.
    mask = gna_mask(tuple(grid[d] for d in wide), tuple(ks[d] for d in wide)) if wide else torch.ones(1, 1, dtype=bool)
    return dit_accel.GNA(kernel_size=ks, fit=1 in grid), mask


def _tile(grid):
    """Tile whose tile divides no extent longer than 1 (the permutation pads), window 1, and its raster mask."""
    tile = tuple(next(t for t in range(2, g + 2) if g % t) if g > 1 else 2 for g in grid)
    window = (1,) * len(grid)
    return dit_accel.Tile(tile=tile, window=window), tile_mask(grid, tile, window)


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name):
    if name not in models:
        models[name] = T.build_tiny_transformer(name)
    return models[name]


def _run(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs)[0]
    return torch.stack(out) if isinstance(out, list) else out  # Z-Image: a list of per-sample latents


@pytest.mark.parametrize("name, grid, method_name, batch", list(_cases()))
def test_sparse_matches_the_masked_reference_at_unusual_grids(models, name, grid, method_name, batch):
    model = _model(models, name)
    valid = [T.TRANSFORMER_TEXT[name], 3] if batch == 2 else None
    kwargs = T.tiny_transformer_inputs(name, model, grid=grid, batch=batch, text_valid=valid)
    method, pattern = (_gna if method_name == "gna" else _tile)(grid)
    dense = _run(model, kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dit_accel.DitAccelWarning)  # fit=True notes the clamped kernel
        with dit_accel.apply(model, method, backend="torch") as handle:
            out = _run(model, kwargs)
            rows, layers = handle.stats(), set(handle.layers)
    others = [m for n, m in model.named_modules() if hasattr(m, "processor") and n not in layers]
    with ReferenceAttention(pattern, PRESETS[type(model).__name__].text_position, text_only=others) as ref_mode:
        ref = _run(model, kwargs)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    if pattern.all():  # one token: nothing to skip, and the run is dense
        assert all(r["sparse_calls"] == 0 for r in rows)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
        return
    assert ref_mode.calls == sum(r["sparse_calls"] for r in rows) > 0
    assert (out - dense).abs().max() > 1e-3


def test_allegro_refuses_a_one_token_latent_with_the_size_to_give(models):
    """Diffusers' Allegro squeezes the token axis of a 1-token sequence away and failed in its attention processor
    with a bare "not enough values to unpack" under every method: the preset's grid reader says so first."""
    model = _model(models, "allegro")
    kwargs = T.tiny_transformer_inputs("allegro", model, grid=(1, 1, 1))
    for method in (dit_accel.Dense(), dit_accel.Tile(tile=(2, 2, 2), window=(1, 1, 1))):
        with dit_accel.apply(model, method, backend="torch"):
            with pytest.raises(ValueError, match=r"Allegro latent of shape \(1, 4, 1, 2, 2\) is one token .*give a "
                                                 r"latent of at least 2 tokens \(height or width 4 or more\)"):
                _run(model, kwargs)
    two = T.tiny_transformer_inputs("allegro", model, grid=(1, 1, 2))  # two tokens run as before
    plain = _run(model, two)
    with dit_accel.apply(model, dit_accel.Dense(), backend="torch"):
        assert torch.equal(_run(model, two), plain)


@pytest.fixture(scope="module")
def cogvideox15():
    """Tiny CogVideoX 1.5: the tiny CogVideoX config with a frame patch (``patch_size_t=2``) and rotary positions
    (none passed: the pipeline computes them)."""
    import diffusers

    config = dict(T.TRANSFORMERS["cogvideox"].config, patch_size_t=2, use_rotary_positional_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = diffusers.CogVideoXTransformer3DModel(**config).eval()
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.data.normal_(0, 0.05)
    return model


def _cogvideox_inputs(frames):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, frames, 4, 10, 14, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 8, 16, generator=g), return_dict=False)


def test_cogvideox15_frame_patch_reads_the_grid_and_refuses_frames_it_cannot_patch(cogvideox15):
    """CogVideoX 1.5 patches 2 latent frames into one token: 6 frames are grid (3, 5, 7). An odd frame count was
    floored (3 frames read as 1) and refused for the GNA kernel rather than for the frames; the model cannot
    patchify it at all (a bare reshape error, dense too)."""
    model, method = cogvideox15, dit_accel.GNA(kernel_size=(2, 3, 3))
    kwargs = _cogvideox_inputs(6)
    dense = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        assert handle.plans and {key[1] for key in handle.plans} == {(3, 5, 7)}
    with ReferenceAttention(gna_mask((3, 5, 7), method.kernel_size), "first"):
        ref = _run(model, kwargs)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    for method in (method, dit_accel.Tile(tile=(2, 2, 2), window=(1, 1, 1))):
        with dit_accel.apply(model, method, backend="torch"):
            with pytest.raises(ValueError, match=r"latent frames 3 is not a multiple of the patch size 2, .*make the "
                                                 r"latent frames a multiple of 2"):
                _run(model, _cogvideox_inputs(3))
    assert torch.equal(_run(model, kwargs), dense)
