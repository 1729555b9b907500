"""Diffusers presets on valid transformer calls the per-class tests do not make (round 15). Tiny models on the CPU,
at grids the other tests do not use; each reference grid is computed here from the call's shapes, never read from
the preset. Each test names what was wrong before its fix."""

import dataclasses

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines.presets import PRESETS, GridInfo
from tests.utils import ReferenceAttention, method_mask


@pytest.fixture(scope="module")
def qwenimage():
    return T.build_tiny_transformer("qwenimage")


def _call(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


def test_qwenimage_flat_per_sample_img_shapes_stay_sparse_at_batch_two(qwenimage):
    """Before: ``img_shapes=[(1, H, W)] * batch`` (one shape per sample, the form QwenImagePipeline passed before it
    nested them; the model's rotary reads the first entry as its one image) was read as ``batch`` images of one
    sample: a batch-2 call raised "img_shapes [(1, 5, 7), (1, 5, 7)] (70 tokens ...) do not describe its 35 image
    tokens ... use the dense model", though Diffusers runs it. Now it is one (H, W) grid and matches the reference."""
    model = qwenimage
    h, w = 5, 7
    kwargs = {**T.tiny_transformer_inputs("qwenimage", model, grid=(h, w), batch=2), "img_shapes": [(1, h, w)] * 2}
    method = dit_accel.Tile(tile=(1, 1), window=(3, 3))
    with ReferenceAttention(method_mask(method, (h, w)), "first"):
        want = _call(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _call(model, kwargs)
        rows = handle.stats()
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows)


def test_qwenimage_flat_img_shapes_of_different_sizes_are_refused_by_name(qwenimage):
    """Samples of different flat shapes (the model lays out every sample by the first one's) are refused, naming
    the shapes, as the nested per-sample form already was."""
    model = qwenimage
    kwargs = {**T.tiny_transformer_inputs("qwenimage", model, grid=(5, 7), batch=2),
              "img_shapes": [(1, 5, 7), (1, 7, 5)]}
    with dit_accel.apply(model, dit_accel.Tile(tile=(1, 1), window=(3, 3)), backend="torch"):
        with pytest.raises(ValueError, match=r"different img_shapes \[\(1, 5, 7\), \(1, 7, 5\)\]"):
            _call(model, kwargs)


@pytest.mark.parametrize("fields, what", [
    (((5.0, 7.0), 3), r"GridInfo\(grid=\(5.0, 7.0\)\) is invalid"),
    (((True, 7), 3), r"GridInfo\(grid=\(True, 7\)\) is invalid"),
    (((5, 7), -1), r"GridInfo\(num_text=-1\) is invalid"),
    (((5, 7), 3, -2), r"GridInfo\(num_after=-2\) is invalid"),
    (((5, 7), 3, 5), r"GridInfo\(num_after=5\) is more than num_text=3"),
], ids=["float-grid", "bool-grid", "negative-text", "negative-after", "after-past-text"])
def test_a_grid_info_that_cannot_describe_a_call_is_refused_where_it_is_built(fields, what):
    """Before: a registered preset's reader could return these; a float grid failed in the plan as "TypeError: slice
    indices must be integers", a negative num_after as "RuntimeError: upper bound and lower bound inconsistent with
    step sign", and num_after past num_text ran. Now GridInfo says which field is wrong and what it holds."""
    with pytest.raises(ValueError, match=what):
        GridInfo(*fields)


def test_a_grid_info_of_integer_tensors_and_numpy_ints_still_builds():
    """Sizes read from position ids (0-d integer tensors) or NumPy stay valid, as before."""
    import numpy as np

    assert GridInfo((torch.tensor(5), np.int64(7)), 0).num_video == 35


def test_a_registered_reader_with_a_float_grid_is_refused_by_name_at_the_call(monkeypatch):
    """End to end: a preset registered for FLUX.1 whose reader divides sizes with ``/`` (a float grid) ran into a bare
    TypeError inside the plan; it now fails in the reader with the GridInfo message."""
    model = T.build_tiny_transformer("flux")
    kwargs = T.tiny_transformer_inputs("flux", model, grid=(5, 7))
    text = kwargs["encoder_hidden_states"].shape[1]
    preset = dataclasses.replace(PRESETS["FluxTransformer2DModel"], grid_key=None,
                                 read_grid=lambda m, a: GridInfo((10 / 2, 14 / 2), text))
    monkeypatch.setitem(PRESETS, "FluxTransformer2DModel", preset)
    with dit_accel.apply(model, dit_accel.Tile(tile=(1, 1), window=(3, 3)), backend="torch"):
        with pytest.raises(ValueError, match=r"GridInfo\(grid=\(5.0, 7.0\)\) is invalid: the token grid is a tuple "
                                             r"of ints"):
            _call(model, kwargs)


def test_qwenimage21_flat_img_shapes_are_refused_by_name_not_a_bare_type_error():
    """Before: ``img_shapes=[(1, H, W)]`` (Qwen-Image's flat form) on Qwen-Image 2.1, which reads ``img_shapes[0][-1]``
    as the target's (F, H, W), failed inside the preset as "TypeError: 'int' object is not iterable" (the dense model
    fails the same way, later). Now the error names img_shapes and the nested form QwenImage21Pipeline passes."""
    model = T.build_tiny_transformer("qwenimage21")
    kwargs = T.tiny_transformer_inputs("qwenimage21", model)
    kwargs["img_shapes"] = [tuple(kwargs["img_shapes"][0][-1])]
    with dit_accel.apply(model, dit_accel.Tile(tile=(1, 1), window=(3, 3)), backend="torch"):
        with pytest.raises(ValueError, match=r"img_shapes \[\(1, 10, 12\)\].*reads img_shapes\[0\]\[-1\].*"
                                             r"pass \[\[\(1, H, W\)\]\] per sample"):
            _call(model, kwargs)
