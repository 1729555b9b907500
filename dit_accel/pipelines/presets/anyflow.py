"""AnyFlow (``AnyFlowTransformer3DModel``, the bidirectional flow-map model) and AnyFlow-FAR (refused).

AnyFlow is Wan 2.1's backbone with a dual (source ``t``, target ``r``) timestep embedding. Its latent comes
frames first, ``(B, F, C, H, W)`` (the model permutes it to ``(B, C, F, H, W)`` before ``patch_embedding``),
patch (pt, ph, pw) = (1, 2, 2); ``flatten(2)`` of the patched latent gives tokens in (T, H, W) raster order
(``AnyFlowTransformer3DModel.forward``), the grid its rotary table is built on (``AnyFlowRotaryPosEmbed``).
Self-attention ``blocks.*.attn1`` (``AnyFlowAttnProcessor``: SDPA, no mask) is over video only; ``attn2`` is text
(and I2V CLIP image) cross-attention and stays dense. ``AnyFlowPipeline``'s conditioning frames are written into
the first latent frames of the same grid (with timestep 0), so they are ordinary frames of it.

AnyFlow-FAR (``AnyFlowFARTransformer3DModel``) is refused: its self-attention never reaches SDPA (see the reason)."""

from __future__ import annotations

from ._common import (
    RADIAL_VIDEO,
    WAN_DEFAULTS,
    GridInfo,
    Preset,
    shapes_key,
    split_patch,
    tensor_arg,
    text_len,
)

__all__ = ["PRESETS"]


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, F, C, H, W): frames before channels
    if x.dim() != 5:
        raise ValueError(f"dit_accel: hidden_states of shape {tuple(x.shape)} is not an AnyFlow (B, F, C, H, W) "
                         "video latent")
    pt, ph, pw = tuple(model.config.patch_size)
    grid = (split_patch(x.shape[1], pt, "frames"), split_patch(x.shape[3], ph, "height"),
            split_patch(x.shape[4], pw, "width"))
    return GridInfo(grid, text_len(args))


_FAR_REASON = (
    "its self-attention never reaches scaled_dot_product_attention: AnyFlowCausalAttnProcessor runs every call "
    "on the flex backend (it raises on any other), under FAR's chunk-causal BlockMask in the training and "
    "KV-cache prefill passes, and in the pipeline's denoising steps with the newest chunk's queries against the "
    "cached keys of the earlier chunks. The key sequence puts the context chunks first at a coarser patch "
    "(compressed_patch_size through far_patch_embedding, another grid than the full-resolution frames) and is "
    "padded to a multiple of 128, so there is neither one (T, H, W) grid nor an SDPA call a sparse pattern could "
    "replace. Run it dense, as Diffusers does, or use AnyFlowTransformer3DModel (AnyFlowPipeline), which "
    "dit_accel supports")

# dit_accel's defaults, nothing being published for AnyFlow: Wan 2.1's patterns (its backbone) with the first
# step dense where Wan keeps 15 (Radial 12) of 50: AnyFlow samples in 1-8 steps, where those would leave every
# step dense. Unmeasured on AnyFlow's weights (none are offline here): calibrate a plan for a measured one.
_FEW_STEP_DEFAULTS = {
    **{name: {**entry, "apply": {**entry["apply"], "dense_steps": 1}} if "dense_steps" in entry["apply"] else entry
       for name, entry in WAN_DEFAULTS.items()},
    "radial": {**RADIAL_VIDEO, "apply": {**RADIAL_VIDEO["apply"], "dense_steps": 1}},
}

PRESETS = (
    Preset(
        "AnyFlowTransformer3DModel",
        attention=(r"blocks\.\d+\.attn1",),  # attn2 is cross-attention: stays dense
        text_position="none",
        grid_dims=3,
        read_grid=_grid,
        grid_key=shapes_key,
        min_diffusers="0.42.1",
        defaults=_FEW_STEP_DEFAULTS,
        notes="AnyFlow (Wan 2.1 backbone, dual-timestep flow map); self-attention blocks.*.attn1 (video only); "
              "(B, F, C, H, W) latents; few-step sampling: the defaults keep the first step dense",
        hub_words=((r"anyflow(?!-?far)", None),),  # the FAR ids hold AnyFlowFARTransformer3DModel
    ),
    Preset.refusing(
        "AnyFlowFARTransformer3DModel", _FAR_REASON, min_diffusers="0.42.1", grid_dims=3,
        notes="AnyFlow-FAR; refused (flex chunk-causal BlockMask / KV cache over mixed-resolution chunks)",
        hub_words=((r"anyflow-?far", None),),
    ),
)
