"""The Wan/Hunyuan lineage beyond the generic matrix of test_apply.py: VACE reference frames read from the
call (other patch sizes, frame counts, batch 2), Wan 2.2 TI2V-5B and Wan I2V/FLF2V variants of
``WanTransformer3DModel``, the refusals (SkyReels-V2 block-causal, FramePack), and fullgraph compile of the
new classes after ``apply``."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines.presets import PRESETS, SUPPORTED, family_of
from tests.utils import ReferenceAttention, method_mask

NEW = ("wan_vace", "skyreels_v2", "chronoedit")


def _build(class_name, seed=0, **config):
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, class_name)(**config)
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.data.normal_(0, 0.05)
    return model.eval()


def _check_gna(model, kwargs, grid, kernel, position, layers):
    with torch.no_grad():
        dense = model(**kwargs)[0]
        with ReferenceAttention(gna_mask(grid, kernel), position) as ref_mode:
            ref = model(**kwargs)[0]
        with dit_accel.apply(model, dit_accel.GNA(kernel_size=kernel), backend="torch") as handle:
            out = model(**kwargs)[0]
            assert [r["sparse_calls"] for r in handle.stats()] == [1] * layers
        assert ref_mode.calls == layers
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
        assert (out - dense).abs().max() > 1e-3
        assert torch.equal(model(**kwargs)[0], dense)


@pytest.mark.parametrize("patch, refs, frames", [((1, 2, 2), 2, 3), ((2, 1, 2), 2, 4), ((1, 2, 2), 0, 3)],
                         ids=["p122-2refs", "p212-1reftoken-frame", "p122-norefs"])
def test_vace_reference_frames_read_from_the_call_run_dense(patch, refs, frames):
    cfg = dict(patch_size=patch, num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
               text_dim=8, freq_dim=16, ffn_dim=16, num_layers=3, rope_max_seq_len=32, vace_layers=[0, 2],
               vace_in_channels=10)
    model = _build("WanVACETransformer3DModel", **cfg)
    pt, ph, pw = patch
    h, w = 6, 7
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, refs + frames * pt, h * ph, w * pw, generator=g)
    control = torch.randn(2, 10, refs + frames * pt, h * ph, w * pw, generator=g)
    control[:, 3:, :refs] = 0
    kwargs = dict(hidden_states=x, timestep=torch.full((2,), 300.0), return_dict=False,
                  encoder_hidden_states=torch.randn(2, 5, 8, generator=g), control_hidden_states=control)
    info = PRESETS["WanVACETransformer3DModel"].read_grid(model, kwargs)
    assert info.grid == (frames, h, w) and info.num_text == (refs // pt) * h * w
    _check_gna(model, kwargs, (frames, h, w), (2, 3, 3), "first", layers=3 + 2)


def test_wan22_ti2v_5b_layout_48_channels_patch_and_expand_timesteps():
    """Wan 2.2 TI2V-5B: 48-channel latents (its VAE), patch (1, 2, 2), per-token timesteps (B, N)."""
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=48, out_channels=48,
               text_dim=8, freq_dim=16, ffn_dim=16, num_layers=2, rope_max_seq_len=32)
    model = _build("WanTransformer3DModel", **cfg)
    grid = (3, 6, 5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 48, 3, 12, 10, generator=g)
    t = torch.full((2, 90), 400.0)
    t[:, :30] = 0  # the clean first frame of TI2V
    kwargs = dict(hidden_states=x, timestep=t, encoder_hidden_states=torch.randn(2, 5, 8, generator=g),
                  return_dict=False)
    assert family_of(model) == "Wan 2.2"
    _check_gna(model, kwargs, grid, (2, 3, 3), "none", layers=2)


@pytest.mark.parametrize("image_tokens", [5, 10], ids=["i2v", "flf2v"])
def test_wan_i2v_flf2v_image_tokens_stay_in_cross_attention(image_tokens):
    """Wan I2V / FLF2V: CLIP image tokens join the text in cross-attention (dense); the mask-and-image
    channels of the latent do not change the grid."""
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=9, out_channels=4,
               text_dim=8, freq_dim=16, ffn_dim=16, num_layers=2, rope_max_seq_len=32, image_dim=12,
               added_kv_proj_dim=32, pos_embed_seq_len=image_tokens if image_tokens == 10 else None)
    model = _build("WanTransformer3DModel", **cfg)
    g = torch.Generator().manual_seed(5)
    kwargs = dict(hidden_states=torch.randn(2, 9, 4, 8, 10, generator=g), timestep=torch.full((2,), 500.0),
                  encoder_hidden_states=torch.randn(2, 6, 8, generator=g),
                  encoder_hidden_states_image=torch.randn(image_tokens // 5 * 2, 5, 12, generator=g), return_dict=False)
    info = PRESETS["WanTransformer3DModel"].read_grid(model, kwargs)
    assert info.grid == (4, 4, 5)
    _check_gna(model, kwargs, (4, 4, 5), (2, 3, 3), "none", layers=2)


def test_skyreels_block_causal_diffusion_forcing_is_refused_with_its_reason():
    entry = T.TRANSFORMERS["skyreels_v2"]
    model = _build(entry.class_name, **{**entry.config, "num_frame_per_block": 2})
    kwargs = T.tiny_transformer_inputs("skyreels_v2", model, batch=1)
    with dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 3, 3)), backend="torch"):
        with pytest.raises(ValueError, match="block-causal"):
            model(**kwargs)


def test_skyreels_per_frame_timesteps_diffusion_forcing_one_frame_per_block():
    model = T.build_tiny_transformer("skyreels_v2")
    kwargs = T.tiny_transformer_inputs("skyreels_v2", model, batch=2)
    kwargs["timestep"] = torch.tensor([[900.0, 600.0, 300.0, 0.0]] * 2)
    kwargs["enable_diffusion_forcing"] = True
    _check_gna(model, kwargs, T.TRANSFORMER_GRIDS["skyreels_v2"], (2, 3, 3), "none", layers=2)


def test_framepack_is_refused_with_what_would_work():
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=8,
        pooled_projection_dim=8, rope_axes_dim=(2, 3, 3), image_condition_type=None, has_image_proj=False)
    with pytest.raises(ValueError, match="three resolutions.*What would work"):
        dit_accel.apply(model, dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)))
    assert "HunyuanVideoFramepackTransformer3DModel" not in SUPPORTED


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", NEW)
def test_fullgraph_compile_after_apply_matches_eager(name):
    torch._dynamo.reset()
    method = dit_accel.GNA(kernel_size=(2, 5, 5))
    model = T.build_tiny_transformer(name)
    kwargs = T.tiny_transformer_inputs(name, model, batch=1)
    with torch.no_grad():
        with dit_accel.apply(model, method, backend="torch"):
            want = model(**kwargs)[0]
        handle = dit_accel.apply(model, method, backend="torch")
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = compiled(**kwargs)[0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    summary = handle.summary()
    assert (summary["sparse_calls"], summary["dense_calls"]) == (summary["layers"], 0)
    handle.remove()
    torch._dynamo.reset()


def test_finetune_glue_reproduces_the_skyreels_call_and_refuses_vace_and_chronoedit():
    from types import SimpleNamespace

    from dit_accel.training.model_io import model_io_for

    model = T.build_tiny_transformer("skyreels_v2")
    io = model_io_for(SimpleNamespace(transformer=model))
    kwargs = T.tiny_transformer_inputs("skyreels_v2", model, batch=1)
    with torch.no_grad():
        want = model(**kwargs)[0]
        got = io.forward(model, kwargs["hidden_states"], kwargs["timestep"],
                         {"encoder_hidden_states": kwargs["encoder_hidden_states"]})
    assert torch.equal(got, want) and io.token_grid(13, 64, 64) == (4, 4, 4)
    for name, why in (("wan_vace", "control_hidden_states"), ("chronoedit", "input image")):
        with pytest.raises(ValueError, match=why):
            model_io_for(SimpleNamespace(transformer=T.build_tiny_transformer(name)))


@pytest.mark.parametrize("method", [
    pytest.param(dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), id="tile"),
    pytest.param(dit_accel.Radial(block_size=64, decay=1.0, sink_frames=()), id="radial"),
])
def test_tile_and_radial_on_vace_with_a_reference_frame_match_the_reference(method):
    model, grid = T.build_tiny_transformer("wan_vace"), (7, 8, 8)
    kwargs = T.tiny_transformer_inputs("wan_vace", model, grid=grid, batch=2)
    pattern = method_mask(method, grid)
    assert not pattern.all()
    with torch.no_grad():
        with ReferenceAttention(pattern, "first"):
            ref = model(**kwargs)[0]
        with dit_accel.apply(model, method, backend="torch"):
            out = model(**kwargs)[0]
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_sla_on_vace_runs_sparse_with_the_reference_frame_dense():
    model = T.build_tiny_transformer("wan_vace")
    kwargs = T.tiny_transformer_inputs("wan_vace", model, batch=1)
    with torch.no_grad(), dit_accel.apply(model, dit_accel.SLA(topk=0.5), backend="torch") as handle:
        out = model(**kwargs)[0]
        rows = handle.stats()  # read while applied: a removed handle has no stats
    assert torch.isfinite(out).all()
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows)
