"""Bria FIBO 2, Ideogram 4 and DreamLite beyond the generic matrix of test_apply.py (which runs their plain calls, FIBO
2's with a padded prompt): FIBO 2's edit calls (context images after the image, exact) and the batches whose gist
counts differ, refused; Ideogram 4's left-padded prompt (exact on every row but the padding's own, which the pipeline
drops: hence not in the matrix's PADDED) and the layouts it refuses; DreamLite's pipelines and its cross-attention-only
modules refused with the reason."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines import presets as P
from tests.pipelines.test_call_forms import _check
from tests.utils import ReferenceAttention, first_output as _run

METHOD = dit_accel.GNA(kernel_size=(3, 5))


def test_fibo2_edit_call_keeps_the_context_images_exact():
    """BriaFibo2Pipeline's edit call: context_latents of their own sizes after the image, [gist, image, context] in
    the main blocks and [image, context] in the noise refiner."""
    model, grid = T.build_tiny_transformer("bria_fibo2"), T.TRANSFORMER_GRIDS["bria_fibo2"]
    kwargs = T.tiny_transformer_inputs("bria_fibo2", model, batch=2)
    g = torch.Generator().manual_seed(5)
    kwargs["context_latents"] = [torch.randn(2, 4, 8, 10, generator=g), torch.randn(2, 4, 6, 6, generator=g)]
    after = 4 * 5 + 3 * 3
    assert P.PRESETS["BriaFibo2Transformer2DModel"].read_grid(model, kwargs) == P.GridInfo(grid, 8 + after, after)
    _check(model, kwargs, METHOD, gna_mask(grid, METHOD.kernel_size), after, layers=3)


def test_fibo2_batch_of_different_gist_counts_is_refused():
    model = T.build_tiny_transformer("bria_fibo2")
    kwargs = T.tiny_transformer_inputs("bria_fibo2", model, batch=2, text_valid=[7, 2])
    with dit_accel.apply(model, METHOD, backend="torch"):
        with pytest.raises(ValueError, match=r"get different gist token counts \(\[8, 4\], from their text lengths\)"
                                             r", so the model pads the gist and moves it after the image"):
            _run(model, kwargs)


def test_ideogram4_left_padded_prompt_runs_exactly_on_text_and_image():
    model, grid = T.build_tiny_transformer("ideogram4"), T.TRANSFORMER_GRIDS["ideogram4"]
    kwargs = T.tiny_transformer_inputs("ideogram4", model, batch=2, text_valid=[7, 3])
    assert P.PRESETS["Ideogram4Transformer2DModel"].read_grid(model, kwargs) == P.GridInfo(grid, 7)
    valid = kwargs["indicator"] != 0  # sample 1: 4 padding tokens first
    dense = _run(model, kwargs)
    assert (dense - _run(model, T.tiny_transformer_inputs("ideogram4", model, batch=2)))[valid].abs().max() > 1e-3
    with ReferenceAttention(gna_mask(grid, METHOD.kernel_size), "first") as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, METHOD, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) == 2 and not handle.warnings, handle.warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out[valid], ref[valid], atol=2e-4, rtol=2e-4)
    assert (out - dense)[valid].abs().max() > 1e-3


@pytest.mark.parametrize("change", ["image segment", "image first"])
def test_ideogram4_layouts_it_cannot_place_are_refused(change):
    model = T.build_tiny_transformer("ideogram4")
    kwargs = T.tiny_transformer_inputs("ideogram4", model, batch=2)
    if change == "image segment":  # the image alone in its segment: its queries would not see the text
        kwargs["segment_ids"] = kwargs["segment_ids"].clone()
        kwargs["segment_ids"][:, 7:] = 2
    else:
        kwargs = {k: torch.cat([v[:, 7:], v[:, :7]], 1) if isinstance(v, torch.Tensor) and v.dim() > 1 else v
                  for k, v in kwargs.items()}
    with pytest.raises(ValueError, match="image tokens of this Ideogram 4 call are not one trailing run, in the "
                                         "text's segment"):
        P.PRESETS["Ideogram4Transformer2DModel"].read_grid(model, kwargs)


def test_dreamlite_pipelines_and_cross_attention_only_modules_are_refused():
    for name in ("DreamLitePipeline", "DreamLiteMobilePipeline"):
        with pytest.raises(ValueError, match=rf"does not support {name}: its DreamLiteTransformer2DModel modules sit "
                                             r"inside its U-Net \(pipe.unet\).* with scheduler=pipe.scheduler"):
            dit_accel.apply(type(name, (), {})(), METHOD)
    from diffusers import DreamLiteTransformer2DModel

    model = DreamLiteTransformer2DModel(**T.TRANSFORMERS["dreamlite"].config, only_cross_attention=True)
    kwargs = T.tiny_transformer_inputs("dreamlite", model)
    with pytest.raises(ValueError, match="only_cross_attention=True: its attn1 attends to the text"):
        P.PRESETS["DreamLiteTransformer2DModel"].read_grid(model, kwargs)


def test_ideogram4_unconditional_pass_runs_sparse_and_apply_wraps_its_transformer():
    """Ideogram4Pipeline's unconditional pass: unconditional_transformer over the conditional call's image tokens alone
    (one segment, an all-true square mask): sparse against the masked reference, where it ran dense with a warning;
    apply(pipe) wraps that transformer beside pipe.transformer."""
    from types import SimpleNamespace

    model, grid = T.build_tiny_transformer("ideogram4"), T.TRANSFORMER_GRIDS["ideogram4"]
    full = T.tiny_transformer_inputs("ideogram4", model, batch=2)
    text = full["hidden_states"].shape[1] - grid[0] * grid[1]
    kwargs = {k: v[:, text:] if k in ("hidden_states", "encoder_hidden_states", "position_ids", "segment_ids",
                                      "indicator") else v for k, v in full.items()}  # the pipeline's neg_* inputs
    assert P.PRESETS["Ideogram4Transformer2DModel"].read_grid(model, kwargs) == P.GridInfo(grid, 0)
    with ReferenceAttention(gna_mask(grid, METHOD.kernel_size), "first"):
        ref = _run(model, kwargs)
    with dit_accel.apply(model, METHOD, backend="torch") as handle:
        out = _run(model, kwargs)
        assert [r["sparse_calls"] for r in handle.stats()] == [1, 1] and not handle.warnings
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    pipe = SimpleNamespace(transformer=T.build_tiny_transformer("ideogram4"), unconditional_transformer=model)
    with dit_accel.apply(pipe, METHOD, backend="torch") as handle:
        assert len(handle.transformers) == 2 and model._forward_pre_hooks
