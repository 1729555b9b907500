"""Wan Animate, LTX-2 and MiniMax-H3 beyond the generic matrix of test_apply.py (issue 28, models-video-d): the
extra tokens that run dense (Wan Animate's reference frame, LTX-2's appended conditioning tokens, MiniMax-H3's
text/conditioning/audio prefix) at other grids, Tile/Radial/SLA on Wan Animate, the calls that break the grid
(refused at the call), Wan Animate 2 (refused), fine-tuning (refused) and ``dit-accel info``."""

from types import SimpleNamespace

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.models.tiny.minimax_h3 import packed_layout
from dit_accel.patterns import gna_mask
from dit_accel.pipelines.presets import PRESETS, SUPPORTED
from tests.utils import ReferenceAttention, method_mask


def _check_gna(model, kwargs, grid, kernel, position, layers):
    """GNA matches the masked dense reference (``position``: where the dense extra tokens sit), differs from
    dense, and remove() restores the model bit for bit."""
    with torch.no_grad():
        dense = model(**kwargs)[0]
        with ReferenceAttention(gna_mask(grid, kernel), position) as ref_mode:
            ref = model(**kwargs)[0]
        with dit_accel.apply(model, dit_accel.GNA(kernel_size=kernel), backend="torch") as handle:
            out = model(**kwargs)[0]
            rows = handle.stats()
        assert [r["sparse_calls"] for r in rows] == [1] * layers and ref_mode.calls == layers
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
        assert (out - dense).abs().max() > 1e-3
        assert torch.equal(model(**kwargs)[0], dense)
    return rows


# ------------------------------------------------------------------ Wan Animate
def test_wan_animate_reads_the_grid_after_the_reference_frame_at_other_sizes():
    model = T.build_tiny_transformer("wan_animate")
    grid = (3, 6, 10)  # face video of 4*3-3 frames: the face adapter's 4 motion frames = 1 + T
    kwargs = T.tiny_transformer_inputs("wan_animate", model, grid=grid, batch=2)
    info = PRESETS["WanAnimateTransformer3DModel"].read_grid(model, kwargs)
    assert info.grid == grid and info.num_text == 6 * 10  # the reference frame's tokens
    _check_gna(model, kwargs, grid, (2, 3, 5), "first", layers=2)
    only_reference = dict(kwargs, hidden_states=kwargs["hidden_states"][:, :, :1])
    with pytest.raises(ValueError, match="reference frame only"):
        PRESETS["WanAnimateTransformer3DModel"].read_grid(model, only_reference)


@pytest.mark.parametrize("method", [
    pytest.param(dit_accel.Tile(tile=(1, 8, 8), window=(3, 1, 1)), id="tile"),
    pytest.param(dit_accel.Radial(block_size=64, decay=1.0, sink_frames=()), id="radial"),
])
def test_tile_and_radial_on_wan_animate_match_the_reference(method):
    model, grid = T.build_tiny_transformer("wan_animate"), (7, 8, 8)  # 7 frames: both drop far frame pairs
    kwargs = T.tiny_transformer_inputs("wan_animate", model, grid=grid, batch=2)
    pattern = method_mask(method, grid)
    assert not pattern.all()
    with torch.no_grad():
        with ReferenceAttention(pattern, "first"):
            ref = model(**kwargs)[0]
        with dit_accel.apply(model, method, backend="torch") as handle:
            out = model(**kwargs)[0]
            assert all(r["sparse_calls"] == 1 for r in handle.stats())
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)


def test_sla_on_wan_animate_runs_sparse_and_every_block_kept_is_dense():
    model = T.build_tiny_transformer("wan_animate")
    kwargs = T.tiny_transformer_inputs("wan_animate", model, batch=1)
    with torch.no_grad():
        dense = model(**kwargs)[0]
        with dit_accel.apply(model, dit_accel.SLA(topk=0.5), backend="torch") as handle:
            out = model(**kwargs)[0]
            rows = handle.stats()
        with dit_accel.apply(model, dit_accel.SLA(topk=1.0), backend="torch"):
            every_block = model(**kwargs)[0]  # every key block in the softmax branch; zero projection
    assert torch.isfinite(out).all() and (out - dense).abs().max() > 1e-4
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 and r["density"] < 1 for r in rows)
    torch.testing.assert_close(every_block, dense, atol=2e-4, rtol=2e-4)


