"""DreamLite (``DreamLiteTransformer2DModel``): the spatial transformer of the DreamLite U-Net, called on a feature
map (B, C, H, W) that it flattens row-major (``_operate_on_continuous_inputs``): grid (H, W) in raster order, every
token an image token. Each block's ``transformer_blocks.*.attn1`` is self-attention over that grid (no text); the
text reaches it by cross-attention (``attn2``, dense). The U-Net builds it with ``use_self_attention=False`` in its
"no self-attention" blocks (no ``attn1``: nothing to make sparse) and sets ``DreamLiteAttnProcessor2_0`` (keys and
values repeated to the query heads before SDPA). The edit pipelines concatenate the input image's latents beside the
noise along the width, so an edit call's map is one (H, 2W) grid of both.

The pipelines (``DreamLitePipeline``, ``DreamLiteMobilePipeline``) hold these modules inside ``unet``, called once per
U-Net call at the resolution of their level: ``apply`` takes each module, not the pipeline."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, shapes_key, tensor_arg

__all__ = ["PRESETS"]

_PIPELINE_REASON = (
    "its DreamLiteTransformer2DModel modules sit inside its U-Net (pipe.unet), at several resolutions, and the "
    "pipeline has no `transformer` for dit_accel to wrap; apply dit_accel to each DreamLiteTransformer2DModel of "
    "pipe.unet that has self-attention (config.use_self_attention), with scheduler=pipe.scheduler")


def _grid(model, args) -> GridInfo:
    if model.config.only_cross_attention:
        raise ValueError("dit_accel: this DreamLiteTransformer2DModel has only_cross_attention=True: its attn1 "
                         "attends to the text, so it has no self-attention over the image to make sparse; use it dense")
    x = tensor_arg(args, "hidden_states")
    if x.dim() != 4:
        raise ValueError(f"dit_accel: DreamLite hidden_states of shape {tuple(x.shape)} is not a (B, C, H, W) feature "
                         "map; use the dense model")
    return GridInfo((int(x.shape[-2]), int(x.shape[-1])), 0)


PRESETS = (
    Preset(
        "DreamLiteTransformer2DModel",
        attention=(r"transformer_blocks\.\d+\.attn1",),
        text_position="none",
        grid_dims=2,
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        # dit_accel defaults (as FLUX.1): no published setting for DreamLite. Its self-attention runs at the U-Net's
        # deepest levels (32x32 at 1024 px), where the image defaults cover most or all of the grid.
        defaults=dict(IMAGE_DEFAULTS),
        notes="DreamLite U-Net's spatial transformer; self-attention over the feature map's 2-D grid (H, W); text "
              "cross-attention dense; apply to each module of pipe.unet (the pipelines are refused with how)",
        refused_pipelines={"DreamLitePipeline": _PIPELINE_REASON, "DreamLiteMobilePipeline": _PIPELINE_REASON},
        hub_words=((r"dreamlite", None),),  # carlofkl/DreamLite-base, carlofkl/DreamLite-mobile
    ),
)
