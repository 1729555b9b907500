"""Reference images on ComfyUI's own classes: FLUX Kontext's and Qwen-Image-Edit's after the image ([text, image,
references]), HunyuanVideo's ``ref_latent`` before the video ([reference, video, text]). Their tokens keep exact
rows and columns, as text does, and the generated image's pairs follow the pattern, as dit_accel's Diffusers path
runs them: Dense through the node is ComfyUI's own output bit for bit; Tile and GNA equal a masked-dense reference
whose allowed pairs are the pattern's on the grid and everything else, with every self-attention call of every
model call on the sparse path (so no test passes by falling back to ComfyUI's attention)."""

import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.families import family_for
from dit_accel.patterns.gna import gna_mask
from dit_accel.patterns.tile import tile_mask

from tests.comfyui.models import CASES, COMMON_WIDGETS, MORE_CASES, masked_reference, with_override

STEPS = 2  # model calls per sample at cfg 1
LAYERS = 2  # self-attention layers of each tiny model (FLUX, HunyuanVideo: 1 double + 1 single block)
PATTERNS = {
    2: {"tile": (dit_accel.Tile(tile=(2, 2), window=(1, 1)), lambda g: tile_mask(g, (2, 2), (1, 1))),
        "gna": (dit_accel.GNA(kernel_size=(3, 3), stride=(1, 2)), lambda g: gna_mask(g, (3, 3), (1, 2)))},
    3: {"tile": (dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), lambda g: tile_mask(g, (1, 2, 2), (3, 1, 1))),
        "gna": (dit_accel.GNA(kernel_size=(2, 3, 3), stride=(1, 1, 2)), lambda g: gna_mask(g, (2, 3, 3), (1, 1, 2)))},
}


def _latent(*shape, seed):
    return torch.randn(1, 16, *shape, generator=torch.Generator().manual_seed(seed))


# name: (family case, conditioning extras, token grid, text tokens, reference tokens)
REFERENCES = {
    "flux-kontext": ("flux", lambda: dict(reference_latents=[_latent(8, 10, seed=30)]), (4, 5), 6, 20),
    # two references of different sizes, the second padded to whole patches (7 -> 8 columns): 20 + 12 tokens
    "flux-kontext-two": ("flux", lambda: dict(reference_latents=[_latent(8, 10, seed=31), _latent(6, 7, seed=32)]),
                         (4, 5), 6, 32),
    "flux-kontext-two-index": ("flux", lambda: dict(reference_latents=[_latent(8, 10, seed=31), _latent(6, 7, seed=32)],
                                                     reference_latents_method="index"), (4, 5), 6, 32),
    "flux-kontext-two-uxo": ("flux", lambda: dict(reference_latents=[_latent(8, 10, seed=31), _latent(6, 7, seed=32)],
                                                   reference_latents_method="uxo"), (4, 5), 6, 32),
    "qwen-image-edit": ("qwen-image", lambda: dict(reference_latents=[_latent(1, 8, 10, seed=33)]), (4, 5), 6, 20),
    "qwen-image-edit-two-offset": ("qwen-image", lambda: dict(
        reference_latents=[_latent(1, 8, 10, seed=34), _latent(1, 6, 7, seed=35)], reference_latents_method="offset"),
        (4, 5), 6, 32),
    "hunyuan-video-ref-latent": ("hunyuan-video", lambda: dict(ref_latent=_latent(1, 8, 8, seed=36)), (3, 4, 4), 6, 16),
}



def _run(comfy, patcher, family, extras, cfg=1.0):
    """A sample whose positive and negative conditioning both carry ``extras``."""
    case = MORE_CASES.get(family) or CASES[family]
    cond = case.cond()
    cond[0][1].update(extras)
    negative = [[torch.flip(c, dims=(1,)), dict(extra)] for c, extra in cond]
    noise = torch.randn(case.latent, generator=torch.Generator().manual_seed(5))
    return comfy.sample.sample(patcher, noise, STEPS, cfg, "euler", "simple", cond, negative, torch.zeros(case.latent),
                               seed=0, disable_pbar=True)


