"""Round 14 of the nodes: a custom sampler (SamplerCustom, SamplerCustomAdvanced) given a piece of a schedule
(BasicScheduler's denoise, SplitSigmas, SplitSigmasDenoise) counts the steps of the whole schedule, as KSamplerAdvanced's
parts do since round 13; the step is read in one walk up the stack per model call, the part's place once per run."""

import importlib
import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import patch_model, steps

from tests.comfyui.models import CASES, override_of, report_steps, sample, with_override

CASE = CASES["wan21-t2v"]
TILE = dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))


def _schedule(comfy, wan, steps_, scheduler="simple"):
    """BasicScheduler's sigmas at denoise 1: ComfyUI's scheduler for the model."""
    return comfy.samplers.calculate_sigmas(wan.get_model_object("model_sampling"), scheduler, steps_).cpu()


def _custom(comfy, patched, sigmas, latent=None):
    """SamplerCustom's sampling (comfy.sample.sample_custom, through CFGGuider) of ``sigmas``: a later piece samples
    ``latent``, the earlier piece's output, adding no noise (as SamplerCustomAdvanced's second pass does)."""
    later = latent is not None
    noise = torch.zeros(CASE.latent) if later else torch.randn(CASE.latent, generator=torch.Generator().manual_seed(5))
    cond = CASE.cond()
    negative = [[torch.flip(c, dims=(1,)), extra] for c, extra in cond]
    return comfy.sample.sample_custom(patched, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas, cond,
                                      negative, latent if later else torch.zeros(CASE.latent), seed=0,
                                      disable_pbar=True)


def test_the_two_pieces_of_split_sigmas_count_the_steps_of_the_whole_schedule(comfy, wan, caplog):
    """SplitSigmas at step 3 of 6, dense_steps=1 and dense_last_steps=1: step 0 and step 5 dense, steps 1-4 sparse
    (before: each piece counted 0-2 of 3, so steps 0, 2, 3 and 5 ran dense)."""
    full = _schedule(comfy, wan, 6)
    seen = []
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        for piece in (full[:4], full[3:]):
            patched = patch_model(wan, TILE, dense_steps=1, dense_last_steps=1, backend="torch")
            _custom(comfy, patched, piece)
            seen += report_steps(patched)
    assert seen == [(0, 6, "dense"), *((s, 6, "sparse") for s in range(1, 5)), (5, 6, "dense")]
    assert "custom sampler" not in caplog.text


def test_basic_scheduler_denoise_below_one_counts_the_steps_of_the_whole_schedule(comfy, wan):
    """BasicScheduler at 4 steps and denoise 0.5: the last 5 sigmas of an 8-step schedule, steps 4-7 of 8, as a
    KSampler's denoise counts them; dense_last_steps=1 runs step 7 dense alone (before: steps 0-3 of 4)."""
    patched = patch_model(wan, TILE, dense_last_steps=1, backend="torch")
    _custom(comfy, patched, _schedule(comfy, wan, 8)[-5:])
    assert report_steps(patched) == [(4, 8, "sparse"), (5, 8, "sparse"), (6, 8, "sparse"), (7, 8, "dense")]


def _plan(**provenance):
    """Steps 0-2 dense (the high-noise warm-up), steps 3-5 TILE: the phases of a 6-step run."""
    return dit_accel.SparsePlan([dit_accel.Phase(0, 3), dit_accel.Phase(3, None, default=TILE)], num_layers=2,
                                provenance=provenance)


