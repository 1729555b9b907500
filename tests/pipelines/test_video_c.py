"""The models-video-c families beyond the generic matrix of test_apply.py: the call modes that add tokens
outside the grid (Kandinsky 6's appended reference frame, Helios's packed history) run them dense like text,
the ones dit_accel cannot place are refused at the call (Kandinsky 5's own NABLA attention, other Kandinsky 6
rotary positions), HunyuanVideo 1.5's square text mask, and Tile / Radial / SLA on Helios with its history."""

import dataclasses

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines import presets as P
from tests.utils import ReferenceAttention, method_mask, first_output as _run

GRID = (4, 8, 8)


def _check(model, kwargs, pattern, position, method, layers=2):
    """``method`` on ``model`` matches the masked reference (``pattern`` on video-video pairs), every layer
    sparse, and differs from dense."""
    dense = _run(model, kwargs)
    with ReferenceAttention(pattern, position) as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == layers
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert torch.equal(_run(model, kwargs), dense)


# ------------------------------------------------------------------ Kandinsky 6: the appended reference frame
def _kandinsky6_with_reference(model, batch=2):
    f, h, w = GRID
    kwargs = T.tiny_transformer_inputs("kandinsky6", model, grid=(f + 1, h, w), batch=batch)
    kwargs["visual_rope_pos"] = (torch.cat([torch.arange(f), torch.zeros(1, dtype=torch.long)]), torch.arange(h),
                                 torch.arange(w))
    return kwargs


def test_kandinsky6_reference_frame_runs_dense_like_text():
    model = T.build_tiny_transformer("kandinsky6")
    kwargs = _kandinsky6_with_reference(model)
    info = P.PRESETS["Kandinsky6Transformer3DModel"].read_grid(model, kwargs)
    assert info.grid == GRID and info.num_text == GRID[1] * GRID[2]
    method = dit_accel.GNA(kernel_size=(2, 5, 5))
    _check(model, kwargs, gna_mask(GRID, method.kernel_size), "last", method)


def test_kandinsky6_other_rotary_positions_are_refused_at_the_call():
    model = T.build_tiny_transformer("kandinsky6")
    kwargs = _kandinsky6_with_reference(model, batch=1)
    kwargs["visual_rope_pos"] = (torch.tensor([0, 1, 2, 3, 1]),) + kwargs["visual_rope_pos"][1:]
    with dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 5, 5)), backend="torch"):
        with pytest.raises(ValueError, match="visual_rope_pos is neither arange"):
            _run(model, kwargs)
    plain = T.tiny_transformer_inputs("kandinsky6", model, batch=1)
    plain["visual_rope_pos"] = tuple(torch.arange(n) for n in GRID)  # explicit arange: the plain grid
    assert P.PRESETS["Kandinsky6Transformer3DModel"].read_grid(model, plain) == P.GridInfo(GRID, 0)


# ------------------------------------------------------------------ Kandinsky 5: its own NABLA attention
def test_kandinsky5_calls_with_sparse_params_are_refused_and_the_model_is_unchanged():
    model = T.build_tiny_transformer("kandinsky5")
    kwargs = T.tiny_transformer_inputs("kandinsky5", model, batch=1)
    dense = _run(model, kwargs)
    with dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 5, 5)), backend="torch"):
        with pytest.raises(ValueError, match="NABLA sparse attention.*attention_type='regular'"):
            _run(model, dict(kwargs, sparse_params={"to_fractal": True, "P": 0.9, "sta_mask": None}))
    assert torch.equal(_run(model, kwargs), dense)


# ------------------------------------------------------------------ HunyuanVideo 1.5: the square text mask
def test_hunyuan15_t2v_masks_the_image_tokens():
    model = T.build_tiny_transformer("hunyuan15")
    kwargs = T.tiny_transformer_inputs("hunyuan15", model, batch=2, text_valid=[6, 2])
    kwargs["image_embeds"] = torch.zeros_like(kwargs["image_embeds"])  # T2V: the pipeline's zero image
    method = dit_accel.GNA(kernel_size=(2, 5, 5))
    _check(model, kwargs, gna_mask(GRID, method.kernel_size), "last", method)


