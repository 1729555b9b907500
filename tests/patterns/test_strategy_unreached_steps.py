"""A tile strategy (Tile.from_strategy) whose listed steps the run never reaches runs every call dense: one
DitAccelWarning names the file, its steps and the run's step count, at the first call that knows the count."""
import json
import warnings

import pytest
import torch

import dit_accel
from dit_accel import DitAccelWarning
from dit_accel.models import tiny as T


def _strategy(path, steps):
    """Windows for tiny Wan (2 layers, 2 heads) at ``steps``, in FastVideo's "step_layer_head" format."""
    path.write_text(json.dumps({f"{s}_{layer}_{h}": [1, 1, 1] for s in steps for layer in (0, 1) for h in (0, 1)}))
    return dit_accel.Tile.from_strategy(path, tile=(1, 4, 4))


def _run(model, method, step, total, calls=2):
    kwargs = T.tiny_transformer_inputs("wan", model, grid=(2, 8, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dit_accel.apply(model, method, backend="torch") as handle, torch.no_grad():
            for _ in range(calls):
                handle.set_step(step, total)
                model(**kwargs)
            said, rows = handle.warnings, handle.stats()
    mine = [w for w in caught if issubclass(w.category, DitAccelWarning) and "lists step" in str(w.message)]
    return [str(w.message) for w in mine], said, rows


@pytest.fixture(scope="module")
def wan():
    return T.build_tiny_transformer("wan")


def test_steps_beyond_the_run_are_said_once(wan, tmp_path):
    path = tmp_path / "strat_late.json"
    caught, said, rows = _run(wan, _strategy(path, range(10, 20)), 0, 2)
    expected = (f"dit_accel: {path} lists steps 10-19, but this run has 2 steps: every call runs dense. Pass the "
                "strategy searched for 2 steps, or run more steps")
    assert caught == [expected] and said == [expected]
    assert all(row["sparse_calls"] == 0 for row in rows)


def test_scattered_steps_are_listed(wan, tmp_path):
    caught, _, _ = _run(wan, _strategy(tmp_path / "s.json", (4, 7)), 1, 3, calls=1)
    assert caught and "lists steps 4, 7, but this run has 3 steps" in caught[0]


@pytest.mark.parametrize("steps, step, total", [((0, 1), 0, 2), ((1, 12), 0, 2), ((10, 11), 0, None)],
                         ids=["reached", "one-reached", "total-unknown"])
def test_no_warning_when_a_step_is_reached_or_the_count_unknown(wan, tmp_path, steps, step, total):
    caught, said, _ = _run(wan, _strategy(tmp_path / "s.json", steps), step, total, calls=1)
    assert caught == [] and not any("lists step" in m for m in said)
