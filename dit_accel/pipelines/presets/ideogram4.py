"""Ideogram 4 (``Ideogram4Transformer2DModel``): a single-stream DiT over one packed sequence per sample whose roles
the call spells out: ``indicator`` (text or image per token), ``position_ids`` (B, S, 3) (the image's (0, h, w)
raster, offset past the text) and ``segment_ids`` (the model attends only within a segment:
``forward`` builds the bool (B, 1, S, S) mask ``segment_i == segment_j``). ``Ideogram4Pipeline`` lays every sample
out as [left padding, text, image] (``_prepare_ids``): text first, the image the trailing run of image tokens, text
and image in one segment, the padding in another. Every block's ``layers.*.attention`` attends over all of it.

The square mask's image row is the key mask (``Preset.square_mask``): the text and image queries' rows are that
row, so they run exactly; the padding's queries, which attend each other in the dense model, attend the text and
image instead (their outputs, never a key of a valid token, are what the pipeline drops). Calls whose image is not
the trailing raster of every sample (packed batches of several samples per row, other layouts) are refused.

The pipeline's unconditional pass runs on a second transformer, ``unconditional_transformer``, over the image alone
(the conditional call's image tokens: one segment, no text); ``apply(pipe)`` wraps it too."""

from __future__ import annotations

from ._common import IMAGE_DEFAULTS, GridInfo, Preset, raster_ids, tensor_arg

__all__ = ["PRESETS"]


def _roles():
    from diffusers.models.transformers.transformer_ideogram4 import LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR

    return LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR


def _grid(model, args) -> GridInfo:
    x = tensor_arg(args, "hidden_states")  # (B, S, C): the packed sequence
    role, segment, ids = (tensor_arg(args, n) for n in ("indicator", "segment_ids", "position_ids"))
    b, s = x.shape[:2]
    if role.shape != (b, s) or segment.shape != (b, s) or ids.shape != (b, s, 3):
        raise ValueError(f"dit_accel: Ideogram 4 indicator {tuple(role.shape)}, segment_ids {tuple(segment.shape)} "
                         f"and position_ids {tuple(ids.shape)} do not describe the (B, S) = {(b, s)} tokens of the "
                         "call; use the dense model")
    text_role, image_role = _roles()
    image = role == image_role
    n = int(image[0].sum())  # one host sync per call (the checks below: one more, and raster_ids')
    start = s - n
    own = segment == segment[:, start:start + 1]  # the tokens in the image's segment: its queries' keys
    placed = n > 0 and bool(image[:, start:].all() & ~image[:, :start].any() & own[:, start:].all()
                            & ~((role == text_role) & ~own).any() & (ids[:, start:] == ids[:1, start:]).all())
    if not placed:
        raise ValueError("dit_accel: the image tokens of this Ideogram 4 call are not one trailing run, in the text's "
                         "segment, at the same positions in every sample (a packed batch of several samples per row, "
                         "or another layout than Ideogram4Pipeline's [padding, text, image]); dit_accel cannot place "
                         "them: use the dense model")
    h, w = raster_ids(ids[0, start:], n, "Ideogram 4 image")
    return GridInfo((h, w), start)


PRESETS = (
    Preset(
        "Ideogram4Transformer2DModel",
        attention=(r"layers\.\d+\.attention",),
        text_position="first",
        grid_dims=2,
        read_grid=_grid,
        min_diffusers="0.42.1",
        square_mask=True,  # segment_i == segment_j: the image row is the key mask of the text and image queries
        defaults=dict(IMAGE_DEFAULTS),  # dit_accel defaults (as FLUX.1): no published setting for Ideogram 4
        notes="Ideogram 4; single-stream joint attention [padding, text, image] (packed, read from indicator and "
              "position_ids), 2-D grid (H, W); the segment mask's padding excluded; packed batches refused; the "
              "unconditional pass (unconditional_transformer, the image alone) sparse too",
        hub_words=((r"ideogram[._-]?v?4", None),),  # ideogram-ai/ideogram-v4
    ),
)
