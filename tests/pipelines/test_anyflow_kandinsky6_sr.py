"""AnyFlow beyond the generic matrix of test_apply.py (frames-first latents on an uneven grid, conditioning frames
at timestep 0), and the classes refused with their reasons: AnyFlow-FAR (flex chunk-causal attention over
mixed-resolution chunks) and Kandinsky 6 VSR (its own NABLA on flex, no dense call)."""

from types import SimpleNamespace

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines.presets import PRESETS, SUPPORTED
from tests.utils import ReferenceAttention, method_mask


def _build(class_name, seed=0, **config):
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(diffusers, class_name)(**config)
    return model.eval()


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def test_anyflow_frames_first_uneven_grid_with_conditioning_frames_matches_the_reference():
    model = T.build_tiny_transformer("anyflow")
    grid, kernel = (3, 4, 6), (2, 3, 3)  # frames != channels (4), height != width: a swapped axis shows
    kwargs = T.tiny_transformer_inputs("anyflow", model, grid=grid, batch=2)
    kwargs["timestep"][:, 0] = 0  # AnyFlowPipeline's conditioning frame: a frame of the grid at timestep 0
    info = PRESETS["AnyFlowTransformer3DModel"].read_grid(model, kwargs)
    assert info.grid == grid and info.num_text == T.TRANSFORMER_TEXT["anyflow"]
    with torch.no_grad():
        dense = model(**kwargs)[0]
        with ReferenceAttention(gna_mask(grid, kernel), "none") as ref_mode:
            ref = model(**kwargs)[0]
        with dit_accel.apply(model, dit_accel.GNA(kernel_size=kernel), backend="torch") as handle:
            out = model(**kwargs)[0]
            assert [r["sparse_calls"] for r in handle.stats()] == [1, 1]
    assert ref_mode.calls == 2
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3


@pytest.mark.parametrize("method", [
    pytest.param(dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), id="tile-1x8x8-w3x1x1"),
    pytest.param(dit_accel.Radial(block_size=64, decay=1.0, sink_frames=()), id="radial-b64"),
])
def test_anyflow_tile_and_radial_see_frames_on_the_time_axis(method):
    model, grid = T.build_tiny_transformer("anyflow"), (7, 8, 8)  # 7 frames: both drop far frame pairs
    kwargs = T.tiny_transformer_inputs("anyflow", model, grid=grid, batch=1)
    pattern = method_mask(method, grid)
    assert not pattern.all()
    with torch.no_grad():
        with ReferenceAttention(pattern, "none"):
            ref = model(**kwargs)[0]
        with dit_accel.apply(model, method, backend="torch") as handle:
            out = model(**kwargs)[0]
            assert all(r["sparse_calls"] == 1 for r in handle.stats())
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_anyflow_far_is_refused_with_its_reason():
    model = _build("AnyFlowFARTransformer3DModel", patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4),
                   num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
                   freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=64)
    attn1 = model.blocks[0].attn1.processor
    assert type(attn1).__name__ == "AnyFlowCausalAttnProcessor" and attn1._attention_backend == "flex"
    before = _processors(model)
    with pytest.raises(ValueError, match="flex backend.*chunk-causal BlockMask.*AnyFlowTransformer3DModel"):
        dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 3, 3)))
    assert "AnyFlowFARTransformer3DModel" not in SUPPORTED and "AnyFlowTransformer3DModel" in SUPPORTED
    assert _processors(model) == before


def test_kandinsky6_sr_is_refused_with_its_reason():
    model = _build("Kandinsky6SRTransformer3DModel", in_visual_dim=4, out_visual_dim=4, time_dim=16,
                   patch_size=(1, 1, 1), model_dim=32, ff_dim=64, num_visual_blocks=1, axes_dims=(4, 6, 6))
    attention = model.visual_transformer_blocks[0].self_attention
    assert [c.__name__ for c in attention._available_processors] == ["Kandinsky6SRAttnProcessor"]  # no dense one
    before = _processors(model)
    with pytest.raises(ValueError, match="Kandinsky6SRTransformer3DModel: it has no dense self-attention call.*"
                                         "NABLA"):
        dit_accel.apply(model, dit_accel.Tile(tile=(1, 8, 8), window=(1, 1, 1)))
    assert "Kandinsky6SRTransformer3DModel" not in SUPPORTED and "Kandinsky6Transformer3DModel" in SUPPORTED
    assert _processors(model) == before


def test_finetune_refuses_anyflow_with_the_reason():
    from dit_accel.training.model_io import model_io_for

    with pytest.raises(ValueError, match=r"AnyFlowTransformer3DModel \(its .*r_timestep.*\)\. Use a Wan"):
        model_io_for(SimpleNamespace(transformer=T.build_tiny_transformer("anyflow")))


def test_info_lists_the_classes_with_notes_and_reasons(capsys):
    from dit_accel.cli.main import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "AnyFlowTransformer3DModel " in out and PRESETS["AnyFlowTransformer3DModel"].notes in out
    for name in ("AnyFlowFARTransformer3DModel", "Kandinsky6SRTransformer3DModel"):
        assert f"refused: {PRESETS[name].refused}" in out
