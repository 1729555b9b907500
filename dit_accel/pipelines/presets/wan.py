"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): latent (B, C, F, H, W), patch (pt, ph, pw) = (1, 2, 2),
token grid (F/pt, H/ph, W/pw); self-attention ``blocks.*.attn1`` over video only."""

from __future__ import annotations

from ._common import (
    RADIAL_REPO,
    WAN_DEFAULTS,
    Preset,
    Published,
    latent_grid_3d,
    shapes_key,
)

__all__ = ["PRESETS"]


def _family(pipe_or_transformer) -> str:
    """Wan pipelines with a second expert (``transformer_2``, Wan 2.2 A14B) and Wan transformers with
    48 latent channels (Wan 2.2 TI2V-5B) are ``"Wan 2.2"``, other Wan models ``"Wan 2.1"`` (a bare
    A14B expert looks like Wan 2.1: pass ``family=`` to ``recommended`` for it)."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    config = getattr(transformer, "config", None)
    second = getattr(pipe_or_transformer, "transformer_2", None) is not None
    return "Wan 2.2" if second or getattr(config, "in_channels", None) == 48 else "Wan 2.1"


def _index_family(index: dict) -> str:
    """The same from ``model_index.json``: a second expert or ``expand_timesteps`` (TI2V-5B) is Wan 2.2."""
    second = isinstance(index.get("transformer_2"), list) and index["transformer_2"][1] is not None
    return "Wan 2.2" if second or index.get("expand_timesteps") else "Wan 2.1"


_PUBLISHED = (
    Published("Wan 2.1", "radial", {"decay": 0.2, "block_size": 128, "sink_frames": (0,), "rule": "reference"},
              {"dense_steps": 12, "dense_layers": 1}, "768x1280, 69 frames, 50 steps (Wan2.1-T2V-14B)", (18, 48, 80),
              f"{RADIAL_REPO} scripts/wan_t2v_inference.sh; block 128 and frame-0 sink: "
              "radial_attn/models/wan/attention.py, radial_attn/attn_mask.py"),
    Published("Wan 2.2", "radial", {"decay": 0.8, "block_size": 64, "sink_frames": (0,), "rule": "reference"},
              {"dense_steps": 11, "dense_layers": 1}, "768x1280, 77 frames, 40 steps (Wan2.2-T2V-A14B)", (20, 48, 80),
              f"{RADIAL_REPO} scripts/wan_22_t2v_inference.sh; block 64: radial_attn/models/wan2_2/attention.py"),
    Published("Wan 2.1", "sla", {"topk": 0.05}, {}, "480p, 81 frames (Wan2.1-T2V-1.3B, after fine-tuning)",
              (21, 30, 52), "SLA paper (Zhang et al., arXiv:2509.24006): 95% sparsity on Wan2.1-T2V-1.3B"),
    Published("Wan 2.1", "sla", {"topk": 0.1, "block_q": 128, "block_k": 64, "linear_tokens": "all",
                                 "rounding": "floor", "linear_eps": 1e-5},
              {}, "480p, 81 frames, 4 steps (TurboWan2.1-T2V-1.3B-480P checkpoints; `dit-accel convert`)",
              (21, 30, 52), "thu-ml/TurboDiffusion@fcf81c9 README (--sla_topk 0.1 default, 0.15 recommended), "
              "turbodiffusion/inference/modify_model.py (sla: BLKQ=128, BLKK=64), turbodiffusion/SLA/core.py"),
)

PRESETS = (
    Preset(
        "WanTransformer3DModel",
        attention=(r"blocks\.\d+\.attn1",),  # attn2 is cross-attention: stays dense
        text_position="none",
        grid_dims=3,
        read_grid=latent_grid_3d,
        grid_key=shapes_key,
        min_diffusers="0.35.0",
        defaults=dict(WAN_DEFAULTS),  # radial: see published (SLA too, for Wan 2.1)
        notes="Wan 2.1 / 2.2 T2V and I2V; self-attention blocks.*.attn1 (video only)",
        published=_PUBLISHED,
        # "wan2.2" before "wan"; "wan" then a digit, a separator, "video" or "x" (FastWan2.1, WanVideo, Wanx), not
        # another word ("wangfuyun/AnimateLCM", a U-Net)
        hub_words=((r"wan-?2[._]?2", "Wan 2.2"), (r"wan(?=[\W_\d]|video|x|$)", "Wan 2.1")),
        read_family=_family,
        read_index_family=_index_family,
    ),
)
