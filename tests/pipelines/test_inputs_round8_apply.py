"""apply()/remove() beside what Diffusers users do to their models (round 8): the same transformer under two
pipeline names, processors that compute attention without SDPA, fuse/unfuse of q/k/v projections around
apply, quantized (packed integer) projection weights. Tiny models on the CPU; each test names what was
wrong before its fix."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines.hooks import SparseAttnProcessor
from tests.utils import ReferenceAttention, method_mask

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))  # on Wan's (4, 8, 8) grid: one 4x4 tile per row
PIXART_GNA = dit_accel.GNA(kernel_size=(3, 5))  # on PixArt's (10, 13) grid


def _call(name, model):
    with torch.no_grad():
        return model(**T.tiny_transformer_inputs(name, model))[0]


def _processors(model):
    """Each attention module's processor object, by name (identity compared)."""
    return {name: id(processor) for name, processor in model.attn_processors.items()}


def _wrapped(model):
    return [name for name, p in model.attn_processors.items() if isinstance(p, SparseAttnProcessor)]


# ------------------------------------------------------------------ one transformer under two pipeline names
def test_a_transformer_also_set_as_transformer_2_is_wrapped_once_and_remove_restores_it():
    """Before: WanPipeline(transformer=t, transformer_2=t) (one set of weights for both experts) got two hooks
    on t, the second wrapping the first's wrappers: each call warned that the processors were replaced, and
    remove() left the inner wrappers on the model (its later calls warned and counted into a removed handle)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    model = T.build_tiny_transformer("wan")
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=model, transformer_2=model)
    before = _processors(model)
    with ReferenceAttention(method_mask(TILE, T.TRANSFORMER_GRIDS["wan"]), "none"):
        want = _call("wan", model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "processor replaced" warning
        handle = dit_accel.apply(pipe, TILE, backend="torch")
        out = _call("wan", model)
    assert handle.layers == ["blocks.0.attn1", "blocks.1.attn1"]
    assert [row["sparse_calls"] for row in handle.stats()] == [1, 1]
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)
    handle.remove()
    assert _processors(model) == before and not _wrapped(model)
    assert not model._forward_pre_hooks and not model._forward_hooks


# ------------------------------------------------------------------ processors that make no SDPA call
def test_a_processor_without_sdpa_is_said_and_counted_dense_not_silently_ignored():
    """Before: PixArt after ``set_default_attn_processor()`` (Diffusers' classic AttnProcessor: baddbmm and
    softmax, no scaled_dot_product_attention) ran dense under GNA with no warning, and stats() showed neither
    sparse nor dense calls: the method silently did nothing."""
    model = T.build_tiny_transformer("pixart")
    model.set_default_attn_processor()
    dense = _call("pixart", model)
    handle = dit_accel.apply(model, PIXART_GNA, backend="torch")
    with pytest.warns(dit_accel.DitAccelWarning, match=r"transformer_blocks\.0\.attn1 \(AttnProcessor; .* without "
                                                        r"torch's scaled_dot_product_attention.*ran dense"):
        out = _call("pixart", model)
    rows = handle.stats()
    assert [(r["sparse_calls"], r["dense_calls"]) for r in rows] == [(0, 1), (0, 1)]
    assert all("AttnProcessor makes no SDPA call" in r["dense_reason"] for r in rows)
    assert torch.equal(out, dense)
    handle.remove()


def test_the_default_sdpa_processor_stays_sparse_and_silent():
    """The check above must not fire where SDPA runs: PixArt's own AttnProcessor2_0 matches the masked reference."""
    model = T.build_tiny_transformer("pixart")
    with ReferenceAttention(gna_mask((10, 13), PIXART_GNA.kernel_size), "none"):
        want = _call("pixart", model)
    with dit_accel.apply(model, PIXART_GNA, backend="torch") as handle:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = _call("pixart", model)
        assert [(r["sparse_calls"], r["dense_calls"]) for r in handle.stats()] == [(1, 0), (1, 0)]
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------ fuse_qkv_projections around apply
def test_unfuse_after_remove_does_not_bring_back_the_removed_wrappers():
    """Before: apply, ``fuse_qkv_projections()`` (which keeps the processors it replaces, dit_accel's wrappers,
    in ``original_attn_processors``), remove, ``unfuse_qkv_projections()``: the removed handle's wrappers came
    back on the model; every call then warned "attention called outside the transformer forward", and a later
    apply() and remove() kept them."""
    model = T.build_tiny_transformer("pixart")
    before = _processors(model)
    dense = _call("pixart", model)
    handle = dit_accel.apply(model, PIXART_GNA, backend="torch")
    model.fuse_qkv_projections()
    with pytest.warns(dit_accel.DitAccelWarning, match="was replaced after apply"):  # said, as before
        _call("pixart", model)
    handle.remove()
    model.unfuse_qkv_projections()
    assert _processors(model) == before and not _wrapped(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(_call("pixart", model), dense, atol=1e-6, rtol=1e-6)


def test_unfuse_while_applied_still_brings_back_the_sparse_processors():
    """fuse then unfuse while applied puts dit_accel's wrappers back (the model is sparse again)."""
    model = T.build_tiny_transformer("pixart")
    with dit_accel.apply(model, PIXART_GNA, backend="torch"):
        sparse = _call("pixart", model)
        model.fuse_qkv_projections()
        model.unfuse_qkv_projections()
        assert len(_wrapped(model)) == 2
        torch.testing.assert_close(_call("pixart", model), sparse, atol=1e-6, rtol=1e-6)
    assert not _wrapped(model)


# ------------------------------------------------------------------ quantized (packed) projection weights
class _PackedLinear(torch.nn.Linear):
    """A Linear whose weight is stored as packed uint8 bytes, as GGUF and bitsandbytes 4-bit layers store theirs
    (here the bytes of the fp32 weight, so the layer computes exactly what the plain one did)."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().view(torch.uint8).clone(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.weight.view(torch.float32), self.bias)


def test_sla_on_a_model_with_packed_integer_weights_runs_like_the_plain_model():
    """Before: SLA's projection took the dtype of the attention module's first parameter, a uint8 packed
    weight on a GGUF or bitsandbytes model: apply() failed with torch's raw "Only Tensors of floating point and
    complex dtype can require gradients"."""
    sla = dit_accel.SLA(topk=0.5)
    plain, packed = T.build_tiny_transformer("wan"), T.build_tiny_transformer("wan")
    for block in packed.blocks:
        for name in ("to_q", "to_k", "to_v"):
            setattr(block.attn1, name, _PackedLinear(getattr(block.attn1, name)))
    with dit_accel.apply(plain, sla, backend="torch"):
        want = _call("wan", plain)
    before = _processors(packed)
    with dit_accel.apply(packed, sla, backend="torch") as handle:
        assert {p.weight.dtype for p in handle.sla_projections().values()} == {torch.float32}
        out = _call("wan", packed)
        assert all(r["sparse_calls"] == 1 for r in handle.stats())
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert _processors(packed) == before


# ------------------------------------------------------------------ apply again to one of a pipeline's transformers
def test_applying_to_transformer_2_alone_names_the_transformer_it_leaves_dense():
    """Before: apply(pipe) (Wan 2.2: transformer and transformer_2), then apply(pipe.transformer_2, other) to change
    the low-noise expert's method: the first handle was removed from both, and the warning said only that the
    handle was replaced, so the high-noise expert's dense run went unnoticed."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    high, low = T.build_tiny_transformer("wan", seed=0), T.build_tiny_transformer("wan", seed=1)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=high, transformer_2=low)
    dense = _call("wan", high)
    first = dit_accel.apply(pipe, TILE, backend="torch")
    with pytest.warns(dit_accel.DitAccelWarning, match=r"it also held transformer \(WanTransformer3DModel\), which "
                                                        r"now runs the original \(dense\) model: apply\(\) to it"):
        second = dit_accel.apply(pipe.transformer_2, dit_accel.GNA(kernel_size=(2, 3, 3)), backend="torch")
    assert first.removed and not _wrapped(high) and len(_wrapped(low)) == 2
    assert torch.equal(_call("wan", high), dense)
    second.remove()


# ------------------------------------------------------------------ a removed handle's wrappers set back
def test_a_removed_handles_wrappers_set_back_run_the_originals_quietly():
    """Before: a processor dict kept while applied and set back after remove() ran the originals, but every call
    warned "attention called outside the transformer forward", which read as a fault of the running model."""
    model = T.build_tiny_transformer("wan")
    dense = _call("wan", model)
    handle = dit_accel.apply(model, TILE, backend="torch")
    kept = dict(model.attn_processors)
    handle.remove()
    model.set_attn_processor(kept)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(_call("wan", model), dense, rtol=0, atol=0)
