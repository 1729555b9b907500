"""Tiny Lumina-Next (``LuminaNextDiT2DModel``): the bare ``"lumina_next"`` transformer, image grid (10, 13) after
the 2x2 patch; the caption by gated cross-attention."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]

GRID = (10, 13)


def _lumina_next(cfg, grid, batch, text, rnd, t, mask):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    h, w = grid
    p = cfg.patch_size
    rotary = get_2d_rotary_pos_embed_lumina(cfg.hidden_size // cfg.num_attention_heads, 64, 64)
    return dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t / 1000,
                encoder_hidden_states=rnd(batch, text, cfg.cross_attention_dim), encoder_mask=mask,
                image_rotary_emb=rotary, cross_attention_kwargs={}, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "lumina_next", "LuminaNextDiT2DModel",
        dict(sample_size=32, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
             num_kv_heads=2, multiple_of=16, norm_eps=1e-5, learn_sigma=False, qk_norm=True, cross_attention_dim=16),
        grid=GRID, text=7, inputs=_lumina_next,
    ),
)
