"""JoyImage Edit and Edit Plus beyond the generic matrix of test_apply.py (which runs their text-to-image calls): the
edit calls, whose reference images sit between the generated image and the text (exact rows and columns, Edit Plus
with its padded patches and key mask), and the calls their readers refuse; SANA-WM and its refiner refused with
their reasons."""

import math

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines.presets import PRESETS, SUPPORTED, GridInfo
from tests.utils import ReferenceAttention, first_output as _run

GRID, TEXT, KERNEL = T.TRANSFORMER_GRIDS["joyimage"], T.TRANSFORMER_TEXT["joyimage"], (3, 5)


def _check(model, kwargs, after):
    """GNA on the generated image matches the reference in which every pair with a later token is dense."""
    info = PRESETS[type(model).__name__].read_grid(model, kwargs)
    assert info == GridInfo(GRID, TEXT + after)
    dense = _run(model, kwargs)
    with ReferenceAttention(gna_mask(GRID, KERNEL), "last") as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, dit_accel.GNA(kernel_size=KERNEL), backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) == 2 and not handle.warnings, handle.warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3


def test_joyimage_edit_call_keeps_the_reference_image_exact():
    """JoyImageEditPipeline: latents (B, 2, C, 1, H, W) as [reference, noise]; forward puts the noise first."""
    model = T.build_tiny_transformer("joyimage")
    kwargs = T.tiny_transformer_inputs("joyimage", model, batch=2)
    reference = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    kwargs["hidden_states"] = torch.cat([reference, kwargs["hidden_states"]], 1)
    _check(model, kwargs, math.prod(GRID))


def test_joyimage_edit_plus_call_keeps_references_padding_and_the_text_mask():
    """JoyImageEditPlusPipeline: per sample [image, references of their own sizes], padded to one length; the
    padded patches and the padded prompt are masked keys."""
    model = T.build_tiny_transformer("joyimage_plus")
    mask = [TEXT, 3]
    kwargs = T.tiny_transformer_inputs("joyimage_plus", model, batch=2, text_valid=mask)
    refs = ((4, 5), (3, 3))  # sample 1's reference is smaller: 11 padded patches
    g = torch.Generator().manual_seed(3)
    patches = torch.zeros(2, 20, *kwargs["hidden_states"].shape[2:])
    for b, (h, w) in enumerate(refs):
        patches[b, :h * w] = torch.randn(h * w, *patches.shape[2:], generator=g)
    kwargs.update(hidden_states=torch.cat([kwargs["hidden_states"], patches], 1),
                  shape_list=[[(1, *GRID), (1, h, w)] for h, w in refs])
    _check(model, kwargs, 20)


def test_joyimage_calls_it_cannot_place_are_refused():
    edit, plus = T.build_tiny_transformer("joyimage"), T.build_tiny_transformer("joyimage_plus")
    video = T.tiny_transformer_inputs("joyimage", edit)
    video["hidden_states"] = video["hidden_states"].repeat(1, 1, 1, 2, 1, 1)  # two latent frames per item
    with dit_accel.apply(edit, dit_accel.GNA(kernel_size=KERNEL), backend="torch"):
        with pytest.raises(ValueError, match=r"generated image \(the last item of hidden_states\) has 2 latent "
                                             r"frames of 10x12 tokens; .*one \(H, W\) grid of one frame"):
            _run(edit, video)
    kwargs = T.tiny_transformer_inputs("joyimage_plus", plus, batch=2)
    read = PRESETS["JoyImageEditPlusTransformer3DModel"].read_grid
    with pytest.raises(ValueError, match=r"shape_list \(2 samples, generated images of \(t, h, w\) \[\(1, 6, 20\), "
                                         r"\(1, 10, 12\)\]\) does not give"):
        read(plus, dict(kwargs, shape_list=[[(1, 10, 12)], [(1, 6, 20)]]))
    with pytest.raises(ValueError, match="has no shape_list"):
        read(plus, dict(kwargs, shape_list=None))
    with pytest.raises(ValueError, match="shape_list names more tokens than its 120 patches"):
        read(plus, dict(kwargs, shape_list=[[(1, 10, 12), (1, 2, 2)]] * 2))


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


@pytest.mark.parametrize("cls, config, match", [
    ("SanaWMTransformer3DModel", dict(in_channels=4, num_layers=4, hidden_size=32, num_attention_heads=2,
                                      linear_head_dim=16, caption_channels=16, chunk_plucker_channels=8),
     r"SanaWMTransformer3DModel: its self-attention .*gated-delta-net linear attention.*have no attention processor"),
    ("SanaWMLTX2RefinerTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
                                                 audio_out_channels=4, audio_num_attention_heads=2,
                                                 audio_attention_head_dim=8, audio_cross_attention_dim=16,
                                                 num_layers=1, caption_channels=16),
     r"SanaWMLTX2RefinerTransformer3DModel: none of its calls is self-attention over one token grid.*"
     r"kv_cache_mode='inject'"),
])
def test_sana_wm_and_its_refiner_are_refused_with_their_reasons(cls, config, match):
    import diffusers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(diffusers, cls)(**config).eval()
    before = _processors(model)
    with pytest.raises(ValueError, match=match):
        dit_accel.apply(model, dit_accel.Tile(tile=(1, 8, 8), window=(1, 1, 1)))
    assert cls not in SUPPORTED and _processors(model) == before
