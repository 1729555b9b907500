"""Tiny MiniMax-H3: the bare ``"minimax_h3"`` transformer, called with the packed ``[text | keyframe | target
audio | target video]`` layout of the modular pipeline's first-frame keyframe task: one conditioning frame of
video rows, 10 audio rows (2 channels x 5 latents), then the target video grid, one time per latent frame."""

from __future__ import annotations

import torch

from ._common import TinyPipeline, TinyTransformer

__all__ = ["TRANSFORMERS", "PIPELINES", "packed_layout"]

AUDIO_ROWS = 10


def packed_layout(text: int, grid, keyframes: int = 1, audio: int = AUDIO_ROWS):
    """``(position_ids, token_tags, video_indices, audio_indices, text_indices)`` of ``[text | keyframes |
    audio | video]`` for a target grid ``(F, H, W)``: the rotary times follow the text, as in the pipeline."""
    f, h, w = grid
    hw = h * w
    cond, video = keyframes * hw, f * hw
    s = text + cond + audio + video
    pos = torch.zeros(s, 3, dtype=torch.float64)
    pos[:text, 0] = torch.arange(text)
    frame = torch.stack(torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij"), -1)
    frame = frame.reshape(hw, 2).double()
    a, v = text + cond, text + cond + audio
    pos[text:a, 0], pos[text:a, 1:] = float(text), frame.repeat(keyframes, 1)
    pos[a:v, 0] = (text + torch.arange(audio // 2)).double().repeat(2)
    pos[a:v, 2] = torch.tensor([-1.0, 1.0]).repeat_interleave(audio // 2).double()
    pos[v:, 0] = (text + 5 / 3 * torch.arange(f).double()).repeat_interleave(hw)
    pos[v:, 1:] = frame.repeat(f, 1)
    tags = torch.zeros(s, dtype=torch.long)
    tags[:text], tags[a:v] = 1, 2
    return pos, tags, torch.cat([torch.arange(text, a), torch.arange(v, s)]), torch.arange(a, v), torch.arange(text)


def _inputs(cfg, grid, batch, text, rnd, t, mask):
    pos, tags, video, audio, text_rows = packed_layout(text, grid)
    patch = cfg.in_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    steps = torch.zeros(pos.shape[0], dtype=torch.long)
    steps[video[:video.numel() - grid[0] * grid[1] * grid[2]]] = 1  # the keyframe rows: their own timestep
    return dict(hidden_states=rnd(batch, video.numel(), patch),
                audio_hidden_states=rnd(batch, audio.numel(), cfg.audio_in_channels),
                encoder_hidden_states=rnd(batch, text, cfg.text_dim), timestep=torch.tensor([0.5, 0.05]),
                timestep_indices=steps, token_tags=tags, position_ids=pos, video_indices=video,
                audio_indices=audio, text_indices=text_rows, return_dict=False)


TRANSFORMERS = (
    TinyTransformer(
        "minimax_h3", "MiniMaxH3Transformer3DModel",
        dict(num_attention_heads=2, attention_head_dim=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
             ffn_dim=32, in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=16,
             time_embed_hidden_dim=16, time_embed_dim=16, rope_freq_dim=2),
        grid=(4, 8, 8), text=7, inputs=_inputs,
    ),
)


# ----------------------------------------------------------------------------- tiny-minimax-h3 (a pipeline)
# Diffusers runs MiniMax-H3 through a modular pipeline whose text encoder is Qwen3-VL (with its processor and chat
# template): too large a stack to build in code. tiny-minimax-h3 is dit_accel's own compact pipeline around the same
# pieces that decide what attention sees: the MiniMax-H3 transformer, Diffusers' own packed layout
# (MiniMaxH3PrepareLayoutStep.build_packed_sequence: [text | keyframes | target audio | target video]), its per-row
# timesteps (MiniMaxH3SetTimestepsStep.build_row_timesteps) and MiniMaxH3Scheduler for both schedules. Text comes
# from tiny-wan's UMT5 (the real tokens, no padding), keyframes (``image`` first, ``last_image`` last) are encoded
# and video decoded by tiny-wan's VAE; the audio stays latent (``audio``: channel-major rows per stereo channel).
H3_PIPELINE_TRANSFORMER = dict(TRANSFORMERS[0].config, text_dim=32)  # UMT5's width; in_channels 4 = the VAE's
H3_FPS, H3_AUDIO_LATENTS_PER_SECOND, H3_AUDIO_CHANNELS = 24, 40, 2


def _h3_pipeline_class():
    from dataclasses import dataclass

    import numpy as np
    from diffusers import DiffusionPipeline
    from diffusers.loaders import MiniMaxH3LoraLoaderMixin
    from diffusers.modular_pipelines.minimax_h3.before_denoise import (MiniMaxH3PrepareLayoutStep,
                                                                        MiniMaxH3SetTimestepsStep,
                                                                        patchify_video_latents)
    from diffusers.utils import BaseOutput
    from diffusers.video_processor import VideoProcessor

    @dataclass
    class TinyMiniMaxH3Output(BaseOutput):
        frames: object  # (batch, frames, H, W, 3) in [0, 1] for output_type "np"
        audio: torch.Tensor  # (batch, 2 channels, audio latents, audio latent channels)

    class TinyMiniMaxH3Pipeline(DiffusionPipeline, MiniMaxH3LoraLoaderMixin):
        """Text (and keyframes) to video + audio with a MiniMax-H3 transformer: one packed sequence per step, the
        video and audio rows each on their own MiniMaxH3Scheduler (see the comment above for what is Diffusers')."""

        model_cpu_offload_seq = "text_encoder->transformer->vae"

        def __init__(self, tokenizer, text_encoder, vae, transformer, scheduler, audio_scheduler):
            super().__init__()
            self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                                  scheduler=scheduler, audio_scheduler=audio_scheduler)
            self.vae_scale_factor_temporal, self.vae_scale_factor_spatial = 4, 8
            self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

        def _text(self, prompt: str, max_sequence_length: int, device):
            ids = self.tokenizer(prompt, max_length=max_sequence_length, truncation=True, return_tensors="pt")
            return self.text_encoder(ids.input_ids.to(device)).last_hidden_state  # (1, tokens, 32)

        def _keyframe(self, image, height: int, width: int, device, generator):
            pixels = self.video_processor.preprocess(image, height=height, width=width).to(device, self.vae.dtype)
            latents = self.vae.encode(pixels[:, :, None]).latent_dist.mode()  # (1, C, 1, h, w)
            rows = patchify_video_latents(latents.float(), tuple(self.transformer.config.patch_size))
            noise = torch.randn(rows.shape, generator=generator, dtype=rows.dtype).to(device)
            return 0.999 * rows + 0.001 * noise  # anchors held just short of clean, as the modular pipeline does

        @torch.no_grad()
        def __call__(self, prompt: str = "", image=None, last_image=None, num_frames: int = 17, height: int = 128,
                     width: int = 128, num_inference_steps: int = 4, max_sequence_length: int = 64,
                     generator=None, output_type: str = "np", return_dict: bool = True):
            if not isinstance(prompt, str):
                raise ValueError(f"prompt={prompt!r}: tiny-minimax-h3 takes one prompt (a str)")
            if (num_frames - 1) % self.vae_scale_factor_temporal or height % 16 or width % 16:
                raise ValueError(f"num_frames={num_frames}, height={height}, width={width}: use 4k+1 frames and "
                                 "sizes that are multiples of 16")
            if not isinstance(num_inference_steps, int) or num_inference_steps < 2:
                raise ValueError(f"num_inference_steps={num_inference_steps!r}: MiniMaxH3Scheduler needs at least 2 "
                                 "(N sigmas, the last 0, give N - 1 transformer calls)")
            if last_image is not None and image is None:
                raise ValueError("last_image needs image (first and last keyframes: fl2va)")
            device, cfg = self._execution_device, self.transformer.config
            text = self._text(prompt, max_sequence_length, device)
            frames, h, w = (num_frames - 1) // 4 + 1, height // 8, width // 8
            audio_latents = max(1, round(num_frames / H3_FPS * H3_AUDIO_LATENTS_PER_SECOND))
            anchors = ("first",) * (image is not None) + ("last",) * (last_image is not None)
            keyframes = [self._keyframe(x, height, width, device, generator) for x in (image, last_image)
                         if x is not None]
            pos, tags, video_rows, audio_rows, text_rows, cond, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
                torch.ones(text.shape[1], dtype=torch.long), frames, h, w, audio_latents, tuple(cfg.patch_size),
                H3_AUDIO_CHANNELS, 2, 0, keyframe_anchors=anchors)
            patch = cfg.in_channels * int(np.prod(cfg.patch_size))
            noise = torch.randn(video_rows.numel() - cond, patch, generator=generator).to(device)
            latents = torch.cat(keyframes + [noise]) if keyframes else noise
            audio = torch.randn(audio_rows.numel(), cfg.audio_in_channels, generator=generator).to(device)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            self.audio_scheduler.set_timesteps(num_inference_steps, device=device)
            layout = dict(token_tags=tags.to(device), position_ids=pos.to(device), video_indices=video_rows.to(device),
                          audio_indices=audio_rows.to(device), text_indices=text_rows.to(device))
            for t, ta in self.progress_bar(list(zip(self.scheduler.timesteps, self.audio_scheduler.timesteps))):
                steps, index = MiniMaxH3SetTimestepsStep.build_row_timesteps(
                    video_rows, audio_rows, cond, 0, text.shape[1], float(t), float(ta), max(float(t), 0.999), 1.0)
                dtype = self.transformer.dtype
                video_pred, audio_pred = self.transformer(
                    hidden_states=latents[None].to(dtype), audio_hidden_states=audio[None].to(dtype),
                    encoder_hidden_states=text.to(dtype), timestep=steps.to(device), timestep_indices=index.to(device),
                    return_dict=False, **layout)
                latents[cond:] = self.scheduler.step(video_pred[0, cond:].float(), t, latents[cond:],
                                                     return_dict=False)[0]
                audio = self.audio_scheduler.step(audio_pred[0].float(), ta, audio, return_dict=False)[0]
            rows = latents[cond:].reshape(frames, h // 2, w // 2, cfg.in_channels, 2, 2)
            video = rows.permute(3, 0, 1, 4, 2, 5).reshape(1, cfg.in_channels, frames, h, w)
            if output_type == "latent":
                out = video
            else:
                decoded = self.vae.decode(video.to(self.vae.dtype), return_dict=False)[0]
                out = self.video_processor.postprocess_video(decoded, output_type=output_type)
            audio = audio.reshape(1, H3_AUDIO_CHANNELS, audio_latents, cfg.audio_in_channels)
            self.maybe_free_model_hooks()
            return TinyMiniMaxH3Output(frames=out, audio=audio) if return_dict else (out, audio)

    return TinyMiniMaxH3Pipeline


def _build(seed: int):
    from diffusers import MiniMaxH3Scheduler, MiniMaxH3Transformer3DModel

    from ._common import tiny_wan_parts

    parts = tiny_wan_parts(seed)
    transformer = MiniMaxH3Transformer3DModel(**H3_PIPELINE_TRANSFORMER)
    for p in transformer.parameters():  # zero-initialised output layers would hide every block
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.05)
    return _h3_pipeline_class()(**parts, transformer=transformer.eval(), scheduler=MiniMaxH3Scheduler(shift=3.0),
                                audio_scheduler=MiniMaxH3Scheduler(shift=3.0))


PIPELINES = (
    TinyPipeline(
        "tiny-minimax-h3",
        summary="a compact MiniMax-H3 pipeline (video + audio, keyframes: image=, last_image=) with a 2-layer "
                "MiniMaxH3Transformer3DModel, Diffusers' packed layout and MiniMaxH3Scheduler, tiny-wan's UMT5 "
                "and VAE; random weights for smoke runs (offline, seconds on a CPU)",
        build=_build,
        # 17 frames at 128x128: token grid (5, 8, 8) = five 64-token tiles, 28 audio latents per channel
        defaults={"num_frames": 17, "height": 128, "width": 128, "num_inference_steps": 4, "max_sequence_length": 32},
        method_defaults={"tile": {"tile": (1, 8, 8), "window": (3, 3, 3)}, "gna": {"kernel_size": (3, 6, 6)},
                         "radial": {"block_size": 64, "decay": 1.0, "sink_frames": (0,)}, "sla": {"topk": 0.4}},
    ),
)
