"""Tiny Wan Animate: the bare ``"wan_animate"`` transformer. Its call carries the leading reference frame (as
WanAnimatePipeline builds it) before the token grid, pose latents for the frames after it, and a face video of
``4 T - 3`` frames of 4x4 pixels (the face encoder's two stride-2 convolutions bring it to the ``T`` grid frames,
plus its leading padding frame for the reference)."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    x = rnd(batch, cfg.in_channels, (1 + f) * pt, h * ph, w * pw)  # reference frame + T frames
    pose = rnd(batch, cfg.latent_channels, f * pt, h * ph, w * pw)
    face = rnd(batch, 3, 4 * f - 3, cfg.motion_encoder_size, cfg.motion_encoder_size)
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=rnd(batch, text, cfg.text_dim),
                pose_hidden_states=pose, face_pixel_values=face, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "wan_animate", "WanAnimateTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12, latent_channels=4,
             out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, image_dim=None, rope_max_seq_len=64,
             motion_encoder_channel_sizes={"4": 8}, motion_encoder_size=4, motion_style_dim=8, motion_dim=4,
             motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2,
             inject_face_latents_blocks=1, motion_encoder_batch_size=8),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
