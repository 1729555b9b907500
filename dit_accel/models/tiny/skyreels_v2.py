"""Tiny SkyReels-V2: the ``tiny-skyreels-v2`` pipeline and the bare ``"skyreels_v2"`` transformer (Wan layout,
one frame per block).

tiny-skyreels-v2: tiny-wan's tokenizer, UMT5 encoder and VAE with a 2-layer SkyReelsV2Transformer3DModel and
the UniPC flow scheduler of SkyReels-V2's text-to-video pipeline: 17 frames at 128x128 -> token grid (5, 8, 8).
"""

from __future__ import annotations

from ._common import (TINY_WAN_CALL, TINY_WAN_METHODS, TINY_WAN_TRANSFORMER, TinyPipeline, TinyTransformer,
                      tiny_wan_parts)

__all__ = ["TRANSFORMERS", "PIPELINES"]


def _build(seed: int):
    from diffusers import SkyReelsV2Pipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    parts = tiny_wan_parts(seed)
    transformer = SkyReelsV2Transformer3DModel(**TINY_WAN_TRANSFORMER).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    return SkyReelsV2Pipeline(**parts, scheduler=scheduler, transformer=transformer)


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, f * pt, h * ph, w * pw), timestep=t,
                encoder_hidden_states=rnd(batch, text, cfg.text_dim), return_dict=False)


PIPELINES = (
    TinyPipeline(
        "tiny-skyreels-v2",
        summary="SkyReelsV2Pipeline with a 2-layer SkyReelsV2Transformer3DModel and tiny-wan's VAE and UMT5 "
        "encoder; random weights for smoke runs (offline)",
        build=_build,
        defaults=TINY_WAN_CALL,
        method_defaults=TINY_WAN_METHODS,
        requires=("ftfy",),
    ),
)

TRANSFORMERS = (
    TinyTransformer(
        "skyreels_v2", "SkyReelsV2Transformer3DModel",
        dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
             text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)