def test_wan_animate_2_is_refused_with_its_reason():
    from diffusers import WanAnimate2Transformer3DModel

    model = WanAnimate2Transformer3DModel(patch_size=(1, 2, 2), text_len=8, in_dim=8, dim=32, ffn_dim=32, freq_dim=16,
                                          text_dim=16, out_dim=4, num_heads=2, num_layers=1, use_img_emb=False)
    with pytest.raises(ValueError, match="flex BlockMask.*WanAnimateTransformer3DModel"):
        dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 5, 5)))
    assert "WanAnimate2Transformer3DModel" not in SUPPORTED and "WanAnimateTransformer3DModel" in SUPPORTED
    assert not any(type(m.processor).__name__ == "SparseAttnProcessor"
                   for m in model.modules() if hasattr(m, "processor"))


# ------------------------------------------------------------------ LTX-2
def _ltx2_conditioned(model, grid, extra_frames=1, batch=2):
    """The call of LTX2ConditionPipeline: keyframe tokens appended after the grid, placed by video_coords."""
    kwargs = T.tiny_transformer_inputs("ltx2", model, grid=grid, batch=batch)
    hw = grid[1] * grid[2]
    g = torch.Generator().manual_seed(7)
    extra = torch.randn(batch, extra_frames * hw, kwargs["hidden_states"].shape[2], generator=g)
    coords = kwargs["video_coords"]
    kwargs.update(hidden_states=torch.cat([kwargs["hidden_states"], extra], 1),
                  video_coords=torch.cat([coords, coords[:, :, -extra_frames * hw:]], 2))  # keyframes at the end
    return kwargs


def test_ltx2_appended_conditioning_tokens_run_dense_and_audio_stays_dense():
    model, grid = T.build_tiny_transformer("ltx2"), (3, 6, 5)
    kwargs = _ltx2_conditioned(model, grid)
    info = PRESETS["LTX2VideoTransformer3DModel"].read_grid(model, kwargs)
    assert info.grid == grid and info.num_text == 30
    rows = _check_gna(model, kwargs, grid, (2, 3, 3), "last", layers=2)
    assert [r["layer"] for r in rows] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]


def _ltx2_refusals(model):
    grid = T.TRANSFORMER_GRIDS["ltx2"]
    plain = T.tiny_transformer_inputs("ltx2", model, batch=1)
    n = plain["hidden_states"].shape[1]
    tiled = plain["video_coords"].clone()
    tiled[:, 2] = tiled[:, 2].flip(1)  # width positions reversed: not the raster
    return {
        "positions only": (dict(plain, num_frames=None, height=None, width=None), "integer num_frames"),
        "IC-LoRA mask": (dict(plain, video_self_attention_mask=torch.ones(1, n, n)), "video_self_attention_mask"),
        "tiled coords": (dict(plain, video_coords=tiled), "not the raster"),
        "too few tokens": (dict(plain, num_frames=grid[0] + 1), "more than"),
    }


@pytest.mark.parametrize("case", ["positions only", "IC-LoRA mask", "tiled coords", "too few tokens"])
def test_ltx2_calls_that_break_the_grid_are_refused_at_the_call(case):
    model = T.build_tiny_transformer("ltx2")
    kwargs, why = _ltx2_refusals(model)[case]
    with dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 5, 5)), backend="torch"):
        with pytest.raises(ValueError, match=why), torch.no_grad():
            model(**kwargs)


