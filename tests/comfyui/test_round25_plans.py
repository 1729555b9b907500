"""Round 25 (trust): a calibrated SparsePlan run inside ComfyUI runs exactly the method its phase names for each
layer, head and step of every model call ComfyUI's sampler makes (cfg 2: positive and negative in one call; Heun's
two calls a step), against a masked-dense reference of ComfyUI's own attention whose masks are the pattern's one
definition, picked per call from the plan read as data. Each comparison is shown able to fail (two layers' methods
swapped). A plan made for another model, layer or head count, grid or step count is refused, naming both."""

import dataclasses
import importlib
import math

import pytest
import torch

from dit_accel import GNA, Dense, PerHead, Phase, SparsePlan, Tile
from dit_accel.comfyui import patch_model
from dit_accel.patterns.gna import gna_mask
from dit_accel.patterns.tile import tile_mask

from tests.comfyui.models import ALL_CASES, build, masked_reference, override_of, report_steps, sample, with_override

TOL = dict(rtol=1e-5, atol=2e-5)

# Wan: 3 x 8 x 8 tokens (a 16 x 16 latent of 3 frames); one tile= for every method, as a PerHead needs
WAN = dataclasses.replace(ALL_CASES["wan21-t2v"], latent=(1, 16, 3, 16, 16))
WAN_GRID = (3, 8, 8)
TILE = Tile(tile=(1, 8, 8), window=(1, 1, 1))
GNA5 = GNA(kernel_size=(2, 5, 5), tile=(1, 8, 8))


def _masks(grid, tile, gna):
    n = math.prod(grid)
    return {tile: tile_mask(grid, tile.tile, tile.window), gna: gna_mask(grid, gna.kernel_size),
            Dense(): torch.ones(n, n, dtype=torch.bool)}


WAN_MASKS = _masks(WAN_GRID, TILE, GNA5)


def _wan_plan(swap_layers=False, **fields):
    """Dense first step; then per layer and per head (Tile and GNA of one tile=, a Dense head) in two phases."""
    a, b = {0: PerHead((TILE, GNA5)), 1: GNA5}, {0: TILE, 1: PerHead((Dense(), TILE))}
    if swap_layers:
        a, b = {0: a[1], 1: a[0]}, {0: b[1], 1: b[0]}
    return SparsePlan((Phase(0, 1), Phase(1, 3, a), Phase(3, None, b)), num_layers=2, num_heads=2, **fields)


def _heads_mask(plan, masks, layer, step, heads=2):
    """The ``[heads, N, N]`` mask of ``layer`` at ``step``, the plan read as data (not through dit_accel)."""
    phase = next((p for p in plan.phases if p.covers(step)), None)
    method = Dense() if phase is None else phase.layers.get(layer, phase.default)
    return torch.stack([masks[m] for m in (method.methods if isinstance(method, PerHead) else (method,) * heads)])


