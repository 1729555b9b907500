"""Round 18's leftovers from round 17's helpers: faults they found in other areas than their own. Tiny models on the
CPU; each test names what was wrong before its fix."""

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
