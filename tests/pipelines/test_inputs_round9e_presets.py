"""Diffusers presets on odd but valid transformer calls (round 9e): calls the per-class tests do not make.
Tiny models on the CPU; each test names what was wrong before its fix."""

import warnings

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from tests.utils import ReferenceAttention, method_mask

LTX2_TILE = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))  # on LTX-2's (4, 8, 8) grid


def _call(model, kwargs):
    with torch.no_grad():
        return model(**kwargs)[0]


@pytest.fixture(scope="module")
def ltx23():
    """An LTX-2.3-style transformer: ``perturbed_attn=True`` gives every attention LTX2PerturbedAttnProcessor,
    whose spatio-temporal-guidance (STG) calls skip attention and return the value projection."""
    from diffusers import LTX2VideoTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LTX2VideoTransformer3DModel(**T.TRANSFORMERS["ltx2"].config, perturbed_attn=True).eval()


def test_an_ltx2_stg_pass_that_skips_attention_is_not_said_to_lack_sdpa(ltx23):
    """Before: LTX2Pipeline's STG pass (``spatio_temporal_guidance_blocks=[28]``, no perturbation mask: every sample
    perturbed) skips attention in those blocks; dit_accel warned that LTX2PerturbedAttnProcessor "computes attention
    without torch's scaled_dot_product_attention" and told the user to set AttnProcessor2_0 (which would break the
    model), and counted a dense call "LTX2PerturbedAttnProcessor makes no SDPA call" every step. Now such a call is
    neither said nor counted; the layer's other calls stay sparse and match the masked reference."""
    kwargs = T.tiny_transformer_inputs("ltx2", ltx23, batch=2)
    stg = {**kwargs, "spatio_temporal_guidance_blocks": [0, 1]}
    with ReferenceAttention(method_mask(LTX2_TILE, (4, 8, 8)), "last"):
        want = _call(ltx23, kwargs)
    dense_stg = _call(ltx23, stg)
    with dit_accel.apply(ltx23, LTX2_TILE, backend="torch") as handle, warnings.catch_warnings():
        warnings.simplefilter("error", dit_accel.DitAccelWarning)
        out_stg = _call(ltx23, stg)
        out = _call(ltx23, kwargs)
        rows = handle.stats()
    torch.testing.assert_close(out_stg, dense_stg, atol=0, rtol=0)  # no attention ran: nothing to change
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)
    assert [(r["sparse_calls"], r["dense_calls"], r["dense_reason"]) for r in rows] == [(1, 0, None)] * 2


def test_an_ltx2_stg_pass_that_perturbs_some_samples_stays_sparse(ltx23):
    """A batched STG call (perturbation_mask 1 for the kept sample, 0 for the perturbed one) runs attention for the
    batch and mixes the value projection in per sample: sparse, equal to the masked reference (held before and now)."""
    kwargs = {**T.tiny_transformer_inputs("ltx2", ltx23, batch=2), "spatio_temporal_guidance_blocks": [0],
              "perturbation_mask": torch.tensor([1.0, 0.0])}
    with ReferenceAttention(method_mask(LTX2_TILE, (4, 8, 8)), "last"):
        want = _call(ltx23, kwargs)
    with dit_accel.apply(ltx23, LTX2_TILE, backend="torch") as handle, warnings.catch_warnings():
        warnings.simplefilter("error", dit_accel.DitAccelWarning)
        out = _call(ltx23, kwargs)
        rows = handle.stats()
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)
    assert [(r["sparse_calls"], r["dense_calls"]) for r in rows] == [(1, 0)] * 2


def test_cogvideox_fused_after_apply_says_to_fuse_first_and_fused_before_stays_sparse():
    """CogVideoX's fuse_qkv_projections() sets fused processors, so after apply() its layers run dense (said, as any
    replaced processor is); the warning now says what keeps dit_accel: fusing before apply()."""
    import diffusers

    entry = T.TRANSFORMERS["cogvideox"]
    method = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))
    model = getattr(diffusers, entry.class_name)(**entry.config).eval()
    kwargs = T.tiny_transformer_inputs("cogvideox", model)
    with dit_accel.apply(model, method, backend="torch") as handle:
        model.fuse_qkv_projections()
        with pytest.warns(dit_accel.DitAccelWarning, match=r"was replaced after apply\(\).*CogVideoX's "
                                                           r"fuse_qkv_projections\(\).*make that call before apply"):
            _call(model, kwargs)
        assert handle.summary()["sparse_calls"] == 0
    fused = getattr(diffusers, entry.class_name)(**entry.config).eval()
    fused.fuse_qkv_projections()
    with warnings.catch_warnings():
        warnings.simplefilter("error", dit_accel.DitAccelWarning)
        with dit_accel.apply(fused, method, backend="torch") as handle:
            _call(fused, kwargs)
            assert handle.summary()["sparse_calls"] == len(handle.layers)
