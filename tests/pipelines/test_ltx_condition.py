"""LTXConditionPipeline's calls of LTX-Video: the token grid read from ``video_coords`` alone, the conditioning
tokens the pipeline prepends ([extra conditioning frames, video]) exact, the video sparse.

Each call is built with the pipeline's own coordinate arithmetic (``_prepare_video_ids``, ``_scale_video_ids``,
the 1/frame_rate time scale) and checked against a masked-dense oracle of the unmodified model in which every
pair involving a conditioning token is allowed and video-video pairs follow the method's raster mask."""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines import presets as P
from tests.utils import method_mask, reference

GRID = T.TRANSFORMER_GRIDS["ltx"]  # (4, 8, 8): 256 video tokens
LAYERS = 2
FRAME_RATE = 25
METHODS = {"tile": dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)),  # 3 of 4 frames per query frame
           "gna": dit_accel.GNA(kernel_size=(3, 6, 6))}


class PrefixReference(TorchFunctionMode):
    """Self-attention SDPA calls of ``prefix + N`` tokens run the dense oracle with the video at ``[prefix, S)``:
    video-video pairs follow ``pattern`` (N x N), every pair involving one of the ``prefix`` tokens is allowed.
    Other calls (cross-attention) pass through; ``calls`` counts the replaced ones."""

    def __init__(self, pattern, prefix):
        super().__init__()
        self.pattern, self.prefix, self.calls = pattern, prefix, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        q, k, v = call["query"], call["key"], call["value"]
        s = q.shape[2]
        if k.shape[2] != s or s != self.prefix + self.pattern.shape[0]:
            return func(*args, **kwargs)
        assert call.get("attn_mask") is None
        allowed = torch.ones(s, s, dtype=torch.bool)
        allowed[self.prefix:, self.prefix:] = self.pattern
        self.calls += 1
        return reference(q, k, v, allowed, call.get("scale"))[0].to(q.dtype)


def _coords(frames, h, w, batch, frame_index=0):
    """``video_coords`` (B, 3, frames*h*w) as LTXConditionPipeline makes them (VAE strides 8 and 32)."""
    from diffusers import LTXConditionPipeline as Pipe

    return Pipe._scale_video_ids(Pipe._prepare_video_ids(batch, frames, h, w), scale_factor=32, scale_factor_t=8,
                                 frame_index=frame_index)


def _condition_call(model, extra_frames=0, frame_index=16, batch=2):
    """The transformer call of LTXConditionPipeline: no num_frames/height/width, ``video_coords`` instead; with
    ``extra_frames``, that many latent frames of a condition at ``frame_index`` prepended (tokens and coords)."""
    kwargs = T.tiny_transformer_inputs("ltx", model, batch=batch)
    for k in ("num_frames", "height", "width"):
        del kwargs[k]
    f, h, w = GRID
    coords = _coords(f, h, w, batch)
    if extra_frames:
        g = torch.Generator().manual_seed(3)
        extra = torch.randn(batch, extra_frames * h * w, model.config.in_channels, generator=g)
        kwargs["hidden_states"] = torch.cat([extra, kwargs["hidden_states"]], 1)
        coords = torch.cat([_coords(extra_frames, h, w, batch, frame_index), coords], 2)
    coords = coords.float()
    coords[:, 0] = coords[:, 0] * (1.0 / FRAME_RATE)
    kwargs["video_coords"] = coords
    return kwargs


