"""Tiny random-weight Diffusers pipelines and transformers for offline smoke runs and tests.

``build_tiny_pipeline("tiny-wan")`` returns a real :class:`diffusers.WanPipeline`
(``"tiny-flux"``: :class:`diffusers.FluxPipeline`) whose transformer, VAE and
text encoders are a few thousand parameters built from configs, with weights
drawn from a fixed seed and tokenizers built in code. Nothing is downloaded.

The weights are RANDOM: the videos are noise-like patterns. Use these models to
check that a command, a method or an integration runs end to end, never to
judge quality.

Token grids at the suggested sizes (``TINY_DEFAULTS``), big enough for sparse
patterns with 64-token blocks to skip work:

- tiny-wan: 17 frames at 128x128 -> latent (5, 16, 16) (VAE 4x temporal, 8x
  spatial) -> token grid (5, 8, 8) = 320 video tokens after the (1, 2, 2) patch.
- tiny-flux: 64x64 -> latent 32x32 (VAE 2x) -> packed 2x2 -> image grid
  (16, 16) = 256 image tokens, joint attention with 64 T5 text tokens first.
"""

from __future__ import annotations

import torch

from .tiny_shapes import TINY_SHAPES_DEFAULTS, TINY_SHAPES_LABEL, TINY_SHAPES_METHODS

__all__ = [
    "TRANSFORMER_NAMES",
    "TRANSFORMER_GRIDS",
    "TRANSFORMER_TEXT",
    "build_tiny_transformer",
    "tiny_transformer_inputs",
    "TINY_MODELS",
    "TINY_DEFAULTS",
    "TINY_METHOD_DEFAULTS",
    "RANDOM_WEIGHTS_LABEL",
    "EMBEDDED_MODELS",
    "build_tiny_pipeline",
    "is_tiny_model",
    "is_embedded_model",
    "model_label",
]

RANDOM_WEIGHTS_LABEL = "random weights (tiny model for smoke runs; the output is noise, not a real video or image)"

TINY_MODELS = {
    "tiny-wan": "WanPipeline with a 2-layer WanTransformer3DModel, tiny AutoencoderKLWan and UMT5 "
    "encoder; random weights for smoke runs (offline, seconds on a CPU)",
    "tiny-flux": "FluxPipeline with a 1+1-layer FluxTransformer2DModel (joint text-image attention), "
    "tiny AutoencoderKL, CLIP and T5 encoders; random weights for smoke runs (offline)",
}

# Suggested call settings: small enough for a 2-core CPU, big enough for sparsity.
TINY_DEFAULTS = {
    "tiny-wan": {"num_frames": 17, "height": 128, "width": 128, "num_inference_steps": 4, "max_sequence_length": 64},
    "tiny-flux": {"num_frames": 1, "height": 64, "width": 64, "num_inference_steps": 4, "max_sequence_length": 64},
}

# Method settings scaled to the tiny grids above (the paper presets assume grids like
# (21, 30, 52) and 50 steps; on (5, 8, 8) they would be dense or invalid).
TINY_METHOD_DEFAULTS = {
    "tiny-wan": {  # grid (5, 8, 8): one 64-token block per frame
        "tile": {"tile": (1, 8, 8), "window": (3, 1, 1)},  # 3 of 5 frames per query frame
        "gna": {"kernel_size": (3, 6, 6)},
        "radial": {"block_size": 64, "decay": 1.0, "sink_frames": (0,)},
        "sla": {"topk": 0.4},  # 2 of 5 key blocks
    },
    "tiny-flux": {  # image grid (16, 16): four 8x8 tiles
        "tile": {"tile": (8, 8), "window": (1, 1)},
        # A stride-1 window visits all four 64-token blocks of a 16x16 grid (density 1.0);
        # stride = kernel = tile is GNA's blocked special case: perfectly block-sparse, 1 of 4.
        "gna": {"kernel_size": (8, 8), "stride": (8, 8)},
        "sla": {"topk": 0.5},
    },
}


# The trained tiny-shapes model (a Diffusers folder in the package, see tiny_shapes.py) shares the
# tables above: call settings and grid-sized method options by name.
TINY_DEFAULTS["tiny-shapes"] = dict(TINY_SHAPES_DEFAULTS)
TINY_METHOD_DEFAULTS["tiny-shapes"] = {name: dict(options) for name, options in TINY_SHAPES_METHODS.items()}

