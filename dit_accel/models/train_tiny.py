"""Train the ``tiny-shapes`` model: ``python -m dit_accel.models.train_tiny --out DIR [--steps N]``.

Fine-tune it, e.g. to longer clips: ``--init DIR`` starts from a saved pipeline (its codec normalisation
kept; its ``train_log.json`` nested in the new one as ``init_log``), ``--frames N`` sets the clip length
(default 7), ``--time-limit S`` ends the run early and saves. ``--device cuda --precision bf16`` trains on a GPU
(bf16 autocast, fp32 weights) on the same CPU-drawn clips and noise.

Builds a fresh :class:`diffusers.WanPipeline` (see :mod:`dit_accel.models.tiny_shapes`
for the components), trains its transformer and text encoder on clips rendered
on the fly by :mod:`dit_accel.models.clips`, and saves it in Diffusers folder
format with a ``train_log.json`` (settings, loss curve, wall time, evaluation).

Recipe (rectified flow, the objective ``FlowMatchEulerDiscreteScheduler`` samples):
``x_t = (1 - s) x_0 + s noise``, the transformer predicts the velocity
``noise - x_0`` at timestep ``1000 s``, with

- ``s`` logit-normal (sigmoid of a standard normal): most steps in mid noise;
- AdamW at a high peak learning rate, linear warm-up then cosine decay;
- an exponential moving average of the weights, which is what gets saved;
- 10 % empty prompts, so classifier-free guidance (the pipeline's negative
  prompt ``""``) has an unconditional model to push away from;
- text embeddings zero-padded to a random length per step (as the pipeline pads
  to ``max_sequence_length``), so any ``max_sequence_length`` gives the same videos.

Everything is drawn from ``--seed``; the same command gives the same weights on
the same machine and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .._util import portable_path
from ..atomic_files import atomic_folder, atomic_write_json
from .attention_locality import AttentionLocality
from .clips import COLOURS, DIRECTIONS, SHAPES, make_prompt, render_batch
from .tiny_shapes import TINY_SHAPES_DEFAULTS
from .train_tiny_checks import checked_numbers, checked_out_dir, checked_shape, flag_words, usage_error

__all__ = ["TRANSFORMER_CONFIG", "TEXT_ENCODER_CONFIG", "HEADS", "transformer_config", "build_pipeline",
           "build_pixel_codec", "pack_latents", "checked_out_dir", "train", "main"]

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=6,  # the pixel codec's latent: two RGB frames per latent frame
    out_channels=6,
    text_dim=64,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
TEXT_ENCODER_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                           relative_attention_num_buckets=8, relative_attention_max_distance=16,
                           dropout_rate=0.0)
SCHEDULER_SHIFT = 3.0
_WORDS = ["a", "an", "moving", *COLOURS, *SHAPES, *DIRECTIONS]
_PAD_LENGTHS = (8, 16, 32, 64, 226)  # 226: WanPipeline's default max_sequence_length
_UNCOND_PROB = 0.1
NOISE_LEVELS = ("logit-normal", "uniform")  # laws of the training noise levels (before the shift)
PRECISIONS = ("fp32", "bf16")  # of the training passes (bf16: autocast, the weights stay fp32)
HEADS = (4, 8, 16)  # heads per layer a model trained from scratch may have (transformer_config)
_SHORT_FRAMES = 3  # curriculum: frames of the cheap first phase (2 latent frames)


# ----------------------------------------------------------------------------- pixel codec (the "vae")
_CARRIER = 1000.0  # constant channel that makes the RMS norms of the heads (almost exactly) linear
_CODEC_DIM = 14


def build_pixel_codec(latents_mean, latents_std):
    """A stock :class:`~diffusers.AutoencoderKLWan` with hand-set weights that is an exact pixel codec.

    encode: 2x2 average pooling, then frames paired into channels (latent frame 0 =
    frame 0 twice, latent frame t = frames 2t-1 and 2t): ``[B, 3, 1+2k, H, W]`` in
    [-1, 1] -> ``[B, 6, 1+k, H/2, W/2]`` (Wan's encoder chunking needs ``1+4k`` frames).
    decode: the inverse with nearest-neighbour upsampling, any latent length.
    Both match :func:`pack_latents` / nearest upsampling to ~1e-6.

    How: every convolution uses only its current-frame, centre tap, residual and
    attention branches are zeroed, so the network is linear up to each head
    (RMS norm, SiLU). There each value travels as a +v / -v channel pair, and
    ``SiLU(a) - SiLU(-a) = a`` exactly; a constant carrier channel of size 1000 makes
    the RMS norm divide by a constant (relative error ``|v|^2 / 1000^2``).

    Example::

        vae = build_pixel_codec([0.0] * 6, [1.0] * 6)
        z = vae.encode(video).latent_dist.mode()   # video [1, 3, 9, 48, 48] -> [1, 6, 5, 24, 24]
    """
    from diffusers import AutoencoderKLWan
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanRMS_norm

    vae = AutoencoderKLWan(base_dim=_CODEC_DIM, z_dim=6, dim_mult=[1, 1], num_res_blocks=0, attn_scales=[],
                           temperal_downsample=[True], latents_mean=[float(v) for v in latents_mean],
                           latents_std=[float(v) for v in latents_std], scale_factor_temporal=2, scale_factor_spatial=2)
    scale = _CARRIER / _CODEC_DIM**0.5  # undoes the heads' RMS norm: x / ||x|| * sqrt(dim), ||x|| ~ carrier
    rgb = range(3)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for m in vae.modules():
            if isinstance(m, WanRMS_norm):
                m.gamma.fill_(1.0)
        _taps(vae.quant_conv, [(c, c, 1.0) for c in range(12)])
        _taps(vae.post_quant_conv, [(c, c, 1.0) for c in range(6)])
        # Working layout: A+ 0-2, A- 3-5, B+ 6-8, B- 9-11, carrier 12 (A, B: the two frames of a latent frame).
        enc = vae.encoder
        _taps(enc.conv_in, [(o + c, c, sign) for c in rgb for o, sign in ((0, 1.0), (3, -1.0), (6, 1.0), (9, -1.0))])
        enc.conv_in.bias[12] = _CARRIER
        down = enc.down_blocks[0]
        down.resample[1].weight[range(13), range(13), 0:2, 0:2] = 0.25  # stride-2 conv = 2x2 average pool
        # Time conv, stride 2 over (previous, first, second) of each pair: A from the first, B from the second.
        _taps(down.time_conv, [(c, c, 1.0) for c in range(6)], tap=1)
        _taps(down.time_conv, [(c, c, 1.0) for c in range(6, 13)], tap=2)
        _taps(enc.conv_out, [(c, c, scale) for c in rgb] + [(c, c + 3, -scale) for c in rgb]
              + [(3 + c, 6 + c, scale) for c in rgb] + [(3 + c, 9 + c, -scale) for c in rgb])
        enc.conv_out.bias[6:] = -30.0  # log-variance: the posterior is a point mass
        dec = vae.decoder
        _taps(dec.conv_in, [(o + c, z + c, sign) for c in rgb for z, o, sign in
                            ((0, 0, 1.0), (0, 3, -1.0), (3, 6, 1.0), (3, 9, -1.0))])
        dec.conv_in.bias[12] = _CARRIER
        up = dec.up_blocks[0].upsamplers[0]
        # Its time conv emits two frames' channels (first half, second half): A then B, each with the carrier.
        _taps(up.time_conv, [(c, c, 1.0) for c in range(6)] + [(_CODEC_DIM + c, 6 + c, 1.0) for c in range(6)]
              + [(12, 12, 1.0), (_CODEC_DIM + 12, 12, 1.0)])
        _taps(up.resample[1], [(c, c, 1.0) for c in range(6)] + [(6, 12, 1.0)])  # -> v+ 0-2, v- 3-5, carrier 6
        _taps(dec.up_blocks[1].resnets[0].conv_shortcut, [(c, c, 1.0) for c in range(7)])
        _taps(dec.conv_out, [(c, c, scale) for c in rgb] + [(c, c + 3, -scale) for c in rgb])
    return vae.eval()


def _taps(conv, entries, tap=None) -> None:
    """Set ``weight[out, in]`` at the centre spatial tap and the current (last) or given time tap."""
    w = conv.weight
    index = (w.shape[-2] // 2, w.shape[-1] // 2)
    if w.dim() == 5:
        index = (w.shape[2] - 1 if tap is None else tap, *index)
    for out_ch, in_ch, value in entries:
        w[(out_ch, in_ch, *index)] = value


def pack_latents(video: torch.Tensor) -> torch.Tensor:
    """The pixel codec's encoding, fast: ``[B, F, H, W, 3]`` in [0, 1] (F odd) -> ``[B, 6, (F+1)/2, H/2, W/2]``.

    Equals ``build_pixel_codec(...).encode(x).latent_dist.mode()`` for ``x`` in [-1, 1]
    (before the ``latents_mean`` / ``latents_std`` normalisation).
    """
    if video.shape[1] % 2 != 1:
        raise ValueError(f"the pixel codec needs an odd frame count, got {video.shape[1]}")
    x = F.avg_pool3d(video.permute(0, 4, 1, 2, 3) * 2 - 1, (1, 2, 2))
    first = x[:, :, :1]
    return torch.cat([torch.cat([first, x[:, :, 1::2]], 2), torch.cat([first, x[:, :, 2::2]], 2)], 1)


# ----------------------------------------------------------------------------- pipeline
def _build_tokenizer():
    """Word-level tokenizer over the prompt grammar's words (anything else is ``<unk>``), ``</s>`` appended."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "</s>", "<unk>", *_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, padding_side="right")


def transformer_config(heads: int = 4) -> dict:
    """:data:`TRANSFORMER_CONFIG` with ``heads`` heads of the same total width (128): 4 (the shipped models), 8 or
    16; ValueError otherwise (a head needs at least 8 dimensions for the rotary embedding's three axes)."""
    width = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
    if heads not in HEADS:
        raise ValueError(f"heads={heads!r} is not allowed: 4, 8 or 16 (heads of {width} dimensions in all)")
    return dict(TRANSFORMER_CONFIG, num_attention_heads=heads, attention_head_dim=width // heads)


def build_pipeline(latents_mean, latents_std, seed: int = 0, heads: int = 4):
    """A fresh (untrained) ``tiny-shapes`` :class:`~diffusers.WanPipeline`; weights drawn from ``seed``; ``heads``
    attention heads per layer sharing the same width (:func:`transformer_config`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _build_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               decoder_start_token_id=tokenizer.pad_token_id, **TEXT_ENCODER_CONFIG))
    transformer = WanTransformer3DModel(**transformer_config(heads))
    with torch.no_grad():  # zero output layer: the first predictions are 0, a calm start for a high learning rate
        transformer.proj_out.weight.zero_()
        transformer.proj_out.bias.zero_()
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer,
                       vae=build_pixel_codec(latents_mean, latents_std),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT))


def _encode_text(pipe, prompts, length: int) -> torch.Tensor:
    """What ``WanPipeline.encode_prompt`` returns, with gradients: masked outputs zero-padded to ``length``."""
    ids = pipe.tokenizer(prompts, padding="longest", return_tensors="pt").to(pipe.text_encoder.device)
    hidden = pipe.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state
    hidden = hidden * ids.attention_mask[..., None]
    return F.pad(hidden, (0, 0, 0, length - hidden.shape[1]))


def _latent_stats(frames: int, height: int, width: int, seed: int):
    """Per-channel mean / std of the codec's latents over 512 clips (stored in the vae config)."""
    g = torch.Generator().manual_seed(seed + 1)
    n = 512
    ids = [torch.randint(0, len(t), (n,), generator=g) for t in (COLOURS, SHAPES, DIRECTIONS)]
    z = pack_latents(render_batch(*ids, generator=g, frames=frames, height=height, width=width))
    rgb_mean = z[:, :3].mean(dim=(0, 2, 3, 4))
    rgb_std = z[:, :3].std(dim=(0, 2, 3, 4))
    # Both frames of a latent frame share the statistics of the RGB channels.
    return [round(v, 4) for v in rgb_mean.tolist() * 2], [round(v, 4) for v in rgb_std.tolist() * 2]


# ----------------------------------------------------------------------------- training
def _sample_batch(g: torch.Generator, batch_size: int, frames: int, mean: torch.Tensor, std: torch.Tensor,
                  full: int = None, size: int = None, object_canvas: int = None):
    """Normalised latents of fresh clips cut to their first ``frames`` frames, their prompts (10 % emptied)
    and a text padding length. Clips are rendered at the full length ``full`` (default: the shipped
    ``num_frames``), so speeds do not depend on ``frames``, on ``size`` x ``size`` pixel canvases (default: the
    shipped height and width), objects sized by ``object_canvas`` (:func:`~.clips.render_batch`)."""
    height, width = (size, size) if size else (TINY_SHAPES_DEFAULTS[k] for k in ("height", "width"))
    full = full or TINY_SHAPES_DEFAULTS["num_frames"]
    ids = [torch.randint(0, len(t), (batch_size,), generator=g) for t in (COLOURS, SHAPES, DIRECTIONS)]
    video = render_batch(*ids, generator=g, frames=full, height=height, width=width,
                         object_canvas=object_canvas)[:, :frames]
    latents = (pack_latents(video) - mean) / std
    names = [list(COLOURS), list(SHAPES), list(DIRECTIONS)]
    prompts = [make_prompt(*(table[i] for table, i in zip(names, triple))) for triple in zip(*(i.tolist() for i in ids))]
    keep = torch.rand(batch_size, generator=g) >= _UNCOND_PROB
    prompts = [p if k else "" for p, k in zip(prompts, keep.tolist())]
    length = _PAD_LENGTHS[int(torch.randint(len(_PAD_LENGTHS), (1,), generator=g))]
    return latents, prompts, length


def _learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 5 % of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _flow_matching_inputs(pipe, latents, prompts, length, g: torch.Generator, noise_levels: str = "logit-normal"):
    """The transformer's keyword arguments for one noisy batch, and its target (the velocity). ``noise_levels``:
    ``u`` logit-normal (most steps in mid noise) or uniform (ten times more low-noise steps), then shifted."""
    if noise_levels == "uniform":
        u = torch.rand(latents.shape[0], generator=g)
    else:
        u = torch.sigmoid(torch.randn(latents.shape[0], generator=g))  # logit-normal
    sigma = SCHEDULER_SHIFT * u / (1 + (SCHEDULER_SHIFT - 1) * u)  # shifted like the sampler's noise levels
    noise = torch.randn(latents.shape, generator=g)
    s = sigma.view(-1, 1, 1, 1, 1)
    text = _encode_text(pipe, prompts, length)
    device = pipe.transformer.device  # drawn on the CPU generator above, so any device trains on the same draws
    inputs = {"hidden_states": ((1 - s) * latents + s * noise).to(device), "timestep": (sigma * 1000).to(device),
              "encoder_hidden_states": text, "return_dict": False}
    return inputs, (noise - latents).to(device)  # velocity: what FlowMatchEulerDiscreteScheduler integrates


def _flow_matching_loss(pipe, latents, prompts, length, g: torch.Generator, local=None,
                        noise_levels: str = "logit-normal", locality=None) -> torch.Tensor:
    """Flow-matching MSE of one batch; with ``local`` (``(handle, weight, pull, max_noise)``: a sparse method applied
    to the transformer) the dense and the sparse prediction of the same noisy batch both learn the velocity, and the
    sparse one learns the dense one's prediction too (``weight``), so dense attention learns not to need what the
    sparse pattern leaves out. ``pull="both"`` also pulls the dense prediction to the sparse one: dense attention
    is pushed to ignore what the pattern leaves out, not only left free to. The sparse terms cover the samples at
    noise levels up to ``max_noise`` only (the dense term covers all)."""
    inputs, target = _flow_matching_inputs(pipe, latents, prompts, length, g, noise_levels)
    if locality is not None:
        return _locality_loss(pipe, inputs, target, *locality)
    if local is None:
        return F.mse_loss(pipe.transformer(**inputs)[0], target)
    handle, weight, pull, max_noise = local
    with handle.bypassed():
        dense = pipe.transformer(**inputs)[0]
    loss = F.mse_loss(dense, target)
    # The sparse terms only for the samples at or below max_noise: the noise levels a plan with dense warm-up
    # steps runs sparse at (above it, one object's place is a decision of the whole video).
    rows = (inputs["timestep"] <= max_noise * 1000).nonzero().flatten()
    if rows.numel() == 0:
        return loss
    sub = {k: v[rows] if torch.is_tensor(v) else v for k, v in inputs.items()}
    sparse = pipe.transformer(**sub)[0]
    teacher = dense[rows] if pull == "both" else dense[rows].detach()
    return loss + F.mse_loss(sparse, target[rows]) + weight * F.mse_loss(sparse, teacher)


def _locality_loss(pipe, inputs, target, watcher, weight: float, max_noise) -> torch.Tensor:
    """Flow-matching MSE plus ``weight`` x the dense attention mass outside the locality pattern
    (:class:`~.attention_locality.AttentionLocality`), averaged over the samples at or below ``max_noise``.

    ``max_noise``: one noise level (the watcher has one pattern), or one per pattern of the watcher (a schedule,
    narrower windows at lower noise): each sample is held to the pattern of the lowest level at or above its
    noise. The term's value is kept in ``watcher.last`` for the log (None when no sample was low enough)."""
    with watcher:
        pred = pipe.transformer(**inputs)[0]
        outside = watcher.outside()
    loss = F.mse_loss(pred, target)
    levels = torch.tensor(list(max_noise) if isinstance(max_noise, (tuple, list)) else [max_noise],
                          dtype=torch.float64, device=inputs["timestep"].device) * 1000
    outside = outside.reshape(len(levels), -1)  # [patterns, B]
    eligible = inputs["timestep"].double()[None, :] <= levels[:, None]
    rows = eligible.any(dim=0)
    if not bool(rows.any()):
        watcher.last = None
        return loss
    choice = torch.where(eligible, levels[:, None], torch.full_like(eligible, float("inf"), dtype=levels.dtype))
    term = outside.gather(0, choice.argmin(dim=0)[None])[0][rows].mean()
    watcher.last = float(term.detach())
    return loss + weight * term


def _locality_schedule(locality, max_noise: float):
    """``((level, method), ...)`` by falling level: a method alone is held at noise levels up to ``max_noise``; a
    sequence of ``(level, method)`` pairs is a schedule (each sample under the pattern of the lowest level at or
    above its noise). ValueError for a level outside (0, 1] or a method whose pattern the term cannot use."""
    from .attention_locality import check_pattern_method

    pairs = [(max_noise, locality)] if not isinstance(locality, (tuple, list)) else [tuple(p) for p in locality]
    for level, method in pairs:
        if not 0.0 < float(level) <= 1.0:
            raise ValueError(f"a locality noise level must be in (0, 1], got {level}")
        check_pattern_method(method)
    return tuple(sorted(((float(level), method) for level, method in pairs), key=lambda p: -p[0]))


def train(out_dir, *, steps: int = 3600, batch_size: int = 16, lr: float = 1.5e-3, warmup: int = 100,
          short_fraction: float = 0.65, ema_decay: float = 0.998, seed: int = 0, log_every: int = 25,
          eval_seeds=(0, 1), save_every: int = 0, frames: int = None, size: int = None, object_canvas: int = None,
          init=None,
          time_limit: float = None, local=None, local_weight: float = 1.0, local_pull: str = "sparse",
          local_max_noise: float = 1.0, locality=None, locality_weight: float = 1.0, locality_queries: int = 256,
          noise_levels: str = "logit-normal", heads: int = 4, device: str = "cpu",
          precision: str = "fp32") -> dict:
    """Train and save the ``tiny-shapes`` pipeline to ``out_dir``; returns the training log.

    The first ``short_fraction`` of the steps train on the first 3 frames of each
    clip (2 latent frames: 288 tokens, ~0.4x the cost of a step at the full 7 frames)
    to learn colours, shapes and positions cheaply; the rest train at the full length.
    The saved weights are the moving average (EMA) of the transformer and text
    encoder. ``out_dir/train_log.json`` records the settings, loss every
    ``log_every`` steps, wall time, machine load and the evaluation of
    :func:`dit_accel.models.tiny_shapes.evaluate` over ``eval_seeds`` (skipped if empty).
    ``save_every`` > 0 also saves the EMA weights every that many steps (a run cut short
    leaves its latest checkpoint in ``out_dir``).

    Fine-tuning: ``frames`` (odd, default ``TINY_SHAPES_DEFAULTS["num_frames"]``) is the clip length of the
    full-length phase and of the closing evaluation, ``size`` (a multiple of 16, default 48) the side of its square
    frames, ``object_canvas`` the canvas whose proportions size the objects and their travel (default ``size``:
    objects grow with the canvas; 48 keeps tiny-shapes' objects on a larger canvas); ``init`` a saved pipeline folder to start from (its
    tokenizer, codec and latent normalisation are kept; optimizer and EMA start fresh from its weights);
    ``time_limit`` (seconds) stops the loop early, then saves and evaluates as at the end
    (``train_log.json`` records ``steps_done``). Without them the run is the one that made the shipped weights.

    Locality: ``local`` (a :class:`dit_accel.Method`, e.g. a per-head ``Tile``) trains every step twice on the same
    noisy batch, dense and under the method, and pulls the sparse prediction to the dense one (``local_weight``):
    the saved model is a stock dense model whose attention does not need what the method leaves out, the property
    real video DiTs have and sparse plans rely on (``train_log.json`` records the method). ``local_pull="both"``
    pulls the dense prediction to the sparse one as well (the two meet in the middle). ``local_max_noise`` (in (0, 1])
    trains the sparse path only at noise levels up to it, the steps a plan with a dense warm-up runs sparse: above
    it, where to put the one object is a decision of the whole video that windows cannot make.

    Attention locality: ``locality`` (a Tile or GNA config, or a schedule of ``(max noise, config)`` pairs) adds
    ``locality_weight`` x the share of the dense attention that falls outside the pattern to the loss
    (:class:`~.attention_locality.AttentionLocality`, ``locality_queries`` sampled queries per call), for the samples
    at or below ``local_max_noise`` (a schedule: each sample under the pattern of the lowest level at or above its
    noise). It moves where the model attends, not what it predicts; ``train_log.json`` records it and the curve its
    value (``outside``).

    Noise levels: ``noise_levels="uniform"`` draws the training noise levels uniformly before the shift instead of
    logit-normal: about 8 % of the steps below noise 0.2 instead of under 1 %, the levels that clean the last detail.

    Device: ``device`` (e.g. ``"cuda"``) runs the transformer and text encoder there; clips, noise and every random
    draw stay on the CPU generator, so a GPU run sees the same batches (its weights differ by the device's arithmetic).
    The closing evaluation runs on the device too; the saved folder loads on any device. ``precision="bf16"`` runs
    the forward and backward passes under bf16 autocast (fp32 weights, optimizer and EMA): on a GPU, flash attention
    instead of fp32 attention.

    Example::

        train("/tmp/tiny-shapes", steps=200)   # a quick smoke run
    """
    out_dir = checked_out_dir(out_dir, init)
    _check_choices(init=init, heads=heads, local_max_noise=local_max_noise, precision=precision,
                   noise_levels=noise_levels, local=local, locality=locality)
    frames, canvas = checked_shape(frames, size, object_canvas, local_pull)
    checked_numbers(steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, short_fraction=short_fraction,
                    ema_decay=ema_decay, save_every=save_every, time_limit=time_limit, local_weight=local_weight,
                    locality_weight=locality_weight, locality_queries=locality_queries)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                "short_fraction": short_fraction, "short_frames": _SHORT_FRAMES, "ema_decay": ema_decay,
                "seed": seed, "threads": torch.get_num_threads(), "scheduler_shift": SCHEDULER_SHIFT,
                "uncond_prob": _UNCOND_PROB, "pad_lengths": _PAD_LENGTHS, "size": TINY_SHAPES_DEFAULTS,
                "heads": heads, "device": str(device), "precision": precision, "frames": frames, "canvas": canvas,
                "object_canvas": object_canvas or canvas, "init": None if init is None else portable_path(init, out_dir),
                "time_limit": time_limit, "local": None if local is None else local.to_dict(),
                "local_weight": local_weight, "local_pull": local_pull, "local_max_noise": local_max_noise,
                "noise_levels": noise_levels, "locality": None if locality is None else _locality_record(locality),
                "locality_weight": locality_weight, "locality_queries": locality_queries}
    pipe, mean, std = _starting_pipeline(init, frames, seed, size, heads)
    pipe.to(device)
    loop = _Loop(pipe, settings, local, locality, size, object_canvas, (mean, std))
    print(f"training tiny-shapes: {steps} steps of {batch_size} clips on {device} ({torch.get_num_threads()} threads) -> "
          f"{out_dir}; mean loss every {log_every} steps below (JSON lines)", file=sys.stderr, flush=True)
    load_start = os.getloadavg()
    loop.run(log_every, save_every, out_dir)
    loop.finish()
    log = {"settings": settings, "steps_done": loop.steps_done, "train_seconds": round(loop.seconds, 1),
           "loadavg_1_5_15_start": load_start, "loadavg_1_5_15_end": os.getloadavg(),
           "parameters": {"transformer": _count(pipe.transformer), "text_encoder": _count(pipe.text_encoder)},
           "curve": loop.curve, "init_log": _init_log(init)}
    return _save_and_evaluate(pipe, out_dir, log, eval_seeds, frames, size)


class _Loop:
    """The training loop of :func:`train` and its state: the optimizer, the EMA weights, the method handle of
    ``local`` and the watcher of ``locality``, the loss curve."""

    def __init__(self, pipe, settings: dict, local, locality, size, object_canvas, normalisation) -> None:
        self.pipe, self.s, self.local, self.size, self.object_canvas = pipe, settings, local, size, object_canvas
        self.mean, self.std = normalisation
        self.params = [p for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters()]
        self.ema = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings["lr"], betas=(0.9, 0.99), weight_decay=0.01,
                                           fused=True)
        self.g = torch.Generator().manual_seed(settings["seed"])
        self.handle = _apply(pipe, local)
        schedule = None if locality is None else _locality_schedule(locality, settings["local_max_noise"])
        self.watcher = None if schedule is None else (
            AttentionLocality(pipe.transformer, tuple(m for _, m in schedule), queries=settings["locality_queries"],
                              generator=self.g),
            settings["locality_weight"], tuple(level for level, _ in schedule))
        self.curve, self.steps_done, self.seconds = [], 0, 0.0

    def step(self, step: int) -> float:
        """One optimizer step and the EMA update; returns the loss."""
        s = self.s
        clip_frames = _SHORT_FRAMES if step < s["short_fraction"] * s["steps"] else s["frames"]
        batch = _sample_batch(self.g, s["batch_size"], clip_frames, self.mean, self.std, s["frames"], self.size,
                              self.object_canvas)
        local = None if self.handle is None else (self.handle, s["local_weight"], s["local_pull"], s["local_max_noise"])
        with torch.autocast(torch.device(s["device"]).type, dtype=torch.bfloat16, enabled=s["precision"] == "bf16"):
            loss = _flow_matching_loss(self.pipe, *batch, self.g, local, s["noise_levels"], self.watcher)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params],
                                 1 - min(s["ema_decay"], (1 + step) / (10 + step)))
        return loss.item()

    def run(self, log_every: int, save_every: int, out_dir: Path) -> None:
        """The steps (until ``time_limit``), a curve point every ``log_every``, a checkpoint every ``save_every``."""
        s = self.s
        window, outside, start = [], [], time.perf_counter()  # outside: the locality term since the last point
        for step in tqdm(range(s["steps"]), desc="training tiny-shapes", unit="step", file=sys.stderr,
                         mininterval=2.0, dynamic_ncols=True):
            for group in self.optimizer.param_groups:
                group["lr"] = _learning_rate(step, s["steps"], s["lr"], s["warmup"])
            if s["time_limit"] is not None and time.perf_counter() - start >= s["time_limit"]:
                break
            window.append(self.step(step))
            if self.watcher is not None and self.watcher[0].last is not None:
                outside.append(self.watcher[0].last)
            self.steps_done = step + 1
            if (step + 1) % log_every == 0 or step + 1 == s["steps"]:
                self.curve.append(_curve_point(step + 1, window, self.optimizer, time.perf_counter() - start, outside))
                window, outside = [], []
                tqdm.write(json.dumps(self.curve[-1]), file=sys.stdout)
            if save_every and (step + 1) % save_every == 0 and step + 1 < s["steps"]:
                self.checkpoint(out_dir)
        self.seconds = time.perf_counter() - start
        if window:  # a run stopped by time_limit between two log points
            self.curve.append(_curve_point(self.steps_done, window, self.optimizer, self.seconds, outside))

    def checkpoint(self, out_dir: Path) -> None:
        """The EMA weights saved to ``out_dir`` (the stock model: nothing of the method in it)."""
        if self.handle is not None:
            self.handle.remove()
        _save_ema(self.pipe, self.params, self.ema, out_dir)
        self.handle = _apply(self.pipe, self.local)

    def finish(self) -> None:
        """The EMA weights into the model, the method removed, eval mode: the model to save."""
        if self.handle is not None:
            self.handle.remove()
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e)
        self.pipe.transformer.eval()
        self.pipe.text_encoder.eval()


