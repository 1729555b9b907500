"""The node in workflows ComfyUI users build, beyond one KSampler on one model: samplers that call the model
several times per step (each call counts as the step the sampler is making, as Diffusers' ``step_index // order``
counts it), ComfyUI's TorchCompileModel before or after the node (torch.compile's module swapped in around
``apply_model``; Dynamo's frames without the locals the stack walk read), and the A14B split of one schedule over
two KSamplerAdvanced (the steps of the one schedule, as docs/comfyui.md says)."""

import importlib

import pytest
import torch

import dit_accel
from dit_accel.comfyui import patch_model

from tests.comfyui.models import ALL_CASES, CASES, override_of, sample

TILE_3D = dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))
TILE_2D = dit_accel.Tile(tile=(2, 2), window=(1, 1))


def _steps(patched):
    """The step of each model call, in order, with whether it ran sparse (the patch's report lines)."""
    out = []
    for line in override_of(patched).patch.report.lines:
        step = int(line.split(" step ")[1].split("/")[0])
        out.append((step, "sparse" if "sparse" in line else "dense"))
    return out


# the sampler's step of each model call at 4 steps: Heun's second call is at the next step's sigma, heunpp2's two
# more at the next two, dpm_2_ancestral's midpoint below the next sigma; sa_solver_pece's corrector at its own sigma
SAMPLER_STEPS = {
    "heun": [0, 0, 1, 1, 2, 2, 3],
    "heunpp2": [0, 0, 0, 1, 1, 1, 2, 2, 3],
    "dpm_2_ancestral": [0, 0, 1, 1, 2, 2, 3],
    "sa_solver_pece": [0, 1, 1, 2, 2, 3, 3],
    "euler": [0, 1, 2, 3],
}


@pytest.mark.parametrize("sampler", list(SAMPLER_STEPS))
def test_every_model_call_of_a_step_counts_as_that_step(comfy, wan, sampler):
    """dense_steps=1, dense_last_steps=1 of 4: every call of steps 0 and 3 dense, every call of 1 and 2 sparse (a
    Heun corrector at sigma 1 counted as step 1 ran step 0 half sparse, and step 2 half dense)."""
    patched = patch_model(wan, TILE_3D, dense_steps=1, dense_last_steps=1, backend="torch")
    sample(comfy, patched, CASES["wan21-t2v"], steps=4, sampler=sampler)
    expected = [(s, "dense" if s in (0, 3) else "sparse") for s in SAMPLER_STEPS[sampler]]
    assert _steps(patched) == expected


def test_two_ksampler_advanced_count_the_steps_of_their_one_schedule(comfy, wan):
    """Wan 2.2 A14B's split (high-noise steps 0-2, low-noise 2-4 of one schedule): the one schedule's steps, as
    Diffusers counts them over the two experts (dense_steps=1: step 0 alone is dense)."""
    case = CASES["wan21-t2v"]
    noise = torch.randn(case.latent, generator=torch.Generator().manual_seed(5))
    cond = case.cond()
    negative = [[torch.flip(c, dims=(1,)), extra] for c, extra in cond]
    expected = {0: [(0, "dense"), (0, "dense"), (1, "sparse")], 2: [(2, "sparse"), (2, "sparse"), (3, "sparse")]}
    for start, end in ((0, 2), (2, 4)):
        patched = patch_model(wan, TILE_3D, dense_steps=1, backend="torch")
        comfy.sample.sample(patched, noise, 4, 1.0, "heun", "simple", cond, negative, torch.zeros(case.latent),
                            seed=0, disable_pbar=True, start_step=start, last_step=end, force_full_denoise=end == 4)
        assert _steps(patched)[:3] == expected[start]


def _compiled(model):
    """``model`` as ComfyUI's TorchCompileModel node leaves it, with Dynamo's eager backend (no compiler on CPUs)."""
    torch_helpers = importlib.import_module("comfy_api.torch_helpers")
    clone = model.clone()
    torch_helpers.set_torch_compile_wrapper(clone, backend="eager")
    return clone


# each tiny model's self-attention layers (SD3: 2 joint and block 0's attn2; OmniGen2: the image refiner and 2 joint)
SELF_ATTENTION_LAYERS = {"sd3": 3, "wan21-t2v": 2, "mochi": 2, "omnigen2": 3}


@pytest.mark.parametrize("order", ["compile-then-node", "node-then-compile"])
@pytest.mark.parametrize("family", ["sd3", "wan21-t2v", "mochi", "omnigen2"])
def test_torch_compile_model_before_or_after_the_node(comfy, models, sparse_calls, family, order):
    """SD3 reads its grid in an apply_model wrapper: behind TorchCompileModel's it saw torch.compile's module, not
    its model, and every call ran dense; under Dynamo its ``_block_mixing`` frame holds no ``x_qkv2``, so SD3.5's
    ``attn2`` was taken for the joint attention (and ran dense with a warning). Mochi and OmniGen2 read theirs
    around ``apply_model`` too (``Family.hook``)."""
    case, model = ALL_CASES[family], models(family)
    method = TILE_2D if len(case.latent) == 4 else TILE_3D
    reference = sample(comfy, patch_model(model, method, backend="torch"), case)
    eager_runs = list(sparse_calls)
    sparse_calls.clear()
    torch._dynamo.reset()
    try:
        if order == "compile-then-node":
            patched = patch_model(_compiled(model), method, backend="torch")
        else:
            patched = _compiled(patch_model(model, method, backend="torch"))
        out = sample(comfy, patched, case)
    finally:
        torch._dynamo.reset()
    assert sparse_calls == eager_runs and len(eager_runs) == SELF_ATTENTION_LAYERS[family] * 2  # 2 steps
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
