"""dit_accel.comfyui.patch_model on ComfyUI's own model classes, sampled with ComfyUI's own sampler.

Exactness per family (fp32, CPU): Dense() through the node is ComfyUI's own output bit for bit; every static
pattern equals a masked-dense reference attention (tests/comfyui/models.py) on ComfyUI's token layout;
SLA and VSA at full density equal dense. The schedule follows ComfyUI's sigmas.
"""

import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.patterns.gna import gna_mask
from dit_accel.patterns.radial import radial_mask
from dit_accel.patterns.tile import tile_mask
from dit_accel.plans.sparse_plan import Phase, SparsePlan

from tests.comfyui.models import CASES, masked_reference, override_of, sample, with_override

FAMILIES = list(CASES)



@pytest.mark.parametrize("family", FAMILIES)
def test_dense_through_the_node_is_comfyuis_own_output(comfy, models, family):
    case, model = CASES[family], models(family)
    own = sample(comfy, model, case)
    (patched,) = NODE_CLASS_MAPPINGS["DitAccelDense"]().patch(model, dense_steps=0, dense_last_steps=0,
                                                              dense_above_sigma=0.0, dense_layers="", backend="auto")
    assert torch.equal(sample(comfy, patched, case), own)
    assert torch.equal(sample(comfy, model, case), own)  # and the original is as it was


PATTERNS = {
    "tile": (dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1)), lambda g: tile_mask(g, (1, 2, 2), (3, 1, 1))),
    "gna": (dit_accel.GNA(kernel_size=(2, 3, 3), stride=(1, 1, 2)), lambda g: gna_mask(g, (2, 3, 3), (1, 1, 2))),
}
IMAGE_PATTERNS = {  # FLUX: a (H, W) grid
    "tile": (dit_accel.Tile(tile=(2, 2), window=(1, 1)), lambda g: tile_mask(g, (2, 2), (1, 1))),
    "gna": (dit_accel.GNA(kernel_size=(3, 3), stride=(1, 2)), lambda g: gna_mask(g, (3, 3), (1, 2))),
}


@pytest.mark.parametrize("family, pattern", [(f, "tile") for f in FAMILIES]
                         + [(f, "gna") for f in ("wan21-t2v", "hunyuan-video", "flux", "ltx-video")])
def test_a_pattern_equals_the_masked_dense_reference(comfy, models, family, pattern):
    case, model = CASES[family], models(family)
    method, mask_of = (IMAGE_PATTERNS if len(case.latent) == 4 else PATTERNS)[pattern]
    mask = mask_of(case.grid())
    assert not mask.all()  # a real pattern on this grid, not dense
    calls = []
    reference = sample(comfy, with_override(model, masked_reference(mask, case.text, calls)), case)
    assert calls and len(calls) % 2 == 0  # the reference saw the self-attention calls (2 layers, 2 steps)
    out = sample(comfy, patch_model(model, method, backend="torch"), case)
    dense = sample(comfy, model, case)
    assert (out - dense).abs().max() > 1e-3  # the pattern changes the result ...
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # ... exactly as the reference does


@pytest.mark.parametrize("family", ["wan21-t2v", "flux"])  # (ComfyUI's HunyuanVideo masks text of batch 1 only)
def test_classifier_free_guidance_batches_cond_and_uncond_through_the_same_path(comfy, models, family, monkeypatch):
    case, model = CASES[family], models(family)
    method, mask_of = (IMAGE_PATTERNS if len(case.latent) == 4 else PATTERNS)["tile"]
    batches = []
    run = dit_accel.plans.plan.Plan.run

    def counted(self, q, *args, **kwargs):  # the one execution path of the Diffusers hooks and the fidelity bench
        batches.append(q.shape[0])
        return run(self, q, *args, **kwargs)

    monkeypatch.setattr(dit_accel.plans.plan.Plan, "run", counted)
    reference = sample(comfy, with_override(model, masked_reference(mask_of(case.grid()), case.text)), case, cfg=3.0)
    out = sample(comfy, patch_model(model, method, backend="torch"), case, cfg=3.0)
    assert batches == [2] * 4  # 2 layers x 2 steps, cond and uncond in one call
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_radial_equals_the_masked_dense_reference_on_a_longer_wan_clip(comfy, models):
    case, model = CASES["wan21-t2v"], models("wan21-t2v")
    latent = (1, 16, 8, 16, 16)  # grid (8, 8, 8): 64-token frames, so far frame pairs get bands
    method = dit_accel.Radial(decay=0.5, block_size=64, sink_frames=())
    mask = radial_mask((8, 8, 8), 64, 0.5, ())
    assert not mask.all()
    reference = sample(comfy, with_override(model, masked_reference(mask, "none")), case, latent=latent)
    out = sample(comfy, patch_model(model, method, backend="torch"), case, latent=latent)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["wan21-t2v", "hunyuan-video"])
