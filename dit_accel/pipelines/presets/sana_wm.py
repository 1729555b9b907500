"""SANA-WM (``SanaWMTransformer3DModel``, the camera-controlled world model) and its stage-2 refiner
(``SanaWMLTX2RefinerTransformer3DModel``): both refused.

SANA-WM patchifies ``(B, C, T, H, W)`` latents into one (T, H, W) raster (``SanaWMPatchEmbed``), but its
self-attention ``blocks.*.attn`` is no processor-backed softmax attention: every block but each
``softmax_every_n``-th runs ``BidirectionalGDNUCPESinglePathLiteLA`` (gated-delta-net linear attention, no softmax,
no SDPA), and the softmax blocks (``_SoftmaxUCPESinglePathLiteLA``) call ``F.scaled_dot_product_attention`` from
their own ``forward``, with no attention processor to wrap, in two branches (the main one and the camera one in
UCPE ray space). The text reaches the video by cross-attention (``cross_attn``).

The refiner (LTX-2's blocks, ``SanaWMLTX2Refiner``) denoises 3-frame blocks whose queries attend to
[attention sink, refined history, active block] keys from its KV cache, and its calls carry packed tokens without
a grid (see the reasons)."""

from __future__ import annotations

from ._common import Preset

__all__ = ["PRESETS"]

_WM_REASON = (
    "its self-attention (blocks.*.attn) is no softmax attention dit_accel can wrap: in every block but each "
    "softmax_every_n-th (3 of 4 in the release) it is BidirectionalGDNUCPESinglePathLiteLA, a bidirectional "
    "gated-delta-net linear attention along the time axis (no softmax, no scaled_dot_product_attention call), and "
    "the softmax blocks (_SoftmaxUCPESinglePathLiteLA) have no attention processor: their own forward calls "
    "torch.nn.functional.scaled_dot_product_attention, for the main branch over the (T, H, W) grid and, with "
    "camera_conditions, again for a camera branch in UCPE ray space (head_dim padded for FlashAttention, an "
    "additive bias on invalid frames' keys), and dit_accel intercepts SDPA inside attention processors only. Run "
    "it dense (three quarters of its blocks are already linear-time); its text is cross-attention")

_REFINER_REASON = (
    "none of its calls is self-attention over one token grid: SanaWMLTX2Refiner runs every denoising call with "
    "kv_cache_mode='inject', the queries of the active block (block_size=3 latent frames) against the keys of "
    "[attention sink, refined history, active block] from SanaWMRefinerKVCache at absolute frame positions, and "
    "its other calls only capture that cache; nor do its calls carry a grid to read: hidden_states are packed "
    "(B, N, C) tokens, the frames, height and width only in the caller's video_rotary_emb. Run it dense: its "
    "sliding window (kv_max_frames=11) already bounds each block's attention")

PRESETS = (
    Preset.refusing(
        "SanaWMTransformer3DModel", _WM_REASON, min_diffusers="0.42.1", grid_dims=3,
        notes="SANA-WM; refused (gated-delta-net linear attention; its softmax blocks call SDPA with no processor)",
        hub_words=((r"sana-?wm", None),),  # before Sana's "sana": Efficient-Large-Model/SANA-WM_bidirectional-...
    ),
    Preset.refusing(
        "SanaWMLTX2RefinerTransformer3DModel", _REFINER_REASON, min_diffusers="0.42.1", grid_dims=3,
        notes="SANA-WM stage-2 refiner (LTX-2 blocks); refused (KV-cached sliding-window attention, packed tokens)",
    ),
)