# ------------------------------------------------------------------ MiniMax-H3
@pytest.mark.parametrize("grid, keyframes", [((3, 6, 10), 2), ((2, 4, 8), 0)], ids=["2-keyframes", "no-keyframes"])
def test_minimax_h3_target_grid_from_positions_with_a_dense_prefix(grid, keyframes):
    model = T.build_tiny_transformer("minimax_h3")
    kwargs = T.tiny_transformer_inputs("minimax_h3", model, grid=grid, batch=2)
    pos, tags, video, audio, text = packed_layout(7, grid, keyframes=keyframes)
    cond = keyframes * grid[1] * grid[2]
    kwargs.update(position_ids=pos, token_tags=tags, video_indices=video, audio_indices=audio, text_indices=text,
                  timestep_indices=torch.zeros(pos.shape[0], dtype=torch.long),
                  hidden_states=torch.randn(2, video.numel(), kwargs["hidden_states"].shape[2],
                                            generator=torch.Generator().manual_seed(2)))
    info = PRESETS["MiniMaxH3Transformer3DModel"].read_grid(model, kwargs)
    assert info.grid == grid and info.num_text == 7 + cond + 10  # text, keyframes, audio
    rows = _check_gna(model, kwargs, grid, (2, 3, 5), "first", layers=2)
    assert [r["layer"] for r in rows] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]  # no refiner


def _minimax_refusals():
    grid = (2, 4, 8)
    no_audio = packed_layout(7, grid, keyframes=1, audio=0)
    pos, tags, video, audio, text = packed_layout(7, grid)
    column_major = pos.clone()
    column_major[-64:, 1:] = pos[-64:, 1:].reshape(2, 4, 8, 2).transpose(1, 2).reshape(64, 2)  # every frame
    return {"keyframe next to the target": (no_audio, "do not follow the target audio"),
            "column-major frame": ((column_major, tags, video, audio, text), "row-major"),
            "ends with audio": ((pos, tags, video[:-32], torch.cat([audio, video[-32:]]), text), "does not end")}


@pytest.mark.parametrize("case", ["keyframe next to the target", "column-major frame", "ends with audio"])
def test_minimax_h3_layouts_that_break_the_grid_are_refused_at_the_call(case):
    model = T.build_tiny_transformer("minimax_h3")
    (pos, tags, video, audio, text), why = _minimax_refusals()[case]
    kwargs = T.tiny_transformer_inputs("minimax_h3", model, grid=(2, 4, 8), batch=1)
    kwargs.update(position_ids=pos, token_tags=tags, video_indices=video, audio_indices=audio, text_indices=text,
                  timestep_indices=torch.zeros(pos.shape[0], dtype=torch.long),
                  hidden_states=torch.randn(1, video.numel(), kwargs["hidden_states"].shape[2]),
                  audio_hidden_states=torch.randn(1, audio.numel(), 4))
    with torch.no_grad():
        model(**kwargs)  # the dense model runs the layout
        with dit_accel.apply(model, dit_accel.GNA(kernel_size=(2, 3, 3)), backend="torch"):
            with pytest.raises(ValueError, match=why):
                model(**kwargs)


# ------------------------------------------------------------------ fine-tuning and info
@pytest.mark.parametrize("name, why", [("wan_animate", "pose latents"), ("ltx2", "audio"),
                                       ("minimax_h3", "packed sequence")])
def test_finetune_refuses_the_new_classes_with_the_reason(name, why):
    from dit_accel.training.model_io import model_io_for

    with pytest.raises(ValueError, match=why):
        model_io_for(SimpleNamespace(transformer=T.build_tiny_transformer(name)))


def test_info_lists_the_new_classes_with_notes(capsys):
    from dit_accel.cli.main import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("WanAnimateTransformer3DModel", "LTX2VideoTransformer3DModel", "MiniMaxH3Transformer3DModel"):
        assert f"{name} " in out and PRESETS[name].notes in out
    assert f"WanAnimate2Transformer3DModel            refused: {PRESETS['WanAnimate2Transformer3DModel'].refused}" in out
