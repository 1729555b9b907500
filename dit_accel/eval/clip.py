"""CLIP score of frames against their prompt: ``100 * max(cos(image, text), 0)``.

Same definition as torchmetrics' ``CLIPScore``, computed here so any
``transformers.CLIPModel`` works (a local folder, a hub id when online, or a
tiny model built in a test), with image preprocessing done in torch as CLIP's
image processor does it (shorter side resized to the model's image size, centre
square crop, CLIP mean/std) so only a tokenizer is needed.

Where the model comes from: ``--clip-model PATH_OR_ID`` or env
``DIT_ACCEL_CLIP_MODEL``. Without either, :func:`create_clip_scorer` returns a
one-line reason and the metric is skipped.
"""

from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .metrics import to_frames

__all__ = ["CLIP_ENV", "ClipScorer", "clip_inputs_error", "create_clip_scorer"]

CLIP_ENV = "DIT_ACCEL_CLIP_MODEL"
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # "openai/clip-vit-base-patch32"
_WHAT = ("a folder holding a transformers CLIPModel and its tokenizer (config.json beside the weights), or a hub id "
         "such as openai/clip-vit-base-patch32 (online, or in the local cache)")


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
        _check_prompt(prompt, "prompt")
        x = _clip_view(to_frames(frames).to(self.device), self.image_size)
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
        if isinstance(prompts, str):  # (list() made "a cat" the prompts "a", " ", "c", ... scored without a word)
            raise ValueError(f"prompts={prompts!r:.60} is one text: score_many takes one prompt per video, e.g. "
                             f"[{prompts!r:.40}] * len(videos); score one video with scorer(frames, prompt)")
        videos, prompts = list(videos), list(prompts)
        for i, prompt in enumerate(prompts):
            _check_prompt(prompt, f"prompts[{i}]")
        if len(videos) != len(prompts) or not videos:  # (zip would drop the unmatched videos from the mean)
            raise ValueError(f"score_many needs one prompt per video (and at least one video); got {len(videos)} "
                             f"videos and {len(prompts)} prompts")
        scores = [self.per_frame(v, p) for v, p in zip(videos, prompts)]
        return float(torch.cat(scores).mean())


def _check_prompt(prompt, name: str) -> None:
    """``prompt`` a non-blank text; ValueError naming ``name``. Before: a list of prompts scored 0.0 against one
    video without a word, None was the tokenizer's error about pretokenized batches, and "" a reshape error."""
    if not isinstance(prompt, str) or not prompt.strip():
        many = " (for several videos, one prompt each: score_many(videos, prompts))" \
            if isinstance(prompt, (list, tuple)) else ""
        raise ValueError(f"{name}={prompt!r:.60} is invalid: the CLIP score compares frames with one text, the "
                         f"prompt they were generated from (a non-empty str){many}")


def _clip_view(x: torch.Tensor, size: int) -> torch.Tensor:
    """Frames ``[F, C, H, W]`` as CLIP's image processor (and so torchmetrics' ``CLIPScore``) shows them to the
    model: the shorter side resized to ``size`` (bicubic), then the centre ``size`` x ``size`` square. Squashing a
    480x832 frame to a square instead changed every shape's proportions, and the score with them."""
    h, w = x.shape[-2:]
    short, long = (h, w) if h <= w else (w, h)
    long = int(size * long / short)  # (as transformers' get_resize_output_image_size rounds)
    new_h, new_w = (size, long) if h <= w else (long, size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return x[..., top:top + size, left:left + size]


def _embeds(out) -> torch.Tensor:
    # transformers 5 may return a model output object instead of a tensor.
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP output {type(out).__name__}")


def clip_inputs_error(spec: Optional[str]) -> Optional[str]:
    """The one-line refusal of a ``--clip-model`` (or ``$DIT_ACCEL_CLIP_MODEL``) that cannot be what the user meant,
    or None. Cheap (nothing is loaded), so callers run it before the model: a local path that is not there, a file,
    a folder without a ``config.json``, or an empty value. A hub id (``org/name``) passes: whether it loads offline
    is known only when it is loaded (then the metric is skipped with a line saying why)."""
    name = "--clip-model"
    if spec is None:
        spec, name = os.environ.get(CLIP_ENV), CLIP_ENV
        if not spec:
            return None
    if not spec.strip():
        return f"{name} is empty; give {_WHAT}"
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            return f"{name} {spec}: a folder without config.json, so no transformers model; give {_WHAT}"
        return None
    if os.path.exists(spec):
        return f"{name} {spec}: is a file, not a folder; give {_WHAT}"
    if _HUB_ID.fullmatch(spec) and not spec.startswith("."):
        return None
    return f"{name} {spec}: no such folder (and not a hub id); give {_WHAT}"


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
