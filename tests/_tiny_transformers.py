"""Tiny bare transformers of every supported class, built from configs with a fixed seed.

``build(name)`` returns an fp32 eval-mode transformer with random weights;
``inputs(name, model, grid=..., batch=..., text=...)`` returns forward kwargs
whose latent gives that token grid after patchify. Small on purpose: a forward
pass takes milliseconds on a CPU.
"""

from __future__ import annotations

import torch

NAMES = ("wan", "hunyuan", "cogvideox", "mochi", "ltx", "flux")

# Default token grids: big enough that 64-token blocks and small windows skip work.
GRIDS = {
    "wan": (4, 8, 8),
    "hunyuan": (4, 8, 8),
    "cogvideox": (4, 8, 8),
    "mochi": (4, 8, 8),
    "ltx": (4, 8, 8),
    "flux": (10, 13),
}

CONFIGS = {
    "wan": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64)),
    "hunyuan": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))),
    "cogvideox": ("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=12, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8)),
    "mochi": ("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=8)),
    "ltx": ("LTXVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
        cross_attention_dim=24, num_layers=2, caption_channels=16)),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))),
}

TEXT = {"wan": 7, "hunyuan": 6, "cogvideox": 8, "mochi": 8, "ltx": 7, "flux": 7}


def build(name: str, seed: int = 0):
    import diffusers

    cls_name, config = CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, cls_name)(**config)
        # Random (not zero-initialised) output layers so every block affects the result.
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.data.normal_(0, 0.05)
    return model.eval()


def inputs(name: str, model, grid=None, batch: int = 1, text: int = None, seed: int = 1, text_valid=None):
    """Forward kwargs for ``model`` whose latent has token grid ``grid``.

    ``text_valid``: per-sample valid text lengths (HunyuanVideo/Mochi padding masks).
    """
    grid = tuple(grid or GRIDS[name])
    text = text or TEXT[name]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    cfg = model.config
    t = torch.full((batch,), 500.0)
    mask = torch.ones(batch, text, dtype=torch.long)
    if text_valid is not None:
        for b, n in enumerate(text_valid):
            mask[b, n:] = 0
    if name == "wan":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, cfg.in_channels, f, 2 * h, 2 * w), timestep=t,
                    encoder_hidden_states=rnd(batch, text, cfg.text_dim), return_dict=False)
    if name == "hunyuan":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, cfg.in_channels, f, 2 * h, 2 * w), timestep=t,
                    encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), encoder_attention_mask=mask,
                    pooled_projections=rnd(batch, cfg.pooled_projection_dim), return_dict=False)
    if name == "cogvideox":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, f, cfg.in_channels, 2 * h, 2 * w), timestep=t.long(),
                    encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), return_dict=False)
    if name == "mochi":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, cfg.in_channels, f, 2 * h, 2 * w), timestep=t,
                    encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), encoder_attention_mask=mask,
                    return_dict=False)
    if name == "ltx":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, f * h * w, cfg.in_channels), timestep=t,
                    encoder_hidden_states=rnd(batch, text, cfg.caption_channels),
                    encoder_attention_mask=mask, num_frames=f, height=h, width=w, return_dict=False)
    if name == "flux":
        h, w = grid
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
        return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                    encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim),
                    pooled_projections=rnd(batch, cfg.pooled_projection_dim), img_ids=img_ids,
                    txt_ids=torch.zeros(text, 3), return_dict=False)
    raise KeyError(name)
