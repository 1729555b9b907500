"""Issue 38, item 2: call forms beyond one plain grid, each against a masked-dense reference on its own layout.

FLUX.2 and Qwen-Image edit calls put reference-image tokens after the generated image, in mid-sequence
([text, image, references]): the reference rows and columns are exact, image-image pairs follow the pattern.
CogView4 with a text attention mask, Cosmos 2.5 with image context, WanVACE with several reference frames."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.patterns import gna_mask
from dit_accel.pipelines import presets as P
from tests.utils import ReferenceAttention, reference


def _run(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs)[0]
    return out


class SpanReference(TorchFunctionMode):
    """Self/joint SDPA calls of length ``>= pattern`` size run the dense oracle with the image tokens at
    ``[S - n - after, S - after)``: image-image pairs follow ``pattern``, every pair involving another token
    (text before, ``after`` reference tokens behind) is allowed; a bool key mask (B, S) / (B, 1, 1, S) is
    honoured. Shorter and cross-attention calls pass through."""

    def __init__(self, pattern, after, image_alone=False):
        super().__init__()
        self.pattern, self.after, self.calls = pattern, after, 0
        self.image_alone = image_alone  # calls of the image's tokens alone follow the pattern too (FLUX.3's image mode)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        call = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
        q, k, v, mask = call["query"], call["key"], call["value"], call.get("attn_mask")
        n, s = self.pattern.shape[0], q.shape[2]
        alone = self.image_alone and s == n
        if k.shape[2] != s or (s < n + self.after and not alone):
            return func(*args, **kwargs)
        start = 0 if alone else s - n - self.after
        allowed = torch.ones(s, s, dtype=torch.bool)
        allowed[start:start + n, start:start + n] = self.pattern
        outs = []
        for b in range(q.shape[0]):
            keep = allowed if mask is None else allowed & mask.reshape(mask.shape[0], -1)[
                b if mask.shape[0] > 1 else 0, -s:].bool()
            outs.append(reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], keep, call.get("scale"))[0])
        self.calls += 1
        return torch.cat(outs).to(q.dtype)


def _check(model, kwargs, method, pattern, after, layers, image_alone=False):
    dense = _run(model, kwargs)
    with SpanReference(pattern, after, image_alone) as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
        warnings = list(handle.warnings)
    assert ref_mode.calls == layers == len(rows) and not warnings, warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert torch.equal(_run(model, kwargs), dense)
    return out


# ------------------------------------------------------------------ FLUX.2 edit: reference images in mid-sequence
def _flux2_edit(model, refs=((4, 5), (3, 3)), batch=1):
    grid = T.TRANSFORMER_GRIDS["flux2"]
    kwargs = T.tiny_transformer_inputs("flux2", model, batch=batch)
    g = torch.Generator().manual_seed(5)
    ids, tokens = [kwargs["img_ids"]], [kwargs["hidden_states"]]
    for i, (h, w) in enumerate(refs):  # the pipeline's reference ids: t = 10 * (i + 1), their own raster
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ids.append(torch.stack([torch.full_like(rows, 10 * (i + 1)), rows, cols, torch.zeros_like(rows)],
                               -1).reshape(-1, 4))
        tokens.append(torch.randn(batch, h * w, model.config.in_channels, generator=g))
    kwargs.update(img_ids=torch.cat(ids), hidden_states=torch.cat(tokens, 1))
    return kwargs, grid, sum(h * w for h, w in refs)


def test_flux2_edit_keeps_reference_tokens_exact_and_the_image_sparse():
    model = T.build_tiny_transformer("flux2")
    kwargs, grid, after = _flux2_edit(model)
    info = P.PRESETS["Flux2Transformer2DModel"].read_grid(model, kwargs)
    assert info.grid == grid and info.num_after == after and info.num_text == T.TRANSFORMER_TEXT["flux2"] + after
    method = dit_accel.GNA(kernel_size=(3, 5))
    out = _check(model, kwargs, method, gna_mask(grid, method.kernel_size), after, layers=2)
    assert out.shape[1] == math.prod(grid) + after


def test_flux2_reference_ids_that_are_no_raster_are_refused_naming_the_image():
    model = T.build_tiny_transformer("flux2")
    kwargs, _, _ = _flux2_edit(model)
    ids = kwargs["img_ids"].clone()
    ids[3, 2] = 7  # the generated image is no longer one raster grid
    with pytest.raises(ValueError, match="FLUX.2 image tokens of this call are not one"):
        P.PRESETS["Flux2Transformer2DModel"].read_grid(model, dict(kwargs, img_ids=ids))


# ------------------------------------------------------------------ FLUX.1 Kontext: the reference image at index 1
def test_flux_kontext_keeps_the_reference_image_exact_and_the_image_sparse():
    """FluxKontextPipeline's call: [text, image, reference image], the reference's ids at index 1 (the generated
    image's at 0), its own raster. Before: refused ("reference-image conditioning such as Kontext is not
    supported")."""
    model = T.build_tiny_transformer("flux")
    grid = T.TRANSFORMER_GRIDS["flux"]
    kwargs = T.tiny_transformer_inputs("flux", model)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
    ref_ids = torch.stack([torch.ones_like(rows), rows, cols], -1).reshape(-1, 3).to(kwargs["img_ids"].dtype)
    ref = torch.randn(1, 30, model.config.in_channels, generator=torch.Generator().manual_seed(5))
    kwargs.update(img_ids=torch.cat([kwargs["img_ids"], ref_ids]), hidden_states=torch.cat([kwargs["hidden_states"],
                                                                                            ref], 1))
    info = P.PRESETS["FluxTransformer2DModel"].read_grid(model, kwargs)
    assert info.grid == grid and info.num_after == 30
    method = dit_accel.GNA(kernel_size=(3, 5))
    _check(model, kwargs, method, gna_mask(grid, method.kernel_size), 30, layers=2)


# ------------------------------------------------------------------ FLUX.3 image-to-image: references after the image
def test_flux3_reference_images_stay_exact_and_the_image_sparse():
    """Flux3's joint blocks run [text, image, reference] with image_cond_hidden_states; its image-mode blocks the
    image alone. Before: refused ("the image is neither first nor last")."""
    model = T.build_tiny_transformer("flux3")
    grid = T.TRANSFORMER_GRIDS["flux3"]
    kwargs = T.tiny_transformer_inputs("flux3", model)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij")
    cond_ids = torch.stack([torch.full_like(rows, 10), rows, cols, torch.zeros_like(rows)], -1).reshape(-1, 4)
    kwargs.update(image_cond_hidden_states=torch.randn(1, 20, 8, generator=torch.Generator().manual_seed(5)),
                  image_cond_ids=cond_ids)
    info = P.PRESETS["Flux3Transformer2DModel"].read_grid(model, kwargs)
    assert info.grid == grid and info.num_after == 20
    method = dit_accel.GNA(kernel_size=(3, 5))
    _check(model, kwargs, method, gna_mask(grid, method.kernel_size), 20, layers=2, image_alone=True)


# ------------------------------------------------------------------ Qwen-Image edit
def _qwen_edit(model, batch=2, refs=((1, 4, 6),)):
    grid = T.TRANSFORMER_GRIDS["qwenimage"]
    kwargs = T.tiny_transformer_inputs("qwenimage", model, batch=batch,
                                       text_valid=[T.TRANSFORMER_TEXT["qwenimage"], 3] if batch == 2 else None)
    g = torch.Generator().manual_seed(5)
    after = sum(math.prod(r) for r in refs)
    extra = torch.randn(batch, after, model.config.in_channels, generator=g)
    kwargs.update(hidden_states=torch.cat([kwargs["hidden_states"], extra], 1),
                  img_shapes=[[(1, *grid), *refs]] * batch)
    return kwargs, grid, after


def test_qwenimage_edit_keeps_reference_tokens_exact_and_the_image_sparse():
    model = T.build_tiny_transformer("qwenimage")
    kwargs, grid, after = _qwen_edit(model)
    info = P.PRESETS["QwenImageTransformer2DModel"].read_grid(model, kwargs)
    assert info.grid == grid and info.num_after == after
    method = dit_accel.GNA(kernel_size=(3, 5))
    _check(model, kwargs, method, gna_mask(grid, method.kernel_size), after, layers=2)


def test_qwenimage_shapes_that_miss_tokens_are_refused_naming_the_class():
    model = T.build_tiny_transformer("qwenimage")
    kwargs, _, _ = _qwen_edit(model, batch=1)
    kwargs["img_shapes"] = [[(1, 10, 13), (1, 4, 5)]]
    with pytest.raises(ValueError, match="QwenImageTransformer2DModel call's img_shapes"):
        P.PRESETS["QwenImageTransformer2DModel"].read_grid(model, kwargs)


# ------------------------------------------------------------------ CogView4 with a text attention mask
def test_cogview4_with_an_attention_mask_matches_the_reference():
    name = "cogview4"
    model = T.build_tiny_transformer(name)
    kwargs = T.tiny_transformer_inputs(name, model, batch=2)
    text = kwargs["encoder_hidden_states"].shape[1]
    mask = torch.ones(2, text)
    mask[1, 3:] = 0  # the second prompt is shorter
    kwargs["attention_mask"] = mask
    grid = T.TRANSFORMER_GRIDS[name]
    method = dit_accel.GNA(kernel_size=(3, 5))
    dense = _run(model, kwargs)
    assert (dense - _run(model, {k: v for k, v in kwargs.items() if k != "attention_mask"})).abs().max() > 1e-4
    with ReferenceAttention(gna_mask(grid, method.kernel_size), "first") as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) and not handle.warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3


