"""Tiny MiniMax-H3: the bare ``"minimax_h3"`` transformer, called with the packed ``[text | keyframe | target
audio | target video]`` layout of the modular pipeline's first-frame keyframe task: one conditioning frame of
video rows, 10 audio rows (2 channels x 5 latents), then the target video grid, one time per latent frame."""

from __future__ import annotations

import torch

from ._common import TinyTransformer

__all__ = ["TRANSFORMERS", "packed_layout"]

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