def _run(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


@pytest.fixture(scope="module")
def model():
    return T.build_tiny_transformer("ltx")


def test_the_grid_is_read_from_video_coords(model):
    preset = P.PRESETS["LTXVideoTransformer3DModel"]
    assert preset.read_grid(model, _condition_call(model)) == P.GridInfo(GRID, 0)
    assert preset.read_grid(model, _condition_call(model, extra_frames=2)) == P.GridInfo(GRID, 2 * 64)
    # (a condition at frame 1 has the times of the video's frame 1: told apart by where it sits)
    assert preset.read_grid(model, _condition_call(model, 1, frame_index=1)) == P.GridInfo(GRID, 64)
    assert preset.read_grid(model, T.tiny_transformer_inputs("ltx", model)) == P.GridInfo(GRID, 0)  # LTXPipeline's


@pytest.mark.parametrize("extra_frames", [0, 2], ids=["coords-only", "prepended-condition"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_condition_calls_match_the_masked_dense_reference(model, name, extra_frames):
    method = METHODS[name]
    kwargs = _condition_call(model, extra_frames)
    dense = _run(model, kwargs)
    with PrefixReference(method_mask(method, GRID), extra_frames * 64) as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
        warnings = list(handle.warnings)
    assert ref_mode.calls == LAYERS == len(rows) and not warnings, warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert torch.equal(_run(model, kwargs), dense)  # remove() gives the model back


@pytest.mark.parametrize("extra_frames", [0, 2], ids=["coords-only", "prepended-condition"])
def test_dense_gives_the_dense_output(model, extra_frames):
    kwargs = _condition_call(model, extra_frames)
    dense = _run(model, kwargs)
    with dit_accel.apply(model, dit_accel.Dense()) as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert len(rows) == LAYERS and all(r["dense_calls"] == 1 for r in rows), rows
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def _shuffled_video(kwargs):
    coords = kwargs["video_coords"].clone()
    coords[:, :, -64:] = coords[:, :, -64:].flip(2)  # the last frame's tokens in reverse order
    return dict(kwargs, video_coords=coords)


def _tiled_video(kwargs):
    coords = kwargs["video_coords"]  # the last frame in 4 x 4 tiles, tile by tile
    frame = coords[:, :, -64:].reshape(coords.shape[0], 3, 2, 4, 2, 4).permute(0, 1, 2, 4, 3, 5).reshape(-1, 3, 64)
    return dict(kwargs, video_coords=torch.cat([coords[:, :, :-64], frame], 2))


def _partial_condition(kwargs):  # 10 tokens before the video: not whole frames of its raster
    coords = kwargs["video_coords"]
    x = kwargs["hidden_states"]
    return dict(kwargs, video_coords=torch.cat([coords[:, :, :10], coords], 2), hidden_states=torch.cat([x[:, :10], x], 1))


@pytest.mark.parametrize("change, match", [
    (_shuffled_video, r"not \[conditioning frames, a T x H x W raster video\]"),
    (_tiled_video, r"tokens before the .* video are not whole frames of its spatial raster"),
    (_partial_condition, r"74 tokens before the 4 x 8 x 8 video are not whole frames"),
    (lambda kw: dict(kw, video_coords=kw["video_coords"][:, :, 1:]), r"\(B, 3, N\)"),
], ids=["reversed-frame", "tiled-frame", "partial-frame", "short-coords"])
def test_coords_that_are_not_a_raster_are_refused_at_the_call(model, change, match):
    kwargs = change(_condition_call(model, extra_frames=1))
    with dit_accel.apply(model, METHODS["gna"], backend="torch") as handle:
        with pytest.raises(ValueError, match=match):
            _run(model, kwargs)
        assert all(r["sparse_calls"] == r["dense_calls"] == 0 for r in handle.stats())


def _tiny_condition_pipeline():
    """A tiny LTXConditionPipeline built in code: the tiny LTX transformer, a 4x spatial / 4x temporal VAE of 8
    latent channels, a 16-wide T5 encoder."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXConditionPipeline
    from transformers import T5Config, T5EncoderModel

    from dit_accel.models.tiny._common import t5_tokenizer, tiny_t5_settings

    transformer = T.build_tiny_transformer("ltx")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLLTXVideo(
            in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False),
            decoder_inject_noise=(False, False, False, False, False), upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1, patch_size_t=1,
            encoder_causal=True, decoder_causal=False).eval()
        tokenizer = t5_tokenizer()
        text_encoder = T5EncoderModel(T5Config(**{**tiny_t5_settings(tokenizer), "d_model": 16})).eval()
    return LTXConditionPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                                tokenizer=tokenizer, transformer=transformer)


def test_a_tiny_condition_pipeline_runs_through_apply():
    """Two steps of the pipeline with image conditions at frame 0 (mixed into the latents) and at frame 4 (one
    latent frame of tokens prepended): not refused, every layer call sparse and matching the masked-dense
    reference of the dense pipeline; Dense gives the dense pipeline's latents."""
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    pipe = _tiny_condition_pipeline()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 32, 32, generator=g)
    conditions = [LTXVideoCondition(image=image, frame_index=0), LTXVideoCondition(image=image * 0.5, frame_index=4)]

    def generate():
        return pipe(conditions=conditions, prompt="a cat", height=32, width=32, num_frames=9, num_inference_steps=2,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(1), output_type="latent").frames

    # 9 frames at 32x32: 3 latent frames of 8 x 8 (one 64-token block each), one prepended frame; each frame alone
    grid, method = (3, 8, 8), dit_accel.Tile(tile=(1, 8, 8), window=(1, 1, 1))
    dense = generate()
    with PrefixReference(method_mask(method, grid), 64) as ref_mode:
        ref = generate()
    assert ref_mode.calls == 2 * LAYERS  # (the batch of the two guidance branches: one call per step and layer)
    with dit_accel.apply(pipe, method, backend="torch") as handle:
        out = generate()
        rows = handle.stats()
        assert not handle.warnings, list(handle.warnings)
    assert len(rows) == LAYERS and all(r["sparse_calls"] == 2 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    with dit_accel.apply(pipe, dit_accel.Dense()):
        torch.testing.assert_close(generate(), dense, atol=1e-5, rtol=1e-5)