# ------------------------------------------------------------------ Cosmos 2.5 with image context
def test_cosmos25_with_image_context_matches_the_reference():
    import diffusers

    entry = T.TRANSFORMERS["cosmos"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = diffusers.CosmosTransformer3DModel(**dict(entry.config, img_context_dim_in=8, img_context_num_tokens=5,
                                                          img_context_dim_out=32)).eval()
    kwargs = T.tiny_transformer_inputs("cosmos", model, batch=2)
    image = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    kwargs["encoder_hidden_states"] = (kwargs["encoder_hidden_states"], image)
    assert (_run(model, kwargs) - _run(model, dict(kwargs, encoder_hidden_states=(
        kwargs["encoder_hidden_states"][0], image * 0)))).abs().max() > 1e-4  # the image context is used
    grid = entry.grid
    method = dit_accel.GNA(kernel_size=(2, 5, 5))
    dense = _run(model, kwargs)
    with ReferenceAttention(gna_mask(grid, method.kernel_size), "none") as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) == 2
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3


# ------------------------------------------------------------------ WanVACE with several reference frames
def test_wan_vace_with_several_reference_frames_matches_the_reference():
    model = T.build_tiny_transformer("wan_vace")
    grid, refs = T.TRANSFORMER_GRIDS["wan_vace"], 3
    kwargs = T.tiny_transformer_inputs("wan_vace", model, batch=2)
    g = torch.Generator().manual_seed(4)
    x, control = kwargs["hidden_states"], kwargs["control_hidden_states"]
    more = refs - 1  # the tiny inputs hold one reference frame: two more ahead of it
    extra_x = torch.randn(x.shape[0], x.shape[1], more, *x.shape[3:], generator=g)
    extra_c = torch.randn(control.shape[0], control.shape[1], more, *control.shape[3:], generator=g)
    extra_c[:, model.config.in_channels:] = 0  # reference frames: zero reactive latent and mask
    kwargs.update(hidden_states=torch.cat([extra_x, x], 2), control_hidden_states=torch.cat([extra_c, control], 2))
    info = P.PRESETS["WanVACETransformer3DModel"].read_grid(model, kwargs)
    assert info.grid == grid and info.num_text == refs * grid[1] * grid[2]
    method = dit_accel.GNA(kernel_size=(2, 5, 5))
    dense = _run(model, kwargs)
    with ReferenceAttention(gna_mask(grid, method.kernel_size), "first") as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) == 3  # two main blocks and one VACE block
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
