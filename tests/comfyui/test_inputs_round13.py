"""Round 13 of the nodes: a sampler that runs part of a KSampler's schedule (``denoise`` below 1, KSamplerAdvanced's
start/end steps, Wan 2.2 A14B's two experts) counts the steps of the whole schedule, as Diffusers counts them at
``strength`` < 1 and over the two experts: each part counted from 0 ran a plan's early phase (and the dense steps)
at the late steps' noise, refused a plan for the whole schedule, and ran the last steps dense in every part."""

import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import patch_model

from tests.comfyui.models import CASES, report_steps

CASE = CASES["wan21-t2v"]
TILE = dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))


def _sample(comfy, patched, steps=4, denoise=1.0, start=None, end=None, sampler="euler", latent=None):
    """ComfyUI's KSampler; KSamplerAdvanced with ``start``/``end`` (the first part returns its leftover noise, a later
    part samples ``latent``, the earlier part's output, adding no noise), as Wan 2.2 A14B's workflow runs them."""
    later = latent is not None
    noise = torch.zeros(CASE.latent) if later else torch.randn(CASE.latent, generator=torch.Generator().manual_seed(5))
    cond = CASE.cond()
    negative = [[torch.flip(c, dims=(1,)), extra] for c, extra in cond]
    return comfy.sample.sample(patched, noise, steps, 1.0, sampler, "simple", cond, negative,
                               latent if later else torch.zeros(CASE.latent), denoise=denoise, seed=0,
                               disable_pbar=True, start_step=start, last_step=end,
                               force_full_denoise=end is None or end >= steps)


@pytest.mark.parametrize("sampler", ["euler", "heun", "uni_pc"])
def test_denoise_below_one_counts_the_steps_of_the_whole_schedule(comfy, wan, sampler):
    """denoise 0.5 of 4 steps: the last 4 of an 8-step schedule, steps 4-7 of 8; with dense_steps=1 and
    dense_last_steps=1 only step 7 runs dense (before: steps 0-3 of 4, steps 0 and 3 dense)."""
    patched = patch_model(wan, TILE, dense_steps=1, dense_last_steps=1, backend="torch")
    _sample(comfy, patched, denoise=0.5, sampler=sampler)
    assert sorted(set(report_steps(patched))) == [(4, 8, "sparse"), (5, 8, "sparse"), (6, 8, "sparse"), (7, 8, "dense")]


def test_the_two_parts_of_one_schedule_count_its_steps(comfy, wan, caplog):
    """Wan 2.2 A14B's split of 4 steps at step 2, dense_steps=1, dense_last_steps=1: step 0 and step 3 dense, steps 1
    and 2 sparse (before: each part counted 0-1 of 2, so every step ran dense, with a warning saying so)."""
    seen = []
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        for start, end in ((0, 2), (2, 4)):
            patched = patch_model(wan, TILE, dense_steps=1, dense_last_steps=1, backend="torch")
            _sample(comfy, patched, start=start, end=end)
            seen += report_steps(patched)
    assert seen == [(0, 4, "dense"), (1, 4, "sparse"), (2, 4, "sparse"), (3, 4, "dense")]
    assert "every step runs dense" not in caplog.text


def _plan(**provenance):
    """Steps 0-1 dense (the high-noise warm-up), steps 2-3 TILE: the phases of a 4-step run."""
    return dit_accel.SparsePlan([dit_accel.Phase(0, 2), dit_accel.Phase(2, None, default=TILE)], num_layers=2,
                                provenance=provenance)


def test_the_low_noise_part_runs_the_plans_phase_of_its_steps(comfy, wan):
    """The second part of a 4-step schedule split at step 2 runs the plan's phase for steps 2-3 (TILE): its output
    is TILE's on that part. Before it ran the phase of steps 0-1 (dense), and a plan recording its 4 steps was
    refused (``this run has 2``)."""
    high = _sample(comfy, wan, start=0, end=2)  # the high-noise part's output, with its leftover noise
    tile = _sample(comfy, patch_model(wan, TILE, backend="torch"), start=2, end=4, latent=high)
    dense = _sample(comfy, wan, start=2, end=4, latent=high)
    assert (tile - dense).abs().max() > 1e-4  # the phase changes the result
    for plan in (_plan(), _plan(steps=4)):
        patched = patch_model(wan, plan, backend="torch")
        out = _sample(comfy, patched, start=2, end=4, latent=high)
        assert [s for s, _, _ in report_steps(patched)] == [2, 3]
        torch.testing.assert_close(out, tile, rtol=1e-5, atol=1e-5)


def test_dense_steps_that_cover_a_part_are_said(comfy, wan, caplog):
    """dense_steps=2 of 4 covers the whole first part (steps 0-1): said, naming the part's steps."""
    patched = patch_model(wan, TILE, dense_steps=2, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        _sample(comfy, patched, start=0, end=2)
    assert [s for _, _, s in report_steps(patched)] == ["dense", "dense"]
    assert "dense_steps=2 + dense_last_steps=0 cover steps 0-1 of 4, all the steps this sampler runs" in caplog.text


def test_a_plan_for_other_steps_than_a_denoise_runs_schedule_says_why(comfy, wan):
    """denoise 0.5 of 4 steps samples a schedule of 8: a plan for 4 steps is refused, and the message says that the
    sampler runs steps 4-7 of 8 (a bare "this run has 8" left
    the user, whose KSampler says 4 steps, without a why)."""
    patched = patch_model(wan, _plan(steps=4), backend="torch")
    with pytest.raises(ValueError, match=r"this run has 8: .*\(this sampler runs steps 4-7 of the 8-step schedule: "
                                         r"denoise below 1 runs the last steps of int\(steps / denoise\)"):
        _sample(comfy, patched, denoise=0.5)


def test_a_dense_above_sigma_over_a_parts_every_step_is_still_said(comfy, wan, caplog):
    """The first part of 4 steps split at 2 samples at sigmas 1 and 0.96: dense_above_sigma=0.9 runs both dense, said
    with the part's lowest sigma (counting the whole schedule's steps must not hide it)."""
    patched = patch_model(wan, TILE, dense_above_sigma=0.9, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        _sample(comfy, patched, start=0, end=2)
    assert [s for _, _, s in report_steps(patched)] == ["dense", "dense"]
    assert "dense_above_sigma=0.9 is below the sigma of every step of this sampler (the last starts at 0.96" \
        in caplog.text