@pytest.mark.parametrize("method", [dit_accel.SLA(topk=1.0), dit_accel.VSA(topk=64, tile=(1, 2, 2))], ids=["sla", "vsa"])
def test_data_dependent_methods_at_full_density_equal_dense(comfy, models, family, method):
    case, model = CASES[family], models(family)
    out = sample(comfy, patch_model(model, method, backend="torch"), case)
    reference = sample(comfy, with_override(model, masked_reference(torch.ones(48, 48, dtype=torch.bool),
                                                                    case.text)), case)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def _steps(patched):
    """{step: 'sparse' | 'dense'} from the patch's report lines (one per model call)."""
    out = {}
    for line in override_of(patched).patch.report.lines:
        step = int(line.split(" step ")[1].split("/")[0])
        out[step] = "sparse" if "sparse" in line else "dense"
    return out


def test_dense_steps_follow_comfyuis_sigmas(comfy, models):
    case, model = CASES["wan21-t2v"], models("wan21-t2v")
    patched = patch_model(model, PATTERNS["tile"][0], dense_steps=1, dense_last_steps=1)
    sample(comfy, patched, case, steps=4)
    assert _steps(patched) == {0: "dense", 1: "sparse", 2: "sparse", 3: "dense"}
    # a second-order sampler calls the model again between steps: each call belongs to the step its sigma is in
    patched = patch_model(model, PATTERNS["tile"][0], dense_steps=2)
    sample(comfy, patched, case, steps=4, sampler="dpmpp_2s_ancestral")
    lines = override_of(patched).patch.report.lines
    assert len(lines) > 4  # the inner evaluations ran too
    assert _steps(patched) == {0: "dense", 1: "dense", 2: "sparse", 3: "sparse"}


def test_dense_above_sigma(comfy, models):
    case, model = CASES["wan21-t2v"], models("wan21-t2v")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4)
    threshold = float(sigmas[1] + sigmas[2]) / 2  # steps 0 and 1 above it, 2 and 3 below
    patched = patch_model(model, PATTERNS["tile"][0], dense_above_sigma=threshold)
    sample(comfy, patched, case, steps=4)
    assert _steps(patched) == {0: "dense", 1: "dense", 2: "sparse", 3: "sparse"}


def test_a_plans_steps_follow_comfyuis_steps(comfy, models):
    case, model = CASES["wan21-t2v"], models("wan21-t2v")
    tile = PATTERNS["tile"][0]
    plan = SparsePlan([Phase(0, 1), Phase(1, 3, {1: tile}), Phase(3, None, default=tile)], num_layers=2,
                      provenance={"model_class": "WanTransformer3DModel", "steps": 4, "grids": [[3, 4, 4]]})
    patched = patch_model(model, plan)
    sample(comfy, patched, case, steps=4)
    lines = override_of(patched).patch.report.lines
    assert ["2 layers dense" in lines[0], "1 layers sparse" in lines[1], "1 layers sparse" in lines[2],
            "2 layers sparse" in lines[3]] == [True] * 4
    with pytest.raises(ValueError, match="calibrated for 4 denoising steps; this run has 3") as err:
        sample(comfy, patch_model(model, plan), case, steps=3)
    assert "Run 4 steps (the KSampler's steps)" in str(err.value) and "CLI" not in str(err.value)  # ComfyUI's words
    with pytest.raises(ValueError, match="calibrated for token grid") as err:
        sample(comfy, patch_model(model, plan), case, steps=4, latent=(1, 16, 3, 8, 12))
    assert "turn on the node's allow_other_grid" in str(err.value) and "CLI" not in str(err.value)


