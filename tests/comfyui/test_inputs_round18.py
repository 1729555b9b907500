"""ComfyUI, round 18: the advice of a grid the method refuses names the node's widget, not the Python API."""

import pytest

from tests.comfyui.models import CASES, COMMON_WIDGETS, run_node, sample


def test_a_refused_grid_advises_the_nodes_fit_widget_not_the_python_api(comfy, wan):
    """GNA's kernel of 7 on a 3-frame latent: the sampler's message said "or GNA(..., fit=True) to clamp the kernel
    to the grid", a call the ComfyUI user never writes; the node has a fit widget, which is what it now names."""
    patched = run_node("DitAccelGNA", wan, kernel_size="7", stride="1", dilation="1", is_causal=False, tile="",
                       fit=False, **COMMON_WIDGETS)
    with pytest.raises(ValueError) as err:
        sample(comfy, patched, CASES["wan21-t2v"], steps=1)
    text = str(err.value)
    assert "GNA(..., fit=True)" not in text and "or the node's fit widget (on) to clamp the kernel to the grid" in text
    # and with the widget on, the same grid runs (the kernel clamped to its 3 frames)
    fitted = run_node("DitAccelGNA", wan, kernel_size="7", stride="1", dilation="1", is_causal=False, tile="",
                      fit=True, **COMMON_WIDGETS)
    with pytest.warns(Warning, match="clamp"):
        sample(comfy, fitted, CASES["wan21-t2v"], steps=1)


def test_a_per_head_key_mask_runs_comfyuis_own_attention_not_a_misread_one():
    """A ``(B, H, 1, S)`` key mask (one row per head) was reshaped to ``(B * H, 1, 1, S)`` and read as B * H
    samples' masks: sample 1 took head 1's mask of sample 0. Such a mask (and one whose rows match no batch) is
    now declined, so the call runs ComfyUI's own attention; the masks the families pass are read as before."""
    import torch

    from dit_accel.comfyui.override import _key_mask

    s = 6
    per_head = torch.ones(2, 3, 1, s, dtype=torch.bool)
    assert _key_mask(per_head, s, 2) == (None, False)
    assert _key_mask(torch.ones(3, 1, s), s, 2) == (None, False)  # 3 rows for 2 samples
    mask, ok = _key_mask(torch.zeros(1, 1, s), s, 2)  # HunyuanVideo's additive text padding mask
    assert ok and mask.shape == (1, 1, 1, s)
    mask, ok = _key_mask(torch.ones(2, 1, 1, s, dtype=torch.bool), s, 2)
    assert ok and mask.shape == (2, 1, 1, s)
