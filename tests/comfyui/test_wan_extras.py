"""Tokens off the video grid on ComfyUI's plain ``WanModel``: Wan 2.2 Fun's reference image (a ``ref_conv`` puts the
``reference_latent``'s tokens before the video) and Phantom's subject frames (``time_dim_concat`` frames after the
video's, dropped from the output): [reference, video, subject frames]. Their tokens keep exact rows and columns, as
text does, and the generated video's pairs follow the pattern: Dense through the node is ComfyUI's own output bit for
bit; Tile and GNA equal a masked-dense reference, with every self-attention call of every model call on the sparse
path (so no test passes by falling back to ComfyUI's attention). Plain Wan calls hold the video alone, as before."""

import logging
from dataclasses import replace

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.families import family_for
from dit_accel.patterns.gna import gna_mask
from dit_accel.patterns.tile import tile_mask

from tests.comfyui.models import CASES, COMMON_WIDGETS, WAN_EXTRA_CASES, masked_reference, sample, with_override

STEPS = 2  # model calls per sample at cfg 1
LAYERS = 2  # blocks.*.self_attn of the tiny Wan models
GRID = (3, 4, 4)  # the generated video's latent (1, 16, 3, 8, 8) in 1 x 2 x 2 patches: 48 tokens
PATTERNS = {
    "tile": (dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), tile_mask(GRID, (1, 2, 2), (3, 1, 1))),
    "gna": (dit_accel.GNA(kernel_size=(2, 3, 3), stride=(1, 1, 2)), gna_mask(GRID, (2, 3, 3), (1, 1, 2))),
}
# case: (tokens before the video, tokens after it)
EXTRAS = {
    "wan22-fun-ref": (16, 0),  # the reference image's latent frame, 8 x 8 in 2 x 2 patches
    "wan21-phantom": (0, 32),  # two subject frames
    "wan-ref-phantom": (16, 32),
}



def _allowed(name, pattern_mask):
    """The allowed pairs of the call's tokens after the leading ones (``masked_reference`` keeps their rows and
    columns): the pattern on the grid, every pair with a subject-frame token."""
    after = EXTRAS[name][1]
    n = pattern_mask.shape[-1]
    allowed = torch.ones(n + after, n + after, dtype=torch.bool)
    allowed[:n, :n] = pattern_mask
    return allowed


def _run(comfy, patcher, case, cfg=1.0):
    """A sample; at cfg > 1 the negative conditioning (other text, Phantom's zero subject frames, the same reference
    image) runs batched with the positive in one model call."""
    cond = case.cond()
    negative = [[torch.flip(c, dims=(1,)), dict(extra)] for c, extra in cond]
    if "time_dim_concat" in negative[0][1]:
        negative[0][1]["time_dim_concat"] = torch.zeros_like(negative[0][1]["time_dim_concat"])
    noise = torch.randn(case.latent, generator=torch.Generator().manual_seed(5))
    return comfy.sample.sample(patcher, noise, STEPS, cfg, "euler", "simple", cond, negative, torch.zeros(case.latent),
                               seed=0, disable_pbar=True)


@pytest.mark.parametrize("name", list(EXTRAS))
def test_dense_through_the_node_is_comfyuis_own_output(comfy, models, name):
    case, model = WAN_EXTRA_CASES[name], models(name)
    own = _run(comfy, model, case)
    patched = NODE_CLASS_MAPPINGS["DitAccelDense"]().patch(model, **COMMON_WIDGETS)[0]
    assert torch.equal(_run(comfy, patched, case), own)


@pytest.mark.parametrize("name, pattern", [(n, p) for n in EXTRAS for p in PATTERNS])
def test_the_extra_tokens_run_exact_and_the_video_follows_the_pattern(comfy, models, sparse_calls, name, pattern):
    case, model = WAN_EXTRA_CASES[name], models(name)
    method, mask = PATTERNS[pattern]
    assert not mask.all()  # a real pattern on this grid, not dense
    before, after = EXTRAS[name]
    reference_calls = []
    override = masked_reference(_allowed(name, mask), "first" if before else "last", reference_calls)
    reference = _run(comfy, with_override(model, override), case)
    out = _run(comfy, patch_model(model, method, backend="torch"), case)
    assert sparse_calls == reference_calls == [before + 48 + after] * LAYERS * STEPS  # every call, sparse
    assert (out - _run(comfy, model, case)).abs().max() > 1e-3  # the pattern changes the result ...
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # ... exactly as the reference does


