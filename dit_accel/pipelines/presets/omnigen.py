"""OmniGen (``OmniGenTransformer2DModel``): refused. One Phi-3 style sequence [condition tokens (prompt
interleaved with the latents of input images), time token, generated image] runs every layer under a full
(B, 1, S, S) attention mask built by the pipeline (causal over the condition tokens, bidirectional inside each
image, padding per sample) and passed in by the caller, not a key-padding mask of one layout."""

from __future__ import annotations

from ._common import Preset

__all__ = ["PRESETS"]

PRESETS = (
    Preset.refusing(
        "OmniGenTransformer2DModel",
        "every layer attends one sequence of prompt tokens interleaved with input-image latents, a time token and "
        "the generated image under the pipeline's full (S, S) attention mask (causal over the condition, "
        "bidirectional inside each image, per-sample padding): not a key-padding mask over one [text, image] "
        "layout, so dit_accel cannot place the image grid. Use the dense model",
        min_diffusers="0.42.1",
        notes="OmniGen: refused (one causal/bidirectional masked sequence, no single image grid)",
        hub_words=((r"omnigen", None),),
    ),
)