def _save_and_evaluate(pipe, out_dir: Path, log: dict, eval_seeds, frames: int, size) -> dict:
    """Save the trained pipeline, score it over ``eval_seeds`` at the run's clip length and canvas, and write
    ``train_log.json`` beside it: all in a temporary sibling folder that then replaces ``out_dir`` whole
    (:func:`~dit_accel.atomic_files.atomic_folder`), so the weights and the log of a finished run are one commit. A
    run killed before it leaves the previous folder (an earlier run, or this run's last checkpoint), never new
    weights beside an old log."""
    from .tiny_shapes import evaluate

    with atomic_folder(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        _portable_folder(tmp)
        if eval_seeds:
            pipe.set_progress_bar_config(disable=True)
            canvas = {"height": size, "width": size} if size else {}
            log["eval"] = evaluate(pipe, seeds=tuple(eval_seeds), num_frames=frames, **canvas)
        atomic_write_json(tmp / "train_log.json", log, indent=1)
    return log


def _check_choices(*, init, heads, local_max_noise, precision, noise_levels, local, locality) -> None:
    """ValueError, before anything is built or written, for a head count, noise limit, precision, noise law or pair
    of locality terms that :func:`train` cannot take."""
    transformer_config(heads)
    if init and heads != 4:
        raise ValueError("heads applies to a model trained from scratch; a fine-tune (init) keeps its model's heads")
    if not 0.0 < local_max_noise <= 1.0:
        raise ValueError(f"local_max_noise must be in (0, 1], got {local_max_noise}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if noise_levels not in NOISE_LEVELS:
        raise ValueError(f"noise_levels must be one of {NOISE_LEVELS}, got {noise_levels!r}")
    if local is not None and locality is not None:
        raise ValueError("local (a sparse prediction pulled to the dense one) and locality (the dense attention held "
                         "inside a pattern) are two ways to the same end; give one")


def _curve_point(step: int, window: list, optimizer, seconds: float, outside: list = ()) -> dict:
    """One entry of the loss curve: the mean loss of the steps since the last entry, the learning rate, the time;
    with a locality term, its mean (``outside``: dense attention mass outside the pattern, the eligible samples)."""
    point = {"step": step, "loss": round(sum(window) / len(window), 5), "lr": round(optimizer.param_groups[0]["lr"], 7),
             "seconds": round(seconds, 1)}
    if outside:
        point["outside"] = round(sum(outside) / len(outside), 5)
    return point


def _init_log(init):
    """The ``train_log.json`` of the ``init`` folder (None without ``init`` or without a log there): a fine-tune's log
    carries the whole lineage of its weights, each stage's settings, curve, time and evaluation."""
    path = Path(init) / "train_log.json" if init else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())


def _starting_pipeline(init, frames: int, seed: int, size: int = None, heads: int = 4):
    """``(pipe, latents mean, latents std)`` to train, its transformer and text encoder in train mode: the ``init``
    folder (its codec normalisation kept), or a fresh build normalised by the statistics of ``frames``-frame clips
    (``size`` x ``size`` pixels, default the shipped canvas)."""
    if init:
        pipe = _load_pipeline(init)
        latents_mean, latents_std = pipe.vae.config.latents_mean, pipe.vae.config.latents_std
    else:
        height, width = (size, size) if size else (TINY_SHAPES_DEFAULTS[k] for k in ("height", "width"))
        latents_mean, latents_std = _latent_stats(frames, height, width, seed)
        pipe = build_pipeline(latents_mean, latents_std, seed=seed, heads=heads)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1, 1) for v in (latents_mean, latents_std))
    pipe.transformer.train()
    pipe.text_encoder.train()
    return pipe, mean, std


