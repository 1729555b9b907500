"""`ModelIO.encode_video` (finetune's data mode) against the tiny-shapes pixel codec's exact encoding.

Wan's encoder reads 1 + 4k frames; the tiny-shapes codec halves time, so a 63-frame clip (1 + 2 x 31) must give
32 latent frames, the token grid `generate` and the shipped plans use, not the 31 of its first 61 frames."""

from types import SimpleNamespace

import pytest
import torch

from dit_accel.models.clips import render_batch
from dit_accel.models.train_tiny import build_pixel_codec, pack_latents
from dit_accel.training.model_io import ModelIO


@pytest.mark.parametrize("frames", [7, 9, 63])
def test_encode_video_keeps_every_latent_frame(frames):
    vae = build_pixel_codec([0.0] * 6, [1.0] * 6)
    io = ModelIO(SimpleNamespace(vae=vae, vae_scale_factor_temporal=2, vae_scale_factor_spatial=2))
    g = torch.Generator().manual_seed(frames)
    clips = render_batch(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([3, 1]), generator=g,
                         frames=frames, height=16, width=16)
    with torch.no_grad():
        got = io.encode_video(clips.permute(0, 4, 1, 2, 3) * 2 - 1)
    want = pack_latents(clips)
    assert got.shape == want.shape == (2, 6, (frames + 1) // 2, 8, 8)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
