"""Tiny Bria FIBO 2 (``BriaFibo2Transformer2DModel``): the bare ``"bria_fibo2"`` transformer, latent (B, 4, 20, 26) with
the 2x2 patch (grid (10, 13)), 1 noise-refiner and 2 main blocks (the second an injection block), a 1-layer
Perceiver; gist counts 4-8 in steps of 4 over text lengths 2-10, so the 7 text tokens give 8 gist tokens. A padded
prompt (``text_valid``) passes the bool text mask, as the pipeline does."""

from __future__ import annotations

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS"]


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    h, w = grid
    p = cfg.patch_size
    kwargs = dict(hidden_states=rnd(batch, cfg.in_channels, p * h, p * w), timestep=t / 1000,
                  encoder_hidden_states=rnd(batch, 1 + len(cfg.injection_layer_ids), text, cfg.cap_feat_dim),
                  return_dict=False)
    if not mask.all():  # as the pipeline: a mask only where a prompt is padded
        kwargs["encoder_attention_mask"] = mask.bool()
    return kwargs


TRANSFORMERS = (
    TinyTransformer(
        "bria_fibo2", "BriaFibo2Transformer2DModel",
        dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
             injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
             gist_step=4, gist_min_text_len=2, gist_max_text_len=10, axes_dims=(4, 6, 6), axes_lens=(16, 32, 32)),
        grid=(10, 13), text=7, inputs=_inputs,
    ),
)