def test_a_plan_for_another_model_is_refused(models):
    plan = SparsePlan([Phase(0, None, default=PATTERNS["tile"][0])], num_layers=2,
                      provenance={"model_class": "HunyuanVideoTransformer3DModel"})
    with pytest.raises(ValueError, match="calibrated for HunyuanVideoTransformer3DModel"):
        patch_model(models("wan21-t2v"), plan)


def test_the_override_stacks_on_the_one_before(comfy, models):
    case, model = CASES["wan21-t2v"], models("wan21-t2v")
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(args[1].shape[1])  # key tokens: 48 self-attention, 8 cross-attention
        return func(*args, **kwargs)

    before = with_override(model, previous)
    sample(comfy, patch_model(before, PATTERNS["tile"][0]), case)
    assert sorted(set(seen)) == [8]  # cross-attention declined to it; self-attention ran the method
    seen.clear()
    out = sample(comfy, patch_model(before, dit_accel.Dense()), case)
    assert sorted(set(seen)) == [8, 48]  # Dense() declines every call: all reach the override before
    assert torch.equal(out, sample(comfy, before, case))
    assert override_of(before) is previous  # the clone got the stack; the model given stays as it was


def test_what_ran_is_logged(comfy, models, caplog):
    case, model = CASES["hunyuan-video"], models("hunyuan-video")
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        sample(comfy, patch_model(model, PATTERNS["tile"][0], dense_layers=[1], backend="torch"), case)
    text = caplog.text
    assert "HunyuanVideo grid (3, 4, 4)" in text and "1 layers sparse (Tile(" in text and "backend torch" in text
    assert "1 layers dense (dense layer)" in text


def test_an_uncovered_model_is_a_one_line_error(models):
    class Other(torch.nn.Module):
        pass

    clone = models("wan21-t2v").clone()
    clone.model = type("BaseModel", (), {"diffusion_model": Other()})()
    with pytest.raises(ValueError, match=r"^dit_accel: the ComfyUI model Other is not covered .*WanModel") as err:
        patch_model(clone, dit_accel.Tile())
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="needs a ComfyUI MODEL"):
        patch_model(torch.nn.Linear(2, 2), dit_accel.Tile())
    with pytest.raises(ValueError, match="backend='cuda' is invalid"):
        patch_model(models("wan21-t2v"), dit_accel.Tile(), backend="cuda")
    with pytest.raises(ValueError, match="dense_above_sigma=-1 is invalid"):
        patch_model(models("wan21-t2v"), dit_accel.Tile(), dense_above_sigma=-1)


def test_a_video_method_on_an_image_model_is_a_one_line_error(comfy, models):
    with pytest.raises(ValueError, match=r"'radial' needs a video's \(T, H, W\) token grid, but the sparse calls "
                                         r"of FLUX \(FluxTransformer2DModel\) see a 2-D") as err:
        patch_model(models("flux"), dit_accel.Radial())  # (refused by the node, before any sampling)
    assert "\n" not in str(err.value)


def test_the_triton_kernel_runs_through_the_node(comfy, models):
    case, model = CASES["wan21-t2v"], models("wan21-t2v")
    method, mask_of = PATTERNS["gna"]
    reference = sample(comfy, with_override(model, masked_reference(mask_of(case.grid()), case.text)), case)
    patched = patch_model(model, method, backend="triton")
    out = sample(comfy, patched, case)
    assert "backend triton" in override_of(patched).patch.report.lines[-1]
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)  # (Triton's interpreter on CPUs, fp32)