def _plan_reference(plan, masks, steps_of_calls, layers=2):
    """A masked-dense override choosing each self-attention call's mask: the ``i``-th such call is layer
    ``i % layers`` of model call ``i // layers``, which the sampler makes at step ``steps_of_calls[i // layers]``."""
    count = []

    def select(q, k):
        i = len(count)
        count.append(i)
        return _heads_mask(plan, masks, i % layers, steps_of_calls[i // layers])

    return select, count


def _run_wan(comfy, model, plan, sampler, steps, cfg):
    noise = torch.randn(WAN.latent, generator=torch.Generator().manual_seed(5))
    cond = WAN.cond()
    negative = [[torch.flip(c, dims=(1,)), e] for c, e in cond]
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", cond, negative, torch.zeros(WAN.latent),
                               seed=0, disable_pbar=True)


@pytest.fixture(scope="module")
def wan_model(comfy):
    return build(comfy, WAN)


@pytest.mark.parametrize("sampler, calls", [("euler", [0, 1, 2, 3]), ("heun", [0, 0, 1, 1, 2, 2, 3])],
                         ids=["euler", "heun"])
def test_a_mixed_plan_runs_each_layers_heads_method_at_each_sampler_step(comfy, wan_model, sampler, calls):
    """cfg 2 (one call of batch 2 per evaluation): every call of step i runs phase i's method for its layer and head;
    and the same comparison with the two layers' methods swapped is told apart."""
    plan = _wan_plan()
    ours = _run_wan(comfy, patch_model(wan_model, plan, backend="torch"), plan, sampler, 4, 2.0)
    select, count = _plan_reference(plan, WAN_MASKS, calls)
    n = math.prod(WAN_GRID)
    ref = _run_wan(comfy, with_override(wan_model, masked_reference(select, "none", n=n)), plan, sampler, 4, 2.0)
    assert len(count) == 2 * len(calls)
    torch.testing.assert_close(ours, ref, **TOL)
    select, _ = _plan_reference(_wan_plan(swap_layers=True), WAN_MASKS, calls)
    swapped = _run_wan(comfy, with_override(wan_model, masked_reference(select, "none", n=n)), plan, sampler, 4, 2.0)
    assert (swapped - ours).abs().max() > 10 * TOL["atol"]


def test_a_per_head_plan_on_flux_and_a_partial_schedule_run_exactly(comfy, wan_model):
    """FLUX's joint layers ([text, image]; text rows and keys dense) with a PerHead per layer at cfg 2; and a plan
    recorded for 8 steps on a KSampler at denoise 0.5 of 4 steps, which runs steps 4-7 of the 8-step schedule: each
    the reference's, and not the reference of the plan with its layers' methods swapped."""
    flux = dataclasses.replace(ALL_CASES["flux"], latent=(1, 16, 32, 16))  # 16 x 8 tokens
    grid, n = flux.grid(), 128
    tile, gna = Tile(tile=(8, 8), window=(1, 1)), GNA(kernel_size=(5, 5), tile=(8, 8))
    masks = _masks(grid, tile, gna)

    def flux_plan(swap=False):
        layers = [PerHead((gna, tile)), PerHead((Dense(), gna))]
        return SparsePlan((Phase(0, 1), Phase(1, None, dict(enumerate(layers[::-1] if swap else layers)))),
                          num_layers=2, num_heads=2)

    model = build(comfy, flux)
    ours = sample(comfy, patch_model(model, flux_plan(), backend="torch"), flux, steps=3, cfg=2.0)
    for swap in (False, True):
        select, count = _plan_reference(flux_plan(swap), masks, [0, 1, 2])
        ref = sample(comfy, with_override(model, masked_reference(select, "first", n=n)), flux, steps=3, cfg=2.0)
        if not swap:
            assert len(count) == 6
            torch.testing.assert_close(ours, ref, **TOL)
        else:
            assert (ours - ref).abs().max() > 10 * TOL["atol"]

    plan = SparsePlan((Phase(0, 1), Phase(1, 6, {0: PerHead((TILE, GNA5)), 1: GNA5}),
                       Phase(6, None, {0: TILE, 1: PerHead((Dense(), TILE))})), num_layers=2, num_heads=2,
                      provenance={"steps": 8})
    noise = torch.randn(WAN.latent, generator=torch.Generator().manual_seed(5))
    cond = WAN.cond()

    def run(patched):
        return comfy.sample.sample(patched, noise, 4, 2.0, "euler", "simple", cond, cond, torch.zeros(WAN.latent),
                                   denoise=0.5, seed=0, disable_pbar=True)

    ours = run(patch_model(wan_model, plan, backend="torch"))
    for steps, same in (([4, 5, 6, 7], True), ([3, 4, 5, 6], False)):  # (a count from the part's own 0 is told apart)
        select, _ = _plan_reference(plan, WAN_MASKS, steps)
        ref = run(with_override(wan_model, masked_reference(select, "none", n=math.prod(WAN_GRID))))
        assert torch.allclose(ours, ref, **TOL) == same, steps


def test_a_plan_for_another_head_count_is_refused_on_lumina2(comfy, models):
    """Lumina 2's attention modules name their heads ``n_local_heads``: a plan for 4 heads ran on the 2-head model
    without a word, and a PerHead of 4 failed at the first sampling step. Both refused by patch_model, naming both."""
    model = models("lumina2")
    tile = Tile(tile=(2, 2), window=(1, 3))
    for plan, said in ((SparsePlan((Phase(0, None, {0: tile}),), num_layers=3, num_heads=4),
                        "the plan is for 4 heads per attention layer; the self-attention layers of this MODEL "
                        "(ComfyUI's NextDiT, Lumina 2) have 2"),
                       (SparsePlan((Phase(0, None, {1: PerHead((tile, Dense(), tile, Dense()))}),), num_layers=3),
                        "give layer 1 4 per-head methods; that layer of this MODEL (ComfyUI's NextDiT, Lumina 2) has "
                        "2 heads; calibrate a plan for this model")):
        with pytest.raises(ValueError) as err:
            patch_model(model, plan)
        assert str(err.value).startswith("dit_accel: ") and said in str(err.value), str(err.value)


def test_a_plan_for_another_model_layer_count_or_heads_is_refused_by_patch_model(wan_model):
    """Refused before sampling, one line naming the plan's value and this MODEL's (ComfyUI's class and family), and
    what to do; before, all but the model class's refusal came in Diffusers' words ("this model has 2"), without
    dit_accel's prefix, and a PerHead of another head count said no remedy. The MODEL is unchanged."""
    plan = _wan_plan
    for bad, said in (
            (plan(provenance={"model_class": "FluxTransformer2DModel"}), "the plan was calibrated for "
             "FluxTransformer2DModel; this MODEL is ComfyUI's WanModel (Wan; Diffusers' WanTransformer3DModel)"),
            (dataclasses.replace(plan(), num_layers=3), "the plan is for 3 attention layers (another model); this "
             "MODEL (ComfyUI's WanModel, Wan) has 2: calibrate a plan for it"),
            (SparsePlan((Phase(1, None, {0: TILE}),), num_heads=4), "the plan is for 4 heads per attention layer; "
             "the self-attention layers of this MODEL (ComfyUI's WanModel, Wan) have 2: calibrate"),
            (SparsePlan((Phase(1, None, {0: PerHead((TILE, GNA5, TILE))}),)), "steps 1..end give layer 0 3 per-head "
             "methods; that layer of this MODEL (ComfyUI's WanModel, Wan) has 2 heads; calibrate a plan"),
            (SparsePlan((Phase(1, None, {5: TILE}),)), "the plan names layer 5 but this MODEL (ComfyUI's WanModel, "
             "Wan) has 2 attention layers (0..1)")):
        with pytest.raises(ValueError) as err:
            patch_model(wan_model, bad)
        text = str(err.value)
        assert text.startswith("dit_accel: ") and said in text and "calibrate" in text and "\n" not in text, text
    assert "optimized_attention_override" not in wan_model.model_options.get("transformer_options", {})


def test_a_plan_for_more_or_fewer_steps_is_refused_and_uncovered_steps_run_dense(comfy, wan_model):
    """A plan recorded for 6 steps on a 4-step KSampler, and one whose phases run to step 3 on 2 steps: refused at the
    first call, naming both counts. A custom sampler's refusal names what sets its steps, not a KSampler it does not
    have. A plan without a recorded count whose phases stop early runs the later steps dense (a step no phase covers
    runs dense), as the report says."""
    samplers = importlib.import_module("comfy.samplers")  # (ComfyUI is no declared dependency)

    for plan, steps, said in ((_wan_plan(provenance={"steps": 6}), 4, "calibrated for 6 denoising steps; this run "
                               "has 4: its phases name steps of a 6-step run. Run 6 steps (the KSampler's steps)"),
                              (_wan_plan(), 2, "has a phase for steps 1..2; this run has 2 denoising steps (0..1)")):
        with pytest.raises(ValueError) as err:
            _run_wan(comfy, patch_model(wan_model, plan, backend="torch"), plan, "euler", steps, 1.0)
        assert said in str(err.value), str(err.value)
    plan = _wan_plan(provenance={"steps": 8})
    cond = WAN.cond()
    with pytest.raises(ValueError) as err:
        comfy.sample.sample_custom(patch_model(wan_model, plan, backend="torch"), torch.zeros(WAN.latent), 1.0,
                                   samplers.sampler_object("euler"), torch.tensor([1.0, 0.7, 0.4, 0.1, 0.0]), cond,
                                   cond, torch.zeros(WAN.latent), seed=0, disable_pbar=True)
    text = str(err.value)
    assert "this run has 4" in text and "KSampler" not in text, text
    assert "Run 8 steps (the steps of the scheduler node whose sigmas the custom sampler takes, e.g. BasicScheduler's;" \
           " sigmas written by hand count as a whole schedule of their own)" in text
    short = SparsePlan((Phase(0, 1), Phase(1, 2, {0: TILE})), num_layers=2, num_heads=2)
    patched = patch_model(wan_model, short, backend="torch")
    _run_wan(comfy, patched, short, "euler", 4, 1.0)
    assert report_steps(patched) == [(0, 4, "dense"), (1, 4, "sparse"), (2, 4, "dense"), (3, 4, "dense")]


def test_the_logged_token_density_is_no_mean_of_some_layers(comfy, wan_model):
    """A step where one layer runs a PerHead (no token density of its own) and another a Tile (1/3): the log said
    "tokens 0.333", the Tile layer's alone, as the mean of the step. Now said only where every sparse layer has one."""
    plan = _wan_plan()
    patched = patch_model(wan_model, plan, backend="torch")
    _run_wan(comfy, patched, plan, "euler", 4, 1.0)
    lines = list(override_of(patched).patch.report.lines)
    assert "step 3/4: 2 layers sparse" in lines[3] and "(tokens" not in lines[3], lines[3]
    tiles = SparsePlan((Phase(0, None, {0: TILE, 1: TILE}),), num_layers=2)
    patched = patch_model(wan_model, tiles, backend="torch")
    _run_wan(comfy, patched, tiles, "euler", 1, 1.0)
    assert "mean density 0.333 (tokens 0.333)" in override_of(patched).patch.report.lines[0]
