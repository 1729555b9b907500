"""What the trainer needs to know about a pipeline family: shapes, prompts, VAE, forward.

Distillation (random latents, the dense model as teacher) supports:

- Wan 2.1 / 2.2 (and ``tiny-wan``): 5-D latents ``(B, C, T, H, W)``, text embeddings;
- HunyuanVideo: 5-D latents, text embeddings with their mask, pooled CLIP embedding,
  embedded guidance (Radial's published LoRA recipe covers it);
- FLUX (and ``tiny-flux``): packed 2x2 latent patches ``(B, N, C)`` with their
  position ids, pooled embedding and embedded guidance (one image, ``frames=1``).

``--mode data`` (the flow-matching loss on your clips) needs the family's VAE encoding
and is Wan only. CogVideoX, Mochi and LTX-Video are refused before any training:
their transformers take inputs the pipelines build per call (CogVideoX's rotary
embeddings on ``(B, T, C, H, W)`` latents, Mochi's attention mask, LTX's packed
tokens with RoPE scales), which this module does not reproduce yet.

Text conditioning is a dict of tensors with the prompts on dim 0 (see :func:`take`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["ModelIO", "HunyuanVideoIO", "FluxIO", "image_conditioning_error", "cp_error", "data_error",
           "geometry_error", "io_from_configs", "model_io_for", "take", "SUPPORTED_TRANSFORMERS"]

Text = Dict[str, torch.Tensor]


def take(text: Text, index, device=None) -> Text:
    """Rows ``index`` of every tensor of ``text`` (prompts on dim 0), optionally moved to ``device``."""
    return {k: (v[index] if device is None else v[index].to(device)) for k, v in text.items()}


@dataclass
class ModelIO:
    """Pipeline-family glue: latent geometry, prompt encoding, VAE encoding, transformer call."""

    pipe: object
    max_sequence_length: int = 512

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae_scale_temporal(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor_temporal", 4))

    @property
    def vae_scale_spatial(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor_spatial", 8))

    def _patch(self) -> tuple:
        """The transformer's (time, height, width) patch."""
        return tuple(self.transformer.config.patch_size)

    @staticmethod
    def pipe_scales(vae: dict) -> dict:
        """The pipeline's VAE factors as its ``__init__`` derives them from ``vae`` (the VAE's config.json)."""
        return {"vae_scale_factor_temporal": int(vae.get("scale_factor_temporal", 4)),
                "vae_scale_factor_spatial": int(vae.get("scale_factor_spatial", 8))}

    def check_geometry(self, frames: int, height: int, width: int) -> None:
        """Raise ValueError when (frames, height, width) do not map onto the latent token grid."""
        patch = self._patch()
        step = self.vae_scale_spatial * patch[1]
        if height % step or width % step or height <= 0 or width <= 0:
            raise ValueError(
                f"--height {height} / --width {width} must be positive multiples of {step} "
                f"(VAE factor {self.vae_scale_spatial} x patch {patch[1]}) for this model."
            )
        if frames < 1 or (frames - 1) % self.vae_scale_temporal:
            raise ValueError(
                f"--frames {frames} is invalid for this model: use 1 (images) or "
                f"{self.vae_scale_temporal}*k+1 frames (e.g. {self.vae_scale_temporal * 4 + 1})."
            )

    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple:
        t = (frames - 1) // self.vae_scale_temporal + 1
        c = int(self.transformer.config.in_channels)
        return (batch, c, t, height // self.vae_scale_spatial, width // self.vae_scale_spatial)

    def token_grid(self, frames: int, height: int, width: int) -> tuple:
        """Video-token grid (T, H, W) after patchify: what the sparse pattern sees."""
        _, _, t, h, w = self.latent_shape(1, frames, height, width)
        pt, ph, pw = self._patch()
        return (t // pt, h // ph, w // pw)

    family = "Wan"
    data_mode = True  # encode_video works: --mode data is possible

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device, dtype) -> Text:
        """Text conditioning of a list of prompts (text encoder, no grad), prompts on dim 0."""
        rows: List[Text] = []
        for prompt in prompts:  # one at a time: padding is fixed-length anyway, memory stays flat
            rows.append(self._encode_one(prompt, device, dtype))
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def _encode_one(self, prompt: str, device, dtype) -> Text:
        emb, _ = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length, device=device, dtype=dtype,
        )
        return {"encoder_hidden_states": emb[0]}

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, F, H, W)`` in [-1, 1] -> normalised latents ``(B, C, T, h, w)``.

        Uses the posterior mode (deterministic) and the VAE's per-channel
        latents_mean/std as the Wan pipeline does when decoding.
        """
        vae = self.pipe.vae
        pixels = pixels.to(device=next(vae.parameters()).device, dtype=vae.dtype)
        frames = pixels.shape[2]
        # Wan's encoder reads a first frame, then chunks of 4 frames, and drops a shorter last chunk. A VAE whose
        # temporal factor is not 4 (the tiny-shapes pixel codec's is 2) maps 1+2k frames to 1+k latent frames only
        # when the clip is 1+4k long: pad the clip with its last frame up to that, then keep the latent frames the
        # real clip makes (the encoder is causal in time, so the padding changes none of them).
        pad = (-(frames - 1)) % 4 if type(vae).__name__ == "AutoencoderKLWan" else 0
        if pad:
            pixels = torch.cat([pixels, pixels[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
        latents = vae.encode(pixels).latent_dist.mode()
        latents = latents[:, :, :(frames - 1) // self.vae_scale_temporal + 1]
        z = int(getattr(vae.config, "z_dim", latents.shape[1]))
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None and len(mean) == z == len(std):
            shape = (1, z, 1, 1, 1)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            latents = (latents - mean) / std
        return latents

    def forward(self, transformer, latents: torch.Tensor, timesteps: torch.Tensor, text: Text):
        """Transformer prediction for noisy latents at timesteps in [0, 1000)."""
        return transformer(hidden_states=latents, timestep=timesteps, return_dict=False, **text)[0]


class HunyuanVideoIO(ModelIO):
    """HunyuanVideo: Wan's latent layout (patch ``patch_size_t`` x ``patch_size``^2), text with its mask,
    the pooled CLIP embedding and embedded guidance (the pipeline's default 6.0, scaled by 1000 as it does)."""

    family = "HunyuanVideo"
    data_mode = False
    guidance: float = 6.0

    def _patch(self) -> tuple:
        c = self.transformer.config
        return (int(c.patch_size_t), int(c.patch_size), int(c.patch_size))

    @staticmethod
    def pipe_scales(vae: dict) -> dict:
        return {"vae_scale_factor_temporal": int(vae.get("temporal_compression_ratio", 4)),
                "vae_scale_factor_spatial": int(vae.get("spatial_compression_ratio", 8))}

    def _encode_one(self, prompt: str, device, dtype) -> Text:
        emb, pooled, mask = self.pipe.encode_prompt(
            prompt, prompt_2=None, num_videos_per_prompt=1, device=device, dtype=dtype,
            max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": emb[0], "encoder_attention_mask": mask[0], "pooled_projections": pooled[0]}

    def forward(self, transformer, latents, timesteps, text: Text):
        guidance = None
        if getattr(transformer.config, "guidance_embeds", False):
            guidance = torch.full((latents.shape[0],), self.guidance * 1000.0, device=latents.device,
                                  dtype=latents.dtype)
        return transformer(hidden_states=latents, timestep=timesteps, guidance=guidance, return_dict=False,
                           **text)[0]


class FluxIO(ModelIO):
    """FLUX: one image (``frames=1``) as packed 2x2 latent patches ``(B, N, C)`` with their position ids, the
    T5 embedding, the pooled CLIP embedding and embedded guidance (3.5, the pipeline's default)."""

    family = "FLUX"
    data_mode = False
    guidance: float = 3.5
    _grid: Optional[tuple] = None

    @property
    def vae_scale_spatial(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8))

    @staticmethod
    def pipe_scales(vae: dict) -> dict:
        return {"vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1) if "block_out_channels" in vae else 8}

    def check_geometry(self, frames: int, height: int, width: int) -> None:
        step = 2 * self.vae_scale_spatial
        if frames != 1:
            raise ValueError(f"--frames {frames} is invalid for FLUX: it makes images; use --frames 1.")
        if height % step or width % step or height <= 0 or width <= 0:
            raise ValueError(f"--height {height} / --width {width} must be positive multiples of {step} "
                             f"(VAE factor {self.vae_scale_spatial} x 2x2 packing) for FLUX.")

    def token_grid(self, frames: int, height: int, width: int) -> tuple:
        step = 2 * self.vae_scale_spatial
        self._grid = (height // step, width // step)  # forward() builds the position ids from it
        return self._grid

    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple:
        h, w = self.token_grid(frames, height, width)
        return (batch, h * w, int(self.transformer.config.in_channels))

    def _encode_one(self, prompt: str, device, dtype) -> Text:
        emb, pooled, _ = self.pipe.encode_prompt(prompt, prompt_2=None, device=device, num_images_per_prompt=1,
                                                 max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": emb[0].to(dtype), "pooled_projections": pooled[0].to(dtype)}

    def forward(self, transformer, latents, timesteps, text: Text):
        if self._grid is None:
            raise RuntimeError("FluxIO.forward before token_grid(): the image size is unknown")
        h, w = self._grid
        rows = torch.arange(h, device=latents.device).repeat_interleave(w)
        cols = torch.arange(w, device=latents.device).repeat(h)
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(latents.dtype)
        txt_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = None
        if getattr(transformer.config, "guidance_embeds", False):
            guidance = torch.full((latents.shape[0],), self.guidance, device=latents.device, dtype=latents.dtype)
        return transformer(hidden_states=latents, timestep=timesteps / 1000.0, guidance=guidance, img_ids=img_ids,
                           txt_ids=txt_ids, return_dict=False, **text)[0]


_FAMILIES = {"WanTransformer3DModel": ModelIO, "HunyuanVideoTransformer3DModel": HunyuanVideoIO,
             "FluxTransformer2DModel": FluxIO,
             # Wan lineage: SkyReels-V2 is called like Wan (latents, timestep, text embeddings)
             "SkyReelsV2Transformer3DModel": ModelIO}
SUPPORTED_TRANSFORMERS = tuple(_FAMILIES)
_NOT_YET = {
    "CogVideoXTransformer3DModel": "its transformer takes (B, T, C, H, W) latents and rotary embeddings that "
                                   "the pipeline builds per call",
    "MochiTransformer3DModel": "its transformer needs the pipeline's text attention mask handling per call",
    "LTXVideoTransformer3DModel": "its transformer takes packed tokens with per-call RoPE scales and sizes",
    # Wan lineage whose calls carry conditioning the pipeline builds per call
    "WanVACETransformer3DModel": "its transformer needs the pipeline's control_hidden_states (VACE context "
                                 "latents, masks and reference frames) on every call",
    "ChronoEditTransformer3DModel": "its transformer is conditioned on the input image's latents (extra latent "
                                    "channels) and CLIP embedding, which the pipeline builds per call",
}
# models-video-b (issue 28): sparse inference works for these classes; the trainer does not build their calls yet.
_NOT_YET.update({
    "CosmosTransformer3DModel": "the trainer does not yet build its call (padding-mask channel, fps, condition "
                                "mask) and no tiny Cosmos pipeline exists to test one against",
    "AllegroTransformer3DModel": "its transformer takes rotary embeddings that the pipeline builds per call",
    "ConsisIDTransformer3DModel": "its transformer takes (B, T, C, H, W) latents, rotary embeddings and face "
                                  "embeddings that the pipeline builds per call",
    "LatteTransformer3DModel": "the trainer does not yet build its call (learned-sigma output channels) and only its "
                               "spatial attention is sparse",
    "MotifVideoTransformer3DModel": "the trainer does not yet build its call (text mask, image embeddings) and no "
                                    "tiny Motif-Video pipeline exists to test one against",
})

# models-video-c (issue 28): sparse inference works for these classes; the trainer does not build their calls yet.
_NOT_YET.update({
    "HunyuanVideo15Transformer3DModel": "its transformer takes MLLM and ByT5 text with their masks and image "
                                        "embeddings that the pipeline builds per call",
    "Kandinsky5Transformer3DModel": "its transformer takes channels-last latents, rotary positions and a pooled "
                                    "text embedding that the pipeline builds per call",
    "Kandinsky6Transformer3DModel": "its transformer denoises video and audio together from inputs the pipeline "
                                    "builds per call (audio latents, reference frame, rotary positions)",
    "EasyAnimateTransformer3DModel": "the trainer does not yet build its call (two text encoders, inpaint latents) "
                                     "and no tiny EasyAnimate pipeline exists to test one against",
    "HeliosTransformer3DModel": "its calls carry the packed multi-scale history of the autoregressive pipeline, "
                                "which the trainer does not reproduce",
})

# models-video-d (issue 28): sparse inference works for these classes; the trainer does not build their calls.
_NOT_YET.update({
    "WanAnimateTransformer3DModel": "its transformer is not called like Wan: every call needs the reference-image "
                                    "latent frame and mask channels, pose latents and the face video, which the "
                                    "pipeline builds per segment",
    "LTX2VideoTransformer3DModel": "its transformer denoises video and audio together (audio latents, audio text "
                                   "embeddings and positions on every call), which the trainer does not build",
    "MiniMaxH3Transformer3DModel": "its transformer takes one packed sequence (row indices, modality tags, "
                                   "per-row timesteps and positions) that the modular pipeline builds per call",
})


def _family_of(transformer_class) -> Optional[type]:
    """The :class:`ModelIO` of a transformer class (by its own or a base class's name), or None."""
    return next((_FAMILIES[b.__name__] for b in transformer_class.__mro__ if b.__name__ in _FAMILIES), None)


def _unsupported(name: str) -> str:
    why = _NOT_YET.get(name)
    return (f"fine-tuning supports pipelines whose transformer is one of {list(SUPPORTED_TRANSFORMERS)}; "
            f"this model has {name}" + (f" ({why})" if why else "") +
            ". Use a Wan, HunyuanVideo or FLUX model (e.g. --model tiny-wan or --model tiny-flux).")


def data_error(io_class, mode: str, data) -> Optional[str]:
    """What is refused about a caption folder (``--data``) for a family whose clips the trainer cannot encode
    (``data_mode`` False), in either mode; None otherwise. Before: in distill mode FLUX's 2-D VAE failed at the
    first batch, blamed on the method ("--method sla on token grid (16, 16): too many values to unpack"), and
    HunyuanVideo's latents were used without its VAE's scaling factor (a teacher and student fed mis-scaled
    latents, without a word)."""
    if io_class.data_mode or (mode != "data" and data is None):
        return None
    if mode == "data":
        return (f"--mode data supports Wan models only ({io_class.family} needs its own VAE encoding); use --mode "
                "distill (the dense model is the teacher, no data needed).")
    return (f"--data supports Wan models only: its clips are encoded with the model's VAE, which the trainer does "
            f"for Wan alone ({io_class.family} needs its own VAE encoding). Distill on --prompts instead (random "
            "latents, the dense model is the teacher), or fine-tune a Wan model on --data.")


def cp_error(io_class, cp) -> Optional[str]:
    """What is refused about ``--cp`` for a family (context parallelism is tested on Wan only), or None."""
    if cp is None or io_class.family == "Wan":  # (cp may be a numpy array here, not yet checked)
        return None
    return f"--cp: context-parallel fine-tuning is tested on Wan only, not {io_class.family}; run it on one process."


def family_error(class_name: str, mode: str, data=None, cp=None) -> Optional[str]:
    """What :func:`model_io_for` and the trainer would refuse about a model whose transformer is the Diffusers class
    ``class_name`` (read from its model_index.json before it loads), in ``mode`` with the caption folder ``data``
    (or None) and the context-parallel degrees ``cp`` (or None); None when they would not, or when dit_accel does
    not know the class (the check after loading covers it). By name, without importing Diffusers' transformers
    (seconds): no class with a preset subclasses a supported one without being listed here itself."""
    from ..pipelines.presets import PRESETS

    cls = _FAMILIES.get(class_name)
    if cls is None:
        return _unsupported(class_name) if class_name in PRESETS or class_name in _NOT_YET else None
    return data_error(cls, mode, data) or cp_error(cls, cp)


def io_from_configs(folder, class_name: str) -> Optional[ModelIO]:
    """The :class:`ModelIO` of the model in ``folder`` (a Diffusers folder whose transformer is ``class_name``) built
    from its ``transformer/config.json`` and ``vae/config.json`` alone, for its geometry before it loads; None when
    the class is not one the trainer calls or a config is missing or unreadable (the checks after loading cover it)."""
    from types import SimpleNamespace

    from ..models.loading import component_config

    cls = _FAMILIES.get(class_name)
    configs = {name: component_config(folder, name) for name in ("transformer", "vae")}
    if cls is None or not all(configs.values()):
        return None
    try:
        return cls(SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(**configs["transformer"])),
                                   **cls.pipe_scales(configs["vae"])))
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return None


def geometry_error(folder, class_name: str, frames: int, height: int, width: int) -> Optional[str]:
    """What :meth:`ModelIO.check_geometry` will refuse about ``--frames``/``--height``/``--width`` once the model in
    ``folder`` (a Diffusers folder whose transformer is ``class_name``) has loaded, read from its
    ``transformer/config.json`` and ``vae/config.json`` before it loads (minutes for a real model); None when it
    will not, or when the configs do not say (the check after loading covers it)."""
    io = io_from_configs(folder, class_name)
    if io is None:
        return None
    problem = image_conditioning_error(io.transformer.config, io.family)  # (before the model loads, as after)
    if problem:
        return problem
    try:
        io.check_geometry(frames, height, width)
    except ValueError as err:
        return str(err)
    except (AttributeError, TypeError, KeyError):  # (a config without the patch size: the check after loading)
        return None
    return None


def image_conditioning_error(config, family: str) -> Optional[str]:
    """What is refused about a transformer (its ``config``) conditioned on an image, or None: one that takes more input
    channels than it predicts (Wan or SkyReels-V2 image-to-video, HunyuanVideo I2V, FLUX Fill: the image's latents and
    a mask, which its pipeline builds per call), or a HunyuanVideo I2V whose first latent frame is the clean image
    (``image_condition_type="token_replace"``, timestep 0 there). Before: the trainer filled those channels, or that
    frame, with noised random values and trained on them, without a word (in data mode: a raw shape error)."""
    try:
        ins = int(config.in_channels)
        outs = int(getattr(config, "out_channels", None) or ins)
    except (AttributeError, TypeError, ValueError):
        return None  # (a config that does not say: nothing to compare)
    kind = getattr(config, "image_condition_type", None)
    if ins != outs:
        what = (f"takes {ins} input channels but predicts {outs}: an image-to-video or inpainting model, whose "
                f"pipeline fills the other {ins - outs} channels per call (the conditioning image's latents and mask)")
    elif kind:
        what = (f"is an image-to-video model (image_condition_type={kind!r}: its first latent frame is the clean "
                "conditioning image, which its pipeline puts there per call)")
    else:
        return None
    return (f"fine-tuning trains text-to-video and text-to-image models; this model's transformer {what}, and the "
            f"trainer does not build that input. Fine-tune the {family} text-to-video (or text-to-image) model "
            "instead.")


def model_io_for(pipe, *, max_sequence_length: int = 512) -> ModelIO:
    """The glue for ``pipe``'s family; ValueError naming the supported families (and why not) otherwise."""
    transformer = getattr(pipe, "transformer", None)
    cls = None if transformer is None else _family_of(type(transformer))
    if cls is None:
        raise ValueError(_unsupported(type(transformer).__name__))
    if getattr(pipe, "transformer_2", None) is not None:  # (before: trained, then its folder did not load back)
        raise ValueError(
            f"fine-tuning supports pipelines with one transformer; this {type(pipe).__name__} has two experts "
            "(transformer, and transformer_2 below its boundary_ratio, as Wan 2.2 A14B): the run would train "
            "transformer alone at every noise level, and its weights folder would not load into this pipeline. "
            "Fine-tune a one-transformer model (e.g. Wan 2.1, or Wan 2.2 TI2V-5B).")
    problem = image_conditioning_error(transformer.config, cls.family)
    if problem:
        raise ValueError(problem)
    return cls(pipe, max_sequence_length=max_sequence_length)


# AnyFlow: sparse inference works; the trainer builds Wan's call, not AnyFlow's.
_NOT_YET["AnyFlowTransformer3DModel"] = ("its transformer takes frames-first (B, F, C, H, W) latents and per-frame "
                                         "source and target timesteps (timestep, r_timestep) of a flow map, which "
                                         "the trainer does not build")

# models-image-b (issue 28): sparse inference works for these image classes; the trainer does not build their calls.
_NOT_YET.update({
    "Flux3Transformer2DModel": "the trainer does not yet build its call (Qwen3-VL context, 4-axis position ids, "
                               "per-mode timesteps)",
    "QwenImage21Transformer2DModel": "its transformer takes the vision-language sequence's image slots (img_mask) "
                                     "and a block-causal prefix that the pipeline builds per call",
    "HiDreamImageTransformer2DModel": "its transformer takes T5 and per-layer Llama-3 embeddings and a pooled "
                                      "embedding that the pipeline builds per call",
    "Lumina2Transformer2DModel": "the trainer does not yet build its call (caption features with their mask)",
    "ZImageTransformer2DModel": "its transformer takes per-sample lists of latents and caption features that the "
                                "pipeline builds per call",
})
# Image classes of Diffusers 0.42.1 added since: sparse inference works; the trainer does not build their calls.
_NOT_YET.update({
    "LongCatImageTransformer2DModel": "the trainer does not yet build its call (Qwen2.5-VL text, modality-offset "
                                      "position ids)",
    "OvisImageTransformer2DModel": "the trainer does not yet build its call (Qwen3 text, position ids)",
    "BriaFiboTransformer2DModel": "its transformer takes per-block text-encoder layers and a text key mask that the "
                                  "pipeline builds per call",
    "Krea2Transformer2DModel": "its transformer takes a stack of text-encoder layers per token and combined position "
                               "ids that the pipeline builds per call",
    "DiTTransformer2DModel": "its transformer is class-conditional (ImageNet labels, no text encoder), which the "
                             "trainer's text-prompt distillation does not build",
    "GlmImageTransformer2DModel": "its transformer takes glyph embeddings, per-token prior image tokens from the "
                                  "vision-language model and size conditions that the pipeline builds per call",
    "ErnieImageTransformer2DModel": "the trainer does not yet build its call (padded text with text_lens)",
    "JoyImageEditTransformer3DModel": "its transformer takes (B, N, C, T, H, W) latents of [reference image, noise] "
                                      "items and Qwen3-VL text that the pipeline builds per call",
    "JoyImageEditPlusTransformer3DModel": "its transformer takes pre-patchified, padded (B, P, C, pt, ph, pw) "
                                          "latents of [image, references], their shape_list and a text mask that "
                                          "the pipeline builds per call",
    "BriaFibo2Transformer2DModel": "its transformer takes stacked text-encoder bundles (Perceiver and injection "
                                   "blocks), a text mask that sets its gist counts and context latents that the "
                                   "pipeline builds per call",
    "Ideogram4Transformer2DModel": "its transformer takes one packed [padding, text, image] sequence with per-token "
                                   "indicator, segment and position ids that the pipeline builds per call, and an "
                                   "unconditional transformer of its own",
    "DreamLiteTransformer2DModel": "it is a block of the DreamLite U-Net (pipe.unet), not a pipeline's transformer; "
                                   "the trainer does not build U-Net calls",
    "NucleusMoEImageTransformer2DModel": "its transformer takes packed latents with img_shapes and Qwen3-VL hidden "
                                         "states with their mask that the pipeline builds per call",
    "PRXTransformer2DModel": "the trainer does not yet build its call (T5Gemma text with its mask)",
})