def test_the_low_noise_piece_runs_the_plans_phase_of_its_steps(comfy, wan):
    """SamplerCustomAdvanced on SplitSigmas' second piece of 6 steps split at 3 runs the plan's phase of steps 3-5
    (TILE): its output is TILE's. Before it ran the phase of steps 0-2 (dense: the output differed from TILE's by
    the amount asserted first), and a plan recording 6 steps was refused (``this run has 3``)."""
    full = _schedule(comfy, wan, 6)
    high = _custom(comfy, wan, full[:4])
    tile = _custom(comfy, patch_model(wan, TILE, backend="torch"), full[3:], latent=high)
    dense = _custom(comfy, wan, full[3:], latent=high)
    assert (tile - dense).abs().max() > 1e-4  # the phase changes the result
    patched = patch_model(wan, _plan(steps=6), backend="torch")
    out = _custom(comfy, patched, full[3:], latent=high)
    assert [s for s, _, _ in report_steps(patched)] == [3, 4, 5]
    torch.testing.assert_close(out, tile, rtol=1e-5, atol=1e-5)


def test_sigmas_that_are_no_piece_of_a_known_schedule_are_said_once(comfy, wan, monkeypatch, caplog):
    """Hand-written sigmas from 0.9 to 0 (no scheduler of ComfyUI's makes them, and they do not start at the model's
    sigma_max): counted as a whole 2-step schedule, said once (before: silently)."""
    monkeypatch.setattr(steps, "SEARCH_STEPS", 12)  # (the test's time: the search finds nothing at any length)
    patched = patch_model(wan, TILE, dense_steps=1, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        _custom(comfy, patched, torch.tensor([0.9, 0.5, 0.0]))
    assert report_steps(patched) == [(0, 2, "dense"), (1, 2, "sparse")]
    assert caplog.text.count("this custom sampler's 2 steps (sigmas 0.9 to 0) are not a whole schedule") == 1
    assert "count them as steps 0-1 of a 2-step schedule" in caplog.text


def test_a_short_piece_two_step_counts_place_apart_is_not_placed(comfy, wan):
    """The ``simple`` scheduler's first 2 steps of 70 are its first 2 of 69 and 71 too (the same of the model's 1000
    sigmas): not placed (said, counted as a whole schedule) rather than placed at the first count that holds them;
    7 steps of 70 are placed. Placed before: steps 0-1 of 69, one step count off the run's 70."""
    sampling = wan.get_model_object("model_sampling")
    full = _schedule(comfy, wan, 70).double()
    assert steps._place(sampling, full[:3], 2) == (0, 2, False)
    assert steps._place(sampling, full[:8], 7) == (0, 70, True)
    beta = _schedule(comfy, wan, 12, "beta").double()
    assert steps._place(sampling, beta[5:], 7) == (5, 12, True)  # another scheduler's last 7 steps


def test_a_whole_schedule_or_settings_without_steps_look_for_no_piece(comfy, wan, monkeypatch, caplog):
    """A whole custom schedule (sigma_max to 0, of any scheduler) and a method whose steps do not matter (no dense
    steps, no plan) make no search of ComfyUI's schedules and say nothing."""
    searched = []
    monkeypatch.setattr(steps, "_place", lambda *a: searched.append(a) or (0, a[2], True))
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        _custom(comfy, patch_model(wan, TILE, backend="torch"), torch.tensor([0.9, 0.5, 0.0]))
    assert searched == [] and "custom sampler" not in caplog.text
    monkeypatch.undo()
    patched = patch_model(wan, TILE, dense_steps=1, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        _custom(comfy, patched, _schedule(comfy, wan, 3, "karras"))
    assert report_steps(patched) == [(0, 3, "dense"), (1, 3, "sparse"), (2, 3, "sparse")]
    assert "custom sampler" not in caplog.text


def test_a_ksamplers_part_is_placed_once_per_sampling_run(comfy, wan, monkeypatch):
    """The part's check against the KSampler's sigmas (180 us of the 210 us each model call spent finding its step)
    runs once per sampling run, not once per model call; the steps are the same."""
    checked = []
    part_of = steps._part_of
    monkeypatch.setattr(steps, "_part_of", lambda *a: checked.append(1) or part_of(*a))
    patched = patch_model(wan, TILE, dense_steps=1, dense_last_steps=1, backend="torch")
    cond = CASE.cond()
    negative = [[torch.flip(c, dims=(1,)), extra] for c, extra in cond]
    noise = torch.randn(CASE.latent, generator=torch.Generator().manual_seed(5))
    comfy.sample.sample(patched, noise, 4, 1.0, "euler", "simple", cond, negative, torch.zeros(CASE.latent),
                        denoise=0.5, seed=0, disable_pbar=True)
    assert report_steps(patched) == [(4, 8, "sparse"), (5, 8, "sparse"), (6, 8, "sparse"), (7, 8, "dense")]
    assert len(checked) == 1


def _context_windows(comfy, model, length=3, overlap=1):
    """ComfyUI's WAN Context Windows (Manual) node on ``model``: windows of ``length`` latent frames (dim 2)."""
    windows = importlib.import_module("comfy.context_windows")
    model = model.clone()
    model.model_options["context_handler"] = windows.IndexListContextHandler(
        context_schedule=windows.get_matching_context_schedule(windows.ContextSchedules.STATIC_STANDARD),
        fuse_method=windows.get_matching_fuse_method(windows.ContextFuseMethods.PYRAMID), context_length=length,
        context_overlap=overlap, context_stride=1, closed_loop=False, dim=2)
    windows.create_prepare_sampling_wrapper(model)
    return model


def test_a_plan_refused_on_a_context_windows_grid_says_the_grid_is_the_windows(comfy, wan):
    """A plan calibrated for the 5-frame latent the user samples, behind context windows of 3 frames: refused (each
    call sees 3 frames), and the message says so; before it told the user, who runs at the plan's size, to run at
    the plan's size. A plan for the window's grid runs on every window."""
    plan = dit_accel.SparsePlan([dit_accel.Phase(0, None, default=TILE)], num_layers=2,
                                provenance=dict(grids=[(5, 4, 4)], steps=2))
    with pytest.raises(ValueError, match=r"token grid is 3x4x4: .*one of ComfyUI's context windows.* runs 3 latent "
                                         r"entries of dim 2 at a time, not the whole latent"):
        sample(comfy, _context_windows(comfy, patch_model(wan, plan, backend="torch")), CASE, latent=(1, 16, 5, 8, 8))
    plan = dit_accel.SparsePlan([dit_accel.Phase(0, None, default=TILE)], num_layers=2,
                                provenance=dict(grids=[(3, 4, 4)], steps=2))
    patched = patch_model(wan, plan, backend="torch")
    sample(comfy, _context_windows(comfy, patched), CASE, latent=(1, 16, 5, 8, 8))
    assert [s for _, _, s in report_steps(patched)] == ["sparse"] * 4  # two windows a step


class _ModuleOverride(torch.nn.Module):
    """Another node's attention override that is a module (a ``self`` that is an nn.Module on the stack) and hands
    every call on to the override set before it."""

    def __init__(self, previous):
        super().__init__()
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        return self.previous(func, *args, **kwargs)


def _chain(previous, frames: int):
    """Another node's override that hands every call on to ``previous`` through ``frames`` frames of its own."""
    def hop(func, *args, **kwargs):
        return previous(func, *args, **kwargs)

    for _ in range(frames - 1):
        hop = (lambda inner: lambda func, *args, **kwargs: inner(func, *args, **kwargs))(hop)
    return hop


@pytest.mark.parametrize("later", [lambda prev: _chain(prev, 5), _ModuleOverride], ids=["five-frames", "module"])
def test_an_override_set_after_the_node_that_hands_calls_on_still_reaches_it(comfy, wan, sparse_calls, later,
                                                                           caplog):
    """An override set after the dit_accel node that hands its calls on (as ComfyUI's own sparse-attention node
    stacks) through five frames, or from a module's ``__call__``: dit_accel runs every self-attention call (before:
    none, as the frames between it and the attention module hid the module, and the log blamed the other node for
    not handing calls on)."""
    patched = patch_model(wan, TILE, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, with_override(patched, later(override_of(patched))), CASE)
    assert sparse_calls == [48] * 4  # 2 layers x 2 steps of the 3 x 4 x 4 grid
    assert "reached dit_accel" not in caplog.text