def test_hunyuan15_square_mask_is_what_makes_it_sparse():
    """Without ``Preset.square_mask`` the (B, 1, S, S) mask is no key-padding mask: every call runs dense."""
    model = T.build_tiny_transformer("hunyuan15")
    kwargs = T.tiny_transformer_inputs("hunyuan15", model, batch=2, text_valid=[6, 2])
    preset = P.PRESETS["HunyuanVideo15Transformer3DModel"]
    P.register_preset(dataclasses.replace(preset, square_mask=False))
    try:
        with pytest.warns(Warning, match="cannot make sparse"):
            with dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 5, 5)), backend="torch") as handle:
                _run(model, kwargs)
                rows = handle.stats()
        assert all(r["sparse_calls"] == 0 for r in rows)
    finally:
        P.register_preset(preset)


# ------------------------------------------------------------------ Helios: the packed history
def test_helios_history_token_count_matches_the_model():
    model = T.build_tiny_transformer("helios")
    kwargs = T.tiny_transformer_inputs("helios", model, batch=1, grid=(3, 6, 10))
    seen = []
    hook = model.blocks[0].attn1.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("hidden_states", a[0] if a else None).shape[1]), with_kwargs=True)
    try:
        _run(model, kwargs)
    finally:
        hook.remove()
    info = P.PRESETS["HeliosTransformer3DModel"].read_grid(model, kwargs)
    assert info.grid == (3, 6, 10) and seen == [info.num_video + info.num_text] and info.num_text > 0


def test_helios_without_history_is_one_grid():
    model = T.build_tiny_transformer("helios")
    kwargs = T.tiny_transformer_inputs("helios", model, batch=2)
    kwargs = {k: v for k, v in kwargs.items() if "history" not in k}
    assert P.PRESETS["HeliosTransformer3DModel"].read_grid(model, kwargs) == P.GridInfo(GRID, 0)
    method = dit_accel.GNA(kernel_size=(2, 5, 5))
    _check(model, kwargs, gna_mask(GRID, method.kernel_size), "first", method)


@pytest.mark.parametrize("method", [
    pytest.param(dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), id="tile"),
    pytest.param(dit_accel.Radial(block_size=64, decay=1.0, sink_frames=()), id="radial"),
])
def test_tile_and_radial_on_helios_with_history_match_the_reference(method):
    grid = (7, 8, 8)  # 7 frames: radial drops far frame pairs
    model = T.build_tiny_transformer("helios")
    kwargs = T.tiny_transformer_inputs("helios", model, grid=grid, batch=2)
    pattern = method_mask(method, grid)
    assert not pattern.all()
    _check(model, kwargs, pattern, "first", method)


def test_sla_on_helios_runs_sparse_with_the_history_dense():
    model = T.build_tiny_transformer("helios")
    kwargs = T.tiny_transformer_inputs("helios", model, batch=1)
    dense = _run(model, kwargs)
    with torch.no_grad(), dit_accel.apply(model, dit_accel.SLA(topk=0.5), backend="torch") as handle:
        out = model(**kwargs)[0]
        rows = handle.stats()
    assert torch.isfinite(out).all() and (out - dense).abs().max() > 1e-4
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 and r["density"] < 1 for r in rows)


def test_info_lists_the_video_c_classes_with_their_notes(capsys):
    from dit_accel.cli.main import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("HunyuanVideo15Transformer3DModel", "Kandinsky5Transformer3DModel", "Kandinsky6Transformer3DModel",
                 "EasyAnimateTransformer3DModel", "HeliosTransformer3DModel"):
        assert name in out and P.PRESETS[name].notes in out and name in P.SUPPORTED


def test_kandinsky6_vsr_ids_are_not_taken_for_the_kandinsky6_transformer():
    """The VSR checkpoints hold Kandinsky6SRTransformer3DModel, whose preset refuses it with the reason."""
    name, _ = P.resolve_model_family("kandinskylab/Kandinsky-6.0-VSR-distilled2steps-5s-Diffusers")
    assert name == "Kandinsky6SRTransformer3DModel" and P.PRESETS[name].refused and name not in P.SUPPORTED
