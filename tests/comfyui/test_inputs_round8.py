"""Inputs of the newer families that the earlier tests did not sample, checked against the masked-dense reference on
ComfyUI's own classes (no fault found in them; kept so that a change to the token counting shows): HiDream E1's
condition image beside the latent, VACE with two control contexts (each control block runs once per context), and
Qwen-Image-Edit with references that are not whole patches, at batch 2 and cfg 2."""

import torch

import dit_accel
from dit_accel.comfyui import patch_model
from dit_accel.patterns.tile import tile_mask

from tests.comfyui.models import MORE_CASES, build, masked_reference, with_override

TILE_2D = (dit_accel.Tile(tile=(2, 2), window=(1, 1)), ((2, 2), (1, 1)))
TILE_3D = (dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), ((1, 2, 2), (3, 1, 1)))


def _sample(comfy, model, cond, latent, cfg=2.0):
    negative = [[torch.flip(c, dims=(1,)), dict(extra)] for c, extra in cond]
    noise = torch.randn(latent, generator=torch.Generator().manual_seed(5))
    return comfy.sample.sample(model, noise, 2, cfg, "euler", "simple", cond, negative, torch.zeros(latent), seed=0,
                               disable_pbar=True)


def _compare(comfy, model, cond, latent, method, allowed, text, sparse_calls):
    reference = _sample(comfy, with_override(model, masked_reference(allowed, text)), cond, latent)
    out = _sample(comfy, patch_model(model, method, backend="torch"), cond, latent)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    return list(sparse_calls)


def test_hidream_e1s_condition_image_widens_the_grid(comfy, sparse_calls):
    """``concat_latent_image`` becomes ``image_cond``, concatenated on the width: one (4, 10) grid, then the text."""
    case = MORE_CASES["hidream"]
    cond = case.cond()
    cond[0][1]["concat_latent_image"] = torch.randn(1, 16, 8, 10, generator=torch.Generator().manual_seed(3))
    method, (tile, window) = TILE_2D
    calls = _compare(comfy, build(comfy, case), cond, case.latent, method, tile_mask((4, 10), tile, window), "last",
                     sparse_calls)
    assert calls == [40 + 13] * 2 * 2  # 2 layers, 2 steps, cond and uncond batched


def test_vace_with_two_control_contexts(comfy, sparse_calls):
    """Two WanVaceToVideo contexts, both with the reference frame: the control block runs once per context."""
    case = MORE_CASES["wan21-vace"]
    cond = case.cond()
    extra = cond[0][1]
    second = extra["vace_frames"][0].clone()
    second[:, :16] *= 0.5  # another control video, the same reference layout
    extra.update(vace_frames=[extra["vace_frames"][0], second], vace_mask=extra["vace_mask"] * 2,
                 vace_strength=[1.0, 0.5])
    method, (tile, window) = TILE_3D
    calls = _compare(comfy, build(comfy, case), cond, case.latent, method, tile_mask((3, 4, 4), tile, window), "first",
                     sparse_calls)
    assert calls == [64] * (2 + 2) * 2  # 2 main blocks + the control block twice, 2 steps


def test_qwen_image_edit_references_off_whole_patches_at_batch_two(comfy, sparse_calls):
    """References of 7 x 9 and 12 x 14 latents: padded to 4 x 5 and 6 x 7 patches (62 tokens) after the image."""
    case = MORE_CASES["qwen-image"]
    g = torch.Generator().manual_seed(4)
    cond = case.cond()
    cond[0][1]["reference_latents"] = [torch.randn(1, 16, 1, 7, 9, generator=g), torch.randn(1, 16, 1, 12, 14, generator=g)]
    method, (tile, window) = TILE_2D
    allowed = torch.ones(20 + 62, 20 + 62, dtype=torch.bool)
    allowed[:20, :20] = tile_mask((4, 5), tile, window)
    calls = _compare(comfy, build(comfy, case), cond, (2, 16, 1, 8, 10), method, allowed, "first", sparse_calls)
    assert calls == [6 + 20 + 62] * 2 * 2
