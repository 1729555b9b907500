"""CLIP score of frames against their prompt: ``100 * max(cos(image, text), 0)``.

Same definition as torchmetrics' ``CLIPScore``, computed here so any
``transformers.CLIPModel`` works (a local folder, a hub id when online, or a
tiny model built in a test), with image preprocessing done in torch (resize to
the model's image size, CLIP mean/std) so only a tokenizer is needed.

Where the model comes from: ``--clip-model PATH_OR_ID`` or env
``DIT_ACCEL_CLIP_MODEL``. Without either, :func:`create_clip_scorer` returns a
one-line reason and the metric is skipped.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .metrics import to_frames

__all__ = ["CLIP_ENV", "ClipScorer", "create_clip_scorer"]

CLIP_ENV = "DIT_ACCEL_CLIP_MODEL"
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipScorer:
    """Scores frames against a prompt with a ``CLIPModel`` and its tokenizer.

    Example::

        scorer = ClipScorer(CLIPModel.from_pretrained(path), AutoTokenizer.from_pretrained(path))
        scorer(frames, "a cat")   # frames [F, 3, H, W] in [0, 1] -> mean score over frames
    """

    def __init__(self, model, tokenizer, device="cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def per_frame(self, frames, prompt: str) -> torch.Tensor:
        """Score of every frame, ``[F]``."""
        x = to_frames(frames).to(self.device)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        mean = torch.tensor(_MEAN, device=self.device)[:, None, None]
        std = torch.tensor(_STD, device=self.device)[:, None, None]
        dtype = next(self.model.parameters()).dtype
        image = self.model.get_image_features(pixel_values=((x - mean) / std).to(dtype))
        tokens = self.tokenizer([prompt], padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        text = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()
                                               if k in ("input_ids", "attention_mask")})
        image, text = _embeds(image), _embeds(text)
        cos = F.cosine_similarity(image.float(), text.float(), dim=-1)
        return 100.0 * cos.clamp(min=0).cpu()

    def __call__(self, frames, prompt: str) -> float:
        return float(self.per_frame(frames, prompt).mean())

    def score_many(self, videos: Sequence, prompts: Sequence[str]) -> float:
        """Mean score over all frames of all videos (one prompt per video)."""
        videos, prompts = list(videos), list(prompts)
        if len(videos) != len(prompts) or not videos:  # (zip would drop the unmatched videos from the mean)
            raise ValueError(f"score_many needs one prompt per video (and at least one video); got {len(videos)} "
                             f"videos and {len(prompts)} prompts")
        scores = [self.per_frame(v, p) for v, p in zip(videos, prompts)]
        return float(torch.cat(scores).mean())


def _embeds(out) -> torch.Tensor:
    # transformers 5 may return a model output object instead of a tensor.
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP output {type(out).__name__}")


def create_clip_scorer(spec: Optional[str] = None, device="cpu") -> Tuple[Optional[ClipScorer], Optional[str]]:
    """Load a CLIP model from ``spec`` or ``$DIT_ACCEL_CLIP_MODEL``: ``(scorer, None)`` or ``(None, skip_line)``."""
    spec = spec or os.environ.get(CLIP_ENV)
    how = (f"pass --clip-model PATH (a folder with a transformers CLIPModel and its tokenizer) "
           f"or set {CLIP_ENV}; a hub id such as openai/clip-vit-base-patch32 works when online")
    if not spec:
        return None, f"CLIP score skipped: no CLIP model configured; {how}"
    try:
        from transformers import AutoTokenizer, CLIPModel

        model = CLIPModel.from_pretrained(spec)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except Exception as exc:
        return None, f"CLIP score skipped: could not load {spec!r} ({type(exc).__name__}); {how}"
    return ClipScorer(model, tokenizer, device=device), None
