"""HunyuanImage 2.1 (``HunyuanImageTransformer2DModel``): latent (B, C, H, W) (or the refiner's (B, C, 1, H, W)
under a 3-D patch: one frame, read as the image's (H, W) grid), patch ``config.patch_size`` per axis; joint
attention [image, text] (text last, padded-text key mask) in the double- and single-stream blocks. The text is
``encoder_hidden_states`` plus, when given, ``encoder_hidden_states_2`` (the glyph encoder's tokens); the token
refiner (text only) is left alone."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, split_patch, tensor_arg, text_len

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, C, H, W) or (B, C, F, H, W)
    patch = tuple(model.config.patch_size)
    sizes = tuple(x.shape[2:])
    if len(sizes) != len(patch):
        raise ValueError(f"dit_accel: HunyuanImage latent {tuple(x.shape)} does not match patch_size {patch}")
    names = ("frames", "height", "width")[-len(sizes):]
    grid = tuple(split_patch(n, p, what) for n, p, what in zip(sizes, patch, names))
    if len(grid) == 3:  # the refiner's (1, 1, 1) patch over (B, C, 1, H, W): one frame, the (H, W) raster
        if grid[0] != 1:
            raise ValueError(f"dit_accel: this HunyuanImage call's latent {tuple(x.shape)} holds {grid[0]} latent "
                             "frames after the patch, not one image grid; use the dense model")
        grid = grid[1:]
    second = args.get("encoder_hidden_states_2")
    extra = int(second.shape[1]) if getattr(model, "context_embedder_2", None) is not None and second is not None else 0
    return GridInfo(grid, text_len(args) + extra)


def _key(args):
    x, t1, t2 = (args.get(k) for k in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_2"))
    return tuple(None if v is None else tuple(v.shape) for v in (x, t1, t2))


PRESETS = (
    Preset(
        "HunyuanImageTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        text_position="last",
        grid_dims=2,
        read_grid=_grid,
        grid_key=_key,
        min_diffusers="0.42.1",
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults: no published setting for HunyuanImage
        notes="HunyuanImage 2.1; joint attention [image, text] with padded-text key mask, 2-D grid (H, W)",
        hub_words=((r"hunyuan-?image", None),),
    ),
)
