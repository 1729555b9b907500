"""LTX-Video guides on ComfyUI's ``LTXVModel``: ``LTXVAddGuide`` appends each guide's first latent frames (at most its
``NUM_PREFIX_FRAMES``, 2) after the latent's frames and adds their positions to ``keyframe_idxs`` ``(B, 3, tokens)``,
which the model puts on the last ``tokens`` tokens: [video, guide frames]. The guide tokens keep exact rows and
columns, as dit_accel's Diffusers path runs ``LTXConditionPipeline``'s conditioning frames, and the video's pairs
follow the pattern on the guide-free grid: Dense through the node is ComfyUI's own output bit for bit; Tile and GNA
equal a masked-dense reference, with every self-attention call of every model call on the sparse path. Plain LTXV
calls hold the video alone, as before. The guides are built as ``LTXVAddGuide`` builds them, with ComfyUI's own
patchifier and ``latent_to_pixel_coords`` (the node itself needs a VAE)."""

import importlib
import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.families import family_for
from dit_accel.patterns.gna import gna_mask
from dit_accel.patterns.tile import tile_mask

from tests.comfyui.models import CASES, COMMON_WIDGETS, masked_reference, sample, with_override

STEPS = 2  # model calls per sample at cfg 1
LAYERS = 2  # transformer_blocks.*.attn1 of the tiny LTXV
GRID = (3, 4, 4)  # the video's latent (1, 128, 3, 4, 4), patch 1 x 1 x 1: 48 tokens
FRAME = 16  # tokens per latent frame
SCALE = (8, 32, 32)  # LTX-Video's VAE: vae.downscale_index_formula
PATTERNS = {
    "tile": (dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), tile_mask(GRID, (1, 2, 2), (3, 1, 1))),
    "gna": (dit_accel.GNA(kernel_size=(2, 3, 3), stride=(1, 1, 2)), gna_mask(GRID, (2, 3, 3), (1, 1, 2))),
}
# name: the guides in LTXVAddGuide call order, each (pixel frame_idx, latent frames it appends)
GUIDES = {
    "one-guide": ((0, 2),),  # a video guide at the start: its first NUM_PREFIX_FRAMES = 2 latent frames appended
    "two-guides": ((0, 1), (16, 1)),  # an image at frame 0, then one at pixel frame 16 (the last latent frame)
}


def _keyframe_idxs(frame_idx, guide):
    """``LTXVAddGuide.add_keyframe_index``'s positions of one appended guide latent, from ComfyUI's own functions."""
    # (ComfyUI is the snapshot the `comfy` fixture put on sys.path, not a package the test extra installs)
    patchifier = importlib.import_module("comfy.ldm.lightricks.symmetric_patchifier")

    _, coords = patchifier.SymmetricPatchifier(1).patchify(guide)
    pixels = patchifier.latent_to_pixel_coords(coords, SCALE, causal_fix=frame_idx == 0)
    pixels[:, 0] += frame_idx
    return pixels


def _guided(name):
    """``(latent, noise mask, keyframe_idxs)`` after the guides of ``name`` (strength 1): the guide latents appended
    after the video's frames, their noise mask 0, their positions concatenated in call order."""
    g = torch.Generator().manual_seed(60)
    latent, mask, idxs = torch.zeros(1, 128, *GRID), torch.ones(1, 1, GRID[0], 1, 1), []
    for frame_idx, frames in GUIDES[name]:
        guide = torch.randn(1, 128, frames, *GRID[1:], generator=g)
        idxs.append(_keyframe_idxs(frame_idx, guide))
        latent = torch.cat([latent, guide], dim=2)
        mask = torch.cat([mask, torch.zeros(1, 1, frames, 1, 1)], dim=2)
    return latent, mask, torch.cat(idxs, dim=2)


def _guide_tokens(name):
    return sum(frames for _, frames in GUIDES[name]) * FRAME


