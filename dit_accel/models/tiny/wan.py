"""Tiny Wan: the ``tiny-wan`` pipeline and the bare ``"wan"`` transformer.

tiny-wan: 17 frames at 128x128 -> latent (5, 16, 16) (VAE 4x temporal, 8x spatial) -> token grid
(5, 8, 8) = 320 video tokens after the (1, 2, 2) patch.
"""

from __future__ import annotations

from ._common import (TINY_WAN_CALL, TINY_WAN_METHODS, TINY_WAN_TRANSFORMER, TinyPipeline, TinyTransformer,
                      tiny_wan_parts)

__all__ = ["TRANSFORMERS", "PIPELINES"]


def _build(seed: int):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    parts = tiny_wan_parts(seed)
    transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER).eval()
    return WanPipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer)


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    return dict(hidden_states=rnd(batch, cfg.in_channels, f, 2 * h, 2 * w), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_dim), return_dict=False)


PIPELINES = (
    TinyPipeline(
        "tiny-wan",
        summary="WanPipeline with a 2-layer WanTransformer3DModel, tiny AutoencoderKLWan and UMT5 "
        "encoder; random weights for smoke runs (offline, seconds on a CPU)",
        build=_build,
        defaults=TINY_WAN_CALL,
        method_defaults=TINY_WAN_METHODS,
    ),
)

TRANSFORMERS = (
    TinyTransformer(
        "wan", "WanTransformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
