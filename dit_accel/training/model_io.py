"""What the trainer needs to know about a pipeline family: shapes, prompts, VAE, forward.

Fine-tuning supports the Wan family (Wan 2.1 / 2.2 text-to-video and the tiny
``tiny-wan`` test model): its transformer takes ``(hidden_states, timestep,
encoder_hidden_states)`` with 5-D latents ``(B, C, T, H, W)`` and a flow-matching
schedule. Other families raise a clear error before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

__all__ = ["ModelIO", "model_io_for", "SUPPORTED_TRANSFORMERS"]

SUPPORTED_TRANSFORMERS = ("WanTransformer3DModel",)


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

    def check_geometry(self, frames: int, height: int, width: int) -> None:
        """Raise ValueError when (frames, height, width) do not map onto the latent token grid."""
        patch = tuple(self.transformer.config.patch_size)
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
        pt, ph, pw = tuple(self.transformer.config.patch_size)
        return (t // pt, h // ph, w // pw)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device, dtype) -> torch.Tensor:
        """Prompt embeddings ``(P, L, D)`` for a list of prompts (text encoder, no grad)."""
        out: List[torch.Tensor] = []
        for prompt in prompts:  # one at a time: padding is fixed-length anyway, memory stays flat
            emb, _ = self.pipe.encode_prompt(
                prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                max_sequence_length=self.max_sequence_length, device=device, dtype=dtype,
            )
            out.append(emb[0])
        return torch.stack(out)

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, F, H, W)`` in [-1, 1] -> normalised latents ``(B, C, T, h, w)``.

        Uses the posterior mode (deterministic) and the VAE's per-channel
        latents_mean/std as the Wan pipeline does when decoding.
        """
        vae = self.pipe.vae
        pixels = pixels.to(device=next(vae.parameters()).device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.mode()
        z = int(getattr(vae.config, "z_dim", latents.shape[1]))
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None and len(mean) == z == len(std):
            shape = (1, z, 1, 1, 1)
            mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
            std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
            latents = (latents - mean) / std
        return latents

    def forward(self, transformer, latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor):
        """Transformer prediction for noisy latents at timesteps in [0, 1000)."""
        return transformer(
            hidden_states=latents, timestep=timesteps, encoder_hidden_states=prompt_embeds, return_dict=False
        )[0]


def model_io_for(pipe, *, max_sequence_length: int = 512) -> ModelIO:
    """The glue for ``pipe``; ValueError naming the supported families otherwise."""
    transformer = getattr(pipe, "transformer", None)
    name = type(transformer).__name__
    if transformer is None or name not in SUPPORTED_TRANSFORMERS:
        raise ValueError(
            f"fine-tuning supports pipelines whose transformer is one of {list(SUPPORTED_TRANSFORMERS)}; "
            f"this model has {name}. Use a Wan model (e.g. --model tiny-wan or a Wan2.1 folder)."
        )
    return ModelIO(pipe, max_sequence_length=max_sequence_length)