def _apply(pipe, local):
    """The handle of ``local`` applied to the transformer (``--local``), or None without one."""
    if local is None:
        return None
    import dit_accel

    return dit_accel.apply(pipe.transformer, local)


def _load_pipeline(folder):
    """A saved tiny-shapes-like pipeline (float32, CPU) to fine-tune."""
    import warnings

    from diffusers import DiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32, local_files_only=True)


def _save_ema(pipe, params, ema, out_dir: Path) -> None:
    """Save the pipeline with its EMA weights (a checkpoint: a folder without ``train_log.json``, which replaces
    ``out_dir`` whole), then put the training weights back."""
    with torch.no_grad():
        live = [p.detach().clone() for p in params]
        for p, e in zip(params, ema):
            p.copy_(e)
        with atomic_folder(out_dir) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            _portable_folder(tmp)
        for p, w in zip(params, live):
            p.copy_(w)


def _portable_folder(folder: Path) -> None:
    """Make a saved folder load anywhere: the tokenizer recorded as ``PreTrainedTokenizerFast``, a name
    Transformers 4 and 5 both load (Transformers 5 saves its new alias ``TokenizersBackend``, unknown to 4.x), and
    no ``_name_or_path`` in the configs or the model index (a fine-tune's would name the folder it started from on
    this machine)."""
    index_path, config_path = folder / "model_index.json", folder / "tokenizer" / "tokenizer_config.json"
    index, config = json.loads(index_path.read_text()), json.loads(config_path.read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    index.pop("_name_or_path", None)  # the folder a fine-tune started from, on the machine that trained it
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_json(index_path, index)
    atomic_write_json(config_path, config)
    for path in sorted(folder.glob("*/config.json")) + sorted(folder.glob("*/scheduler_config.json")):
        found = json.loads(path.read_text())
        if "_name_or_path" in found:
            del found["_name_or_path"]
            atomic_write_json(path, found, indent=2)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv=None) -> None:
    """Command line of :func:`train`."""
    parser = argparse.ArgumentParser(prog="python -m dit_accel.models.train_tiny", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: a new one, or an earlier run's (replaced whole); not inside the package")
    parser.add_argument("--steps", type=int, default=3600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--short-fraction", type=float, default=0.65,
                        help=f"fraction of the steps on {_SHORT_FRAMES}-frame clips (cheap curriculum phase)")
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--save-every", type=int, default=200, help="checkpoint the EMA weights every N steps")
    parser.add_argument("--eval-seeds", type=int, nargs="*", default=[0, 1], help="evaluation seeds (none: skip)")
    parser.add_argument("--frames", type=int, default=TINY_SHAPES_DEFAULTS["num_frames"],
                        help="clip length (odd) of the full-length phase and of the evaluation")
    parser.add_argument("--size", type=int, default=None, metavar="PIXELS",
                        help="side of the square frames (a multiple of 16; default 48)")
    parser.add_argument("--object-canvas", type=int, default=None, metavar="PIXELS",
                        help="objects and their travel sized as on this canvas side (default: --size; 48 draws "
                             "tiny-shapes' objects on a larger canvas)")
    parser.add_argument("--init", default=None, metavar="DIR",
                        help="start from this saved pipeline (e.g. the shipped tiny-shapes folder): a fine-tune")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="stop the loop after this wall time, then save and evaluate")
    parser.add_argument("--local", default=None, metavar="JSON",
                        help="train dense and under this method on every batch, the sparse prediction pulled to the "
                             "dense one, e.g. '{\"method\": \"tile\", \"tile\": [4, 4, 4], \"window\": [3, 1, 3]}'")
    parser.add_argument("--local-weight", type=float, default=1.0,
                        help="weight of the sparse-to-dense term of --local (default 1)")
    parser.add_argument("--noise-levels", choices=NOISE_LEVELS, default=NOISE_LEVELS[0],
                        help="how training noise levels are drawn before the shift (uniform: more low-noise steps)")
    parser.add_argument("--local-pull", choices=("sparse", "both"), default="sparse",
                        help="--local's consistency term moves the sparse prediction only (default), or both")
    parser.add_argument("--local-max-noise", type=float, default=1.0, metavar="SIGMA",
                        help="--local's sparse terms only on samples at or below this noise level (0-1, default 1: "
                             "all); e.g. 0.94 for a plan whose first 2 of 12 steps are dense")
    parser.add_argument("--locality", default=None, metavar="JSON",
                        help="add the dense attention mass outside this method's pattern (tile or gna) to the loss, "
                             "e.g. '{\"method\": \"tile\", \"tile\": [1, 8, 8], \"window\": [3, 1, 1]}' "
                             "(--local-max-noise limits it to the low-noise samples), or a schedule of "
                             "[max noise, method] pairs: each sample under the pattern of the lowest level at or above "
                             "its noise")
    parser.add_argument("--heads", type=int, default=4, choices=HEADS,
                        help="attention heads per layer of a model trained from scratch, same total width (default 4)")
    parser.add_argument("--device", default="cpu",
                        help="where the transformer and text encoder train, e.g. cuda (default cpu; clips and noise are "
                             "drawn on the CPU either way)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: forward and backward under bf16 autocast, fp32 weights (default fp32)")
    parser.add_argument("--locality-weight", type=float, default=1.0, help="weight of the --locality term (default 1)")
    parser.add_argument("--locality-queries", type=int, default=256,
                        help="queries sampled per self-attention call for the --locality term (default 256)")
    args = parser.parse_args(argv)
    local, locality = (_method_arg(parser, flag, text) for flag, text in (("--local", args.local),
                                                                           ("--locality", args.locality)))
    try:  # every check train() makes, before the threads are set and anything is built
        checked_out_dir(args.out, args.init)
        _check_choices(init=args.init, heads=args.heads, local_max_noise=args.local_max_noise,
                       precision=args.precision, noise_levels=args.noise_levels, local=local, locality=locality)
        checked_shape(args.frames, args.size, args.object_canvas, args.local_pull)
        checked_numbers(**{k: getattr(args, k) for k in ("steps", "batch_size", "lr", "warmup", "short_fraction",
                                                          "ema_decay", "save_every", "time_limit", "local_weight",
                                                          "locality_weight", "locality_queries")})
    except ValueError as err:
        usage_error(parser, flag_words(str(err)))
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    log = train(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                short_fraction=args.short_fraction, ema_decay=args.ema_decay, seed=args.seed,
                eval_seeds=args.eval_seeds, save_every=args.save_every, frames=args.frames, size=args.size,
                object_canvas=args.object_canvas, init=args.init,
                time_limit=args.time_limit, local=local, local_weight=args.local_weight, local_pull=args.local_pull,
                local_max_noise=args.local_max_noise, locality=locality, locality_weight=args.locality_weight,
                locality_queries=args.locality_queries, noise_levels=args.noise_levels, heads=args.heads,
                device=args.device, precision=args.precision)
    print(json.dumps({k: log[k] for k in ("steps_done", "train_seconds", "parameters")} | {"eval": log.get("eval")}, indent=1))