# Every model that ships with the package, by --model name: trained first (the default of generate).
EMBEDDED_MODELS = {
    "tiny-shapes": f"WanPipeline with a 4-layer WanTransformer3DModel (~1 M parameters); {TINY_SHAPES_LABEL}: "
    "'a {red|green|blue|yellow} {square|circle} moving {left|right|up|down}', 7 frames at 48x48, offline",
    **TINY_MODELS,
}


def is_tiny_model(name) -> bool:
    """A random-weight tiny model built in code (``tiny-wan``, ``tiny-flux``)."""
    return isinstance(name, str) and name in TINY_MODELS


def is_embedded_model(name) -> bool:
    """A model shipped with the package (random-weight tiny models and the trained ``tiny-shapes``): it has
    grid-sized call settings and method options in :data:`TINY_DEFAULTS` / :data:`TINY_METHOD_DEFAULTS`."""
    return isinstance(name, str) and name in EMBEDDED_MODELS


def model_label(name) -> str | None:
    """What an embedded model's output is, for the user: the random-weight warning or the trained label."""
    if is_tiny_model(name):
        return RANDOM_WEIGHTS_LABEL
    return TINY_SHAPES_LABEL if name == "tiny-shapes" else None


def build_tiny_pipeline(name: str, *, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    """Build an embedded tiny pipeline with random weights (no download).

    Args:
        name: ``"tiny-wan"`` or ``"tiny-flux"`` (see :data:`TINY_MODELS`).
        seed: weight seed; the same seed gives bit-identical weights every time.
            The global torch RNG state is left untouched.
        device, dtype: where the pipeline's modules live.

    Example::

        pipe = build_tiny_pipeline("tiny-wan")
        frames = pipe("a cat", num_frames=17, height=128, width=128,
                      num_inference_steps=4, max_sequence_length=32).frames[0]
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    builder = {"tiny-wan": _build_wan, "tiny-flux": _build_flux}[name]
    # fork_rng: weight init draws from the global generator; do not disturb the caller's stream.
    # Builders seed after their imports: a first-time import may itself draw random numbers.
    with torch.random.fork_rng(devices=[]):
        pipe = builder(seed)
    if dtype == torch.float32:
        pipe.to(device=device)
    else:
        # Diffusers warns that some modules "should be kept in float32" on a plain cast;
        # tiny models have no such checkpoint convention, so silence that one warning.
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            pipe.to(device=device, dtype=dtype)
        finally:
            dlog.set_verbosity(level)
    pipe.set_progress_bar_config(leave=False)
    return pipe


# ----------------------------------------------------------------------------- tokenizers
def _byte_tokenizer(*, bos: str | None, eos: str, pad: str, unk: str, model_max_length: int):
    """A byte-level tokenizer without merges: every UTF-8 byte is one token.

    It accepts arbitrary text, supports padding/truncation/attention masks and
    decoding, and is built from code alone (no vocabulary file).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([pad, eos, unk] + ([bos] if bos else [])))  # CLIP: pad is eos
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials)}  # contiguous ids: len(tokenizer) is the vocab size
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    if bos:
        template = f"{bos} $A {eos}"
        special_ids = [(bos, vocab[bos]), (eos, vocab[eos])]
    else:
        template = f"$A {eos}"
        special_ids = [(eos, vocab[eos])]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=special_ids)
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=pad,
        eos_token=eos,
        unk_token=unk,
        model_max_length=model_max_length,
        padding_side="right",
        **kwargs,
    )


def _t5_tokenizer():
    return _byte_tokenizer(bos=None, eos="</s>", pad="<pad>", unk="<unk>", model_max_length=512)


def _tiny_t5_settings(tokenizer) -> dict:
    """Config of the tiny (U)T5 text encoders (Wan uses UMT5, FLUX T5: same fields)."""
    return dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)


# ----------------------------------------------------------------------------- tiny-wan
def _build_wan(seed: int):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(**_tiny_t5_settings(tokenizer))).eval()
    z_dim = 4
    vae = AutoencoderKLWan(
        base_dim=4,  # conv3d is slow on CPU; the decoder dominates the smoke-run time
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],  # 3 downsamples: 8x spatial, like the real Wan VAE
        num_res_blocks=1,
        temperal_downsample=[False, True, True],  # 4x temporal
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    ).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


