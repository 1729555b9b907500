"""Tiny Wan VACE: the bare ``"wan_vace"`` transformer. Its call carries one leading reference frame (as the
VACE pipeline builds it: zero reactive latent and mask in the control stream) before the token grid.

tiny-wan-vace: tiny-wan's tokenizer, UMT5 encoder and VAE with a 2-layer WanVACETransformer3DModel (one VACE
block); called with a prompt only (no video, mask or reference image) it is text-to-video, 17 frames at
128x128 -> token grid (5, 8, 8). Its control input is the VAE latent of the (zero) video twice (inactive and
reactive parts) and the 8x8 mask folded into 64 channels: ``vace_in_channels`` = 2 * 4 + 64.
"""

from __future__ import annotations

from ._common import (TINY_WAN_CALL, TINY_WAN_METHODS, TINY_WAN_TRANSFORMER, WAN_Z_DIM, TinyPipeline, TinyTransformer,
                      tiny_wan_parts)

__all__ = ["TRANSFORMERS", "PIPELINES"]


def _build(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel

    parts = tiny_wan_parts(seed)
    transformer = WanVACETransformer3DModel(**TINY_WAN_TRANSFORMER, vace_layers=[0],
                                            vace_in_channels=2 * WAN_Z_DIM + 8 * 8).eval()
    return WanVACEPipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    refs = pt  # one reference frame of tokens
    x = rnd(batch, cfg.in_channels, refs + f * pt, h * ph, w * pw)
    control = rnd(batch, cfg.vace_in_channels, refs + f * pt, h * ph, w * pw)
    control[:, cfg.in_channels:, :refs] = 0  # a reference frame: zero reactive latent and mask
    return dict(hidden_states=x, timestep=t, encoder_hidden_states=rnd(batch, text, cfg.text_dim),
                control_hidden_states=control, return_dict=False)


PIPELINES = (
    TinyPipeline(
        "tiny-wan-vace",
        summary="WanVACEPipeline with a 2-layer WanVACETransformer3DModel (one VACE block) and tiny-wan's VAE "
        "and UMT5 encoder; text-to-video; random weights for smoke runs (offline)",
        build=_build,
        defaults=TINY_WAN_CALL,
        method_defaults=TINY_WAN_METHODS,
        requires=("ftfy",),
    ),
)

TRANSFORMERS = (
    TinyTransformer(
        "wan_vace", "WanVACETransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64, vace_layers=[0],
             vace_in_channels=12),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