def _reference_mask(pattern_mask, references, text_first):
    """The allowed pairs of [grid, references] (text first) or [references, grid] (text last): the pattern on the
    grid, every pair with a reference token; ``masked_reference`` adds the text's rows and columns."""
    n = pattern_mask.shape[-1]
    allowed = torch.ones(n + references, n + references, dtype=torch.bool)
    grid = slice(0, n) if text_first else slice(references, n + references)
    allowed[grid, grid] = pattern_mask
    return allowed


@pytest.mark.parametrize("name", list(REFERENCES))
def test_dense_through_the_node_is_comfyuis_own_output(comfy, models, name):
    family, extras = REFERENCES[name][:2]
    model = models(family)
    own = _run(comfy, model, family, extras())
    patched = NODE_CLASS_MAPPINGS["DitAccelDense"]().patch(model, **COMMON_WIDGETS)[0]
    assert torch.equal(_run(comfy, patched, family, extras()), own)


@pytest.mark.parametrize("name, pattern", [(n, p) for n in REFERENCES for p in ("tile", "gna")])
def test_references_run_exact_and_the_image_follows_the_pattern(comfy, models, sparse_calls, name, pattern):
    family, extras, grid, text, references = REFERENCES[name]
    model = models(family)
    text_first = (MORE_CASES.get(family) or CASES[family]).text == "first"
    method, mask_of = PATTERNS[len(grid)][pattern]
    mask = mask_of(grid)
    assert not mask.all()  # a real pattern on this grid, not dense
    reference_calls = []
    allowed = _reference_mask(mask, references, text_first)
    reference = _run(comfy, with_override(model, masked_reference(allowed, "first" if text_first else "last",
                                                                  reference_calls)), family, extras())
    out = _run(comfy, patch_model(model, method, backend="torch"), family, extras())
    tokens = text + references + mask.shape[-1]
    assert sparse_calls == reference_calls == [tokens] * LAYERS * STEPS  # every self-attention call, sparse
    assert (out - _run(comfy, model, family, extras())).abs().max() > 1e-3  # the pattern changes the result ...
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # ... exactly as the reference does


def test_a_batched_call_with_references_runs_sparse(comfy, models, sparse_calls):
    """At cfg > 1 the positive and negative conditioning run as one call of batch 2, references batched too."""
    family, extras, grid, text, references = REFERENCES["flux-kontext-two"]
    model = models(family)
    method, mask_of = PATTERNS[2]["tile"]
    allowed = _reference_mask(mask_of(grid), references, True)
    reference = _run(comfy, with_override(model, masked_reference(allowed, "first")), family, extras(), cfg=2.0)
    out = _run(comfy, patch_model(model, method, backend="torch"), family, extras(), cfg=2.0)
    assert sparse_calls == [text + references + 20] * LAYERS * STEPS
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["flux-kontext-two", "qwen-image-edit-two-offset", "hunyuan-video-ref-latent"])
def test_the_reference_tokens_are_read_per_call_and_logged(comfy, models, caplog, name):
    family, extras, grid, text, references = REFERENCES[name]
    model = models(family)
    inner = model.model.diffusion_model
    found = family_for(inner)
    call = dict(extras(), ref_latents=extras().get("reference_latents"))
    x = torch.zeros((MORE_CASES.get(family) or CASES[family]).latent)
    assert found.references(inner, x, call, grid) == references
    assert found.references(inner, x, {}, grid) == 0  # no references: the family's own layout
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        _run(comfy, patch_model(model, PATTERNS[len(grid)]["tile"][0], backend="torch"), family, extras())
    assert f"grid {grid} + {references} reference tokens (dense) step 0/2: {LAYERS} layers sparse" in caplog.text


def test_chroma_ignores_reference_latents_and_so_does_dit_accel(comfy, models, sparse_calls):
    """ComfyUI's Chroma inherits FLUX's conditioning (``ref_latents`` reach its forward) but adds no tokens."""
    model = models("chroma")
    assert family_for(model.model.diffusion_model).references is None
    extras = dict(reference_latents=[_latent(8, 10, seed=37)])
    method, mask_of = PATTERNS[2]["tile"]
    reference = _run(comfy, with_override(model, masked_reference(mask_of((4, 5)), "first")), "chroma", extras)
    out = _run(comfy, patch_model(model, method, backend="torch"), "chroma", extras)
    assert sparse_calls == [6 + 20] * LAYERS * STEPS
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
