"""Tiny LTX-2: the bare ``"ltx2"`` audio-video transformer, called as LTX2Pipeline calls it (packed video
latents, the grid in num_frames/height/width and ``video_coords`` from the model's own rope, 10 audio latents)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

AUDIO_FRAMES = 10


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoRotaryPosEmbed

    rope = LTX2AudioVideoRotaryPosEmbed(cfg.num_attention_heads * cfg.attention_head_dim, cfg.patch_size,
                                        cfg.patch_size_t, scale_factors=cfg.vae_scale_factors)
    coords = rope.prepare_video_coords(batch, f * cfg.patch_size_t, h * cfg.patch_size, w * cfg.patch_size, "cpu")
    return dict(hidden_states=rnd(batch, f * h * w, cfg.in_channels),
                audio_hidden_states=rnd(batch, AUDIO_FRAMES, cfg.audio_in_channels),
                encoder_hidden_states=rnd(batch, text, cfg.caption_channels),
                audio_encoder_hidden_states=rnd(batch, text, cfg.caption_channels), timestep=t,
                encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
                num_frames=f * cfg.patch_size_t, height=h * cfg.patch_size, width=w * cfg.patch_size,
                audio_num_frames=AUDIO_FRAMES, video_coords=coords, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "ltx2", "LTX2VideoTransformer3DModel",
        dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
             cross_attention_dim=24, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
             audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