def _run(comfy, patcher, name):
    """A sample (cfg 1: one model call per step) with the guides on both conditionings, as LTXVAddGuide sets them."""
    latent, mask, idxs = _guided(name)
    cond = [[c, dict(extra, keyframe_idxs=idxs)] for c, extra in CASES["ltx-video"].cond()]
    negative = [[torch.flip(c, dims=(1,)), dict(extra)] for c, extra in cond]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    return comfy.sample.sample(patcher, noise, STEPS, 1.0, "euler", "simple", cond, negative, latent, noise_mask=mask,
                               seed=0, disable_pbar=True)


def _allowed(name, pattern_mask):
    """The allowed pairs of [video, guide tokens]: the pattern on the video grid, every pair with a guide token."""
    n, guides = pattern_mask.shape[-1], _guide_tokens(name)
    allowed = torch.ones(n + guides, n + guides, dtype=torch.bool)
    allowed[:n, :n] = pattern_mask
    return allowed


@pytest.mark.parametrize("name", list(GUIDES))
def test_dense_through_the_node_is_comfyuis_own_output(comfy, models, name):
    model = models("ltx-video")
    patched = NODE_CLASS_MAPPINGS["DitAccelDense"]().patch(model, **COMMON_WIDGETS)[0]
    assert torch.equal(_run(comfy, patched, name), _run(comfy, model, name))


@pytest.mark.parametrize("name, pattern", [(n, p) for n in GUIDES for p in PATTERNS])
def test_the_guide_tokens_run_exact_and_the_video_follows_the_pattern(comfy, models, sparse_calls, name, pattern):
    model = models("ltx-video")
    method, mask = PATTERNS[pattern]
    assert not mask.all()  # a real pattern on this grid, not dense
    reference_calls = []
    reference = _run(comfy, with_override(model, masked_reference(_allowed(name, mask), "last", reference_calls)),
                     name)
    out = _run(comfy, patch_model(model, method, backend="torch"), name)
    assert sparse_calls == reference_calls == [48 + _guide_tokens(name)] * LAYERS * STEPS  # every call, sparse
    assert (out - _run(comfy, model, name)).abs().max() > 1e-3  # the pattern changes the result ...
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # ... exactly as the reference does


@pytest.mark.parametrize("name", list(GUIDES))
def test_the_guide_tokens_are_counted_per_call_and_logged(comfy, models, caplog, name):
    inner = models("ltx-video").model.diffusion_model
    family = family_for(inner)
    assert family.name == "LTX-Video" and family.text_position == "last"
    latent, _, idxs = _guided(name)
    assert family.grid(inner, latent, {"keyframe_idxs": idxs}) == GRID  # the latent's frames less the guides'
    assert family.off_grid(inner, latent, {"keyframe_idxs": idxs}, GRID) == _guide_tokens(name)
    video = torch.zeros(1, 128, *GRID)
    assert family.grid(inner, video, {"keyframe_idxs": None}) == GRID
    assert family.off_grid(inner, video, {}, GRID) == 0
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        _run(comfy, patch_model(models("ltx-video"), PATTERNS["tile"][0], backend="torch"), name)
    assert f"LTXVModel grid {GRID} step 0/2: {LAYERS} layers sparse" in caplog.text
    assert "does not match the token grid" not in caplog.text


def test_guides_that_are_not_whole_frames_before_a_video_frame_are_refused(models):
    inner = models("ltx-video").model.diffusion_model
    family, latent = family_for(inner), torch.zeros(1, 128, 5, 4, 4)
    with pytest.raises(ValueError, match="not whole frames"):
        family.grid(inner, latent, {"keyframe_idxs": torch.zeros(1, 3, 24)})
    with pytest.raises(ValueError, match="not whole frames"):
        family.grid(inner, latent, {"keyframe_idxs": torch.zeros(1, 3, 5 * FRAME)})


def test_plain_calls_are_the_video_alone_as_before(comfy, models, sparse_calls):
    case, model = CASES["ltx-video"], models("ltx-video")
    method, mask = PATTERNS["tile"]
    reference_calls = []
    reference = sample(comfy, with_override(model, masked_reference(mask, "none", reference_calls)), case)
    out = sample(comfy, patch_model(model, method, backend="torch"), case)
    assert sparse_calls == reference_calls == [48] * LAYERS * STEPS
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