def test_phantoms_batched_positive_and_negative_run_sparse(comfy, models, sparse_calls):
    case, model = WAN_EXTRA_CASES["wan21-phantom"], models("wan21-phantom")
    method, mask = PATTERNS["tile"]
    reference = _run(comfy, with_override(model, masked_reference(_allowed("wan21-phantom", mask), "last")), case,
                     cfg=2.0)
    out = _run(comfy, patch_model(model, method, backend="torch"), case, cfg=2.0)
    assert sparse_calls == [48 + 32] * LAYERS * STEPS
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(EXTRAS))
def test_the_extra_tokens_are_counted_per_call_and_logged(comfy, models, caplog, name):
    case, model = WAN_EXTRA_CASES[name], models(name)
    inner = model.model.diffusion_model
    family = family_for(inner)
    assert family.name == "Wan" and type(inner).__name__ == "WanModel"
    extras = case.cond()[0][1]
    call = dict(time_dim_concat=extras.get("time_dim_concat"))
    if "reference_latents" in extras:
        call["reference_latent"] = extras["reference_latents"][-1][:, :, 0]  # as ComfyUI's WAN21 passes it
    x = torch.zeros(case.latent)
    assert family.grid(inner, x, call) == GRID  # the generated video's frames only
    assert (family.off_grid(inner, x, call, GRID), family.references(inner, x, call, GRID)) == EXTRAS[name]
    assert (family.off_grid(inner, x, {}, GRID), family.references(inner, x, {}, GRID)) == (0, 0)
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        _run(comfy, patch_model(model, PATTERNS["tile"][0], backend="torch"), case)
    after = f" + {EXTRAS[name][1]} reference tokens (dense)" if EXTRAS[name][1] else ""
    assert f"WanModel grid {GRID}{after} step 0/2: {LAYERS} layers sparse" in caplog.text
    assert "does not match the token grid" not in caplog.text


def test_the_counts_follow_the_call_not_the_grid(models):
    """A reference in whole spatial patches (the Conv2d drops a partial one), subject frames padded to whole
    patches; a model without a ref_conv ignores a reference latent, as ComfyUI's does."""
    inner = models("wan-ref-phantom").model.diffusion_model
    family, x = family_for(inner), torch.zeros(1, 16, 3, 8, 8)
    assert family.off_grid(inner, x, {"reference_latent": torch.zeros(1, 16, 7, 9)}, GRID) == 3 * 4
    assert family.references(inner, x, {"time_dim_concat": torch.zeros(1, 16, 3, 7, 8)}, GRID) == 3 * 4 * 4
    plain = models("wan21-t2v").model.diffusion_model
    assert plain.ref_conv is None
    assert family.off_grid(plain, x, {"reference_latent": torch.zeros(1, 16, 8, 8)}, GRID) == 0


@pytest.mark.parametrize("name", ["wan21-t2v", "wan22-fun-ref"])
def test_plain_calls_are_the_video_alone_as_before(comfy, models, sparse_calls, name):
    """Plain Wan T2V, and the Fun model called without a reference image: every call holds the 48 video tokens."""
    case, model = CASES.get(name) or WAN_EXTRA_CASES[name], models(name)
    if name == "wan22-fun-ref":
        with_reference = case.cond
        case = replace(case, cond=lambda: [[c, dict(e, reference_latents=None)] for c, e in with_reference()])
    method, mask = PATTERNS["tile"]
    reference_calls = []
    reference = sample(comfy, with_override(model, masked_reference(mask, "none", reference_calls)), case)
    out = sample(comfy, patch_model(model, method, backend="torch"), case)
    assert sparse_calls == reference_calls == [48] * LAYERS * STEPS
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def _four_more_tokens(args, extra):
    """A Wan ``double_block`` replacement (ComfyUI's ``patches_replace["dit"]``) whose block attends over 4 more
    tokens than the call's conditioning says: no rule counts them."""
    img, pe = args["img"], args["pe"]
    out = extra["original_block"](dict(args, img=torch.cat([img, img[:, :4]], 1), pe=torch.cat([pe, pe[:, :4]], 1)))
    return {"img": out["img"][:, :-4]}


@pytest.mark.parametrize("name, queries", [("wan21-t2v", 52), ("wan21-phantom", 84)])
def test_tokens_no_rule_counts_run_comfyuis_attention_and_say_so(comfy, models, caplog, sparse_calls, name, queries):
    case, model = CASES.get(name) or WAN_EXTRA_CASES[name], models(name)
    extended = model.clone()
    for block in range(LAYERS):
        extended.set_model_patch_replace(_four_more_tokens, "dit", "double_block", block)
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        out = _run(comfy, patch_model(extended, PATTERNS["tile"][0], backend="torch"), case)
    assert f"{queries} queries" in caplog.text and f"does not match the token grid {GRID}" in caplog.text
    assert f"{LAYERS} layers dense (call does not match the grid)" in caplog.text and not sparse_calls
    assert torch.equal(out, _run(comfy, extended, case))
