"""FLUX.1 (``FluxTransformer2DModel``): latents packed (B, N, C) in 2x2 patches; the image grid is the
rows x cols of ``img_ids``; joint attention [text, image] over a 2-D grid (H, W)."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, tensor_arg, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, N, C) packed 2x2 latent patches
    ids = tensor_arg(args, "img_ids")
    ids = ids[0] if ids.dim() == 3 else ids  # (N, 3): (index, row, col)
    rows, cols = ids[:, 1], ids[:, 2]
    # One host sync per transformer call (not per attention call) to size the grid.
    h = int(rows.max() - rows.min()) + 1
    w = int(cols.max() - cols.min()) + 1
    if h * w != x.shape[1] or ids.shape[0] != x.shape[1] or bool((ids[:, 0] != ids[0, 0]).any()):
        raise ValueError(f"dit_accel: FLUX img_ids do not form a single {h}x{w} raster grid of {x.shape[1]} tokens "
                         "(reference-image conditioning such as Kontext is not supported); use the dense model")
    return GridInfo((h, w), text_len(args))


PRESETS = (
    Preset(
        "FluxTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.35.0",
        defaults=dict(IMAGE_DEFAULTS),
        notes="FLUX.1 image model; joint attention [text, image], 2-D grid (H, W)",
        hub_words=((r"flux", None),),
    ),
)