def _locality_record(locality):
    """What the log records of ``locality``: the method's dict, or ``[[level, dict], ...]`` for a schedule."""
    if isinstance(locality, (tuple, list)):
        return [[float(level), method.to_dict()] for level, method in locality]
    return locality.to_dict()


_METHOD_EXAMPLE = 'a JSON object naming a method, e.g. \'{"method": "tile", "tile": [4, 4, 4], "window": [3, 1, 3]}\''


def _method_arg(parser, flag: str, text):
    """The method config of a JSON command-line value (None without one); a bad one is a usage error naming ``flag``."""
    if text is None:
        return None
    from ..checkpoints.finetuned import method_from_dict
    from .attention_locality import check_pattern_method

    try:
        value = json.loads(text)
        schedule = flag == "--locality" and isinstance(value, list) and value
        if not schedule and not (isinstance(value, dict) and "method" in value):
            raise ValueError(f"got {text!r}; expected {_METHOD_EXAMPLE}"
                             + (" (or a schedule of [max_noise, method] pairs)" if flag == "--locality" else ""))
        if flag == "--locality" and isinstance(value, list):  # a schedule: [[max noise, method], ...]
            if not value or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[1], dict) for p in value):
                raise ValueError("a schedule is a list of [max_noise, {\"method\": ...}] pairs")
            pairs = [(float(level), method_from_dict(d)) for level, d in value]
            _locality_schedule(pairs, 1.0)
            return pairs
        method = method_from_dict(value)
        if flag == "--locality":
            check_pattern_method(method)
        return method
    except (ValueError, TypeError, KeyError) as err:
        usage_error(parser, f"{flag}: {err}")


if __name__ == "__main__":
    main()