# ----------------------------------------------------------------------------- tiny-flux
def _build_flux(seed: int):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip_tok = _byte_tokenizer(
        bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<|unk|>", model_max_length=77
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=clip_tok.bos_token_id,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    ).eval()
    t5_tok = _t5_tokenizer()
    t5 = T5EncoderModel(T5Config(**_tiny_t5_settings(t5_tok))).eval()
    latent_channels = 4
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),  # one downsample: 2x, so 64x64 gives 16x16 packed tokens
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    ).eval()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,  # 2x2 packed latents
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


# ----------------------------------------------------------------------------- bare transformers
# One tiny transformer of every supported class, built from a config with a fixed seed, and forward
# kwargs whose latent gives a chosen token grid after patchify: a forward pass takes milliseconds.
TRANSFORMER_NAMES = ("wan", "hunyuan", "cogvideox", "mochi", "ltx", "flux")

# Default token grids: big enough that 64-token blocks and small windows skip work.
TRANSFORMER_GRIDS = {
    "wan": (4, 8, 8),
    "hunyuan": (4, 8, 8),
    "cogvideox": (4, 8, 8),
    "mochi": (4, 8, 8),
    "ltx": (4, 8, 8),
    "flux": (10, 13),
}

_TRANSFORMER_CONFIGS = {
    "wan": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=64)),
    "hunyuan": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6))),
    "cogvideox": ("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=16, sample_height=12, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8)),
    "mochi": ("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=8)),
    "ltx": ("LTXVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=12,
        cross_attention_dim=24, num_layers=2, caption_channels=16)),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))),
}

TRANSFORMER_TEXT = {"wan": 7, "hunyuan": 6, "cogvideox": 8, "mochi": 8, "ltx": 7, "flux": 7}


def build_tiny_transformer(name: str, seed: int = 0):
    """An fp32 eval-mode transformer of class ``name`` (see :data:`TRANSFORMER_NAMES`), random weights.

    Output layers that the config initialises to zero get random values too, so every block
    affects the result (a zero output layer would hide an attention bug).
    """
    import diffusers

    if name not in _TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown tiny transformer {name!r}; choose one of {TRANSFORMER_NAMES}")
    cls_name, config = _TRANSFORMER_CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, cls_name)(**config)
        # Random (not zero-initialised) output layers so every block affects the result.
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.data.normal_(0, 0.05)
    return model.eval()


def tiny_transformer_inputs(name: str, model, grid=None, batch: int = 1, text: int = None, seed: int = 1,
                            text_valid=None):
    """Forward kwargs for ``model`` whose latent has token grid ``grid``.

    ``text_valid``: per-sample valid text lengths (HunyuanVideo/Mochi padding masks).
    """
    grid = tuple(grid or TRANSFORMER_GRIDS[name])
    text = text or TRANSFORMER_TEXT[name]
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    cfg = model.config
    t = torch.full((batch,), 500.0)
    mask = torch.ones(batch, text, dtype=torch.long)
    if text_valid is not None:
        for b, n in enumerate(text_valid):
            mask[b, n:] = 0
    if name == "wan":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, cfg.in_channels, f, 2 * h, 2 * w), timestep=t,
                    encoder_hidden_states=rnd(batch, text, cfg.text_dim), return_dict=False)
    if name == "hunyuan":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, cfg.in_channels, f, 2 * h, 2 * w), timestep=t,
                    encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), encoder_attention_mask=mask,
                    pooled_projections=rnd(batch, cfg.pooled_projection_dim), return_dict=False)
    if name == "cogvideox":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, f, cfg.in_channels, 2 * h, 2 * w), timestep=t.long(),
                    encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), return_dict=False)
    if name == "mochi":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, cfg.in_channels, f, 2 * h, 2 * w), timestep=t,
                    encoder_hidden_states=rnd(batch, text, cfg.text_embed_dim), encoder_attention_mask=mask,
                    return_dict=False)
    if name == "ltx":
        f, h, w = grid
        return dict(hidden_states=rnd(batch, f * h * w, cfg.in_channels), timestep=t,
                    encoder_hidden_states=rnd(batch, text, cfg.caption_channels),
                    encoder_attention_mask=mask, num_frames=f, height=h, width=w, return_dict=False)
    if name == "flux":
        h, w = grid
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
        return dict(hidden_states=rnd(batch, h * w, cfg.in_channels), timestep=t / 1000,
                    encoder_hidden_states=rnd(batch, text, cfg.joint_attention_dim),
                    pooled_projections=rnd(batch, cfg.pooled_projection_dim), img_ids=img_ids,
                    txt_ids=torch.zeros(text, 3), return_dict=False)
    raise KeyError(name)
