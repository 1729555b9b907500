"""Round 18's leftovers from round 17's helpers: faults they found in other areas than their own. Tiny models on the
CPU; each test names what was wrong before its fix."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T


def _run(model, inputs):
    with torch.no_grad():
        model(**inputs)


# ------------------------------------------------------------------ summary during VSA's sparsity decay
def test_summary_says_the_sparsity_the_decay_ran():
    """Fine-tuning's VSA sparsity decay runs a lower sparsity than the config (``_replace_method``). Before: the
    summary's ``ran_on_grid`` said the configured sparsity 0.875 for calls that ran 0.5, so a run record during the
    decay named a setting that did not run. Now it says what ran; ``config`` stays the config as set."""
    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    method = dit_accel.VSA(sparsity=0.875)
    with dit_accel.apply(model, method, backend="torch") as handle:
        handle._replace_method(dit_accel.VSA(sparsity=0.5))
        _run(model, inputs)
        summary = handle.summary()
        assert summary["config"]["sparsity"] == 0.875
        (ran,) = summary["ran_on_grid"].values()
        assert ran["sparsity"] == 0.5
        handle._replace_method(method)  # the decay is over
        handle.reset_stats()
        _run(model, inputs)
        (ran,) = handle.summary()["ran_on_grid"].values()
        assert ran["sparsity"] == 0.875


# ------------------------------------------------------------------ the tests' masked reference on Z-Image
def test_the_masked_reference_leaves_z_images_caption_refiner_dense_on_small_grids():
    """Z-Image's caption refiner attends over the caption alone (64 padded tokens here). On a grid of 16 image
    tokens the reference took those calls for joint ones (they are at least as long as the image) and masked the
    caption's last 16 tokens by the image pattern: apply's output, right, differed from the reference (by 0.2).
    ``text_only=`` names the modules whose calls are text alone; they pass through."""
    from dit_accel.patterns import tile_mask
    from tests.utils import ReferenceAttention

    model = T.build_tiny_transformer("zimage")
    grid = (4, 4)
    kwargs = T.tiny_transformer_inputs("zimage", model, grid=grid)
    method = dit_accel.Tile(tile=(2, 2), window=(1, 1))
    with torch.no_grad():
        with ReferenceAttention(tile_mask(grid, method.tile, method.window), "last",
                                text_only=model.context_refiner) as ref_mode:
            ref = torch.stack(model(**kwargs)[0])
        with pytest.warns(dit_accel.DitAccelWarning, match="visits every key block"), \
                dit_accel.apply(model, method, backend="torch") as handle:  # (no speed-up here: tokens masked alone)
            out = torch.stack(model(**kwargs)[0])
            layers = len(handle.stats())
    assert ref_mode.calls == layers  # the image refiner and the joint layer; not the caption refiner
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
