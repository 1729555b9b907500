"""Tiny AuraFlow (``AuraFlowTransformer2DModel``): the bare ``"auraflow"`` transformer, image grid (10, 13) after the
2x2 patch; joint [8 register tokens + text, image]."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

GRID = (10, 13)


def _auraflow(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w),
                encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim), timestep=t / 1000, return_dict=False)


def _louder_attention(model) -> None:
    # AuraFlow's small random adaLN gates leave attention a 1e-4 share of the tiny model's output: louder
    # attention outputs, so a sparse pattern shows in the result.
    for name, module in model.named_modules():
        if name.endswith(".attn"):
            module.to_out[0].weight.mul_(30)
            if getattr(module, "to_add_out", None) is not None:
                module.to_add_out.weight.mul_(30)


TRANSFORMERS = (
    TinyTransformer(
        "auraflow", "AuraFlowTransformer2DModel",
        dict(sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=32,
             out_channels=4, pos_embed_max_size=256),
        grid=GRID, text=7, inputs=_auraflow, tune=_louder_attention,
    ),
)
