"""A plan records the transformer config it was calibrated on, and apply() warns when it runs on a transformer of
the same class, layers and heads whose config differs (Wan 2.1 I2V 14B against T2V 14B: in_channels 36 against 16).
Before: such a plan ran on the other model without a word."""
import warnings

import pytest
import torch

import dit_accel
from dit_accel import DitAccelWarning
from dit_accel.models import tiny as T
from dit_accel.plans.model_config import config_differences, model_config
from dit_accel.plans.sparse_plan import Phase, SparsePlan

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))


def _wan(**changes):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**{**T.TRANSFORMERS["wan"].config, **changes}).eval()


def _plan(calibrated_on, **provenance):
    layers = calibrated_on.config.num_layers
    return SparsePlan([Phase(0, None, {0: TILE})], num_layers=layers,
                      provenance={"model_class": type(calibrated_on).__name__, "model_id": "calib-model",
                                  "model_config": model_config(calibrated_on), **provenance})


def _warnings_of_apply(model, plan):
    """The DitAccelWarnings of apply(model, plan); the plan runs on the model (one call, its first layer tiled)."""
    inputs = T.tiny_transformer_inputs("wan", model)
    inputs.pop("return_dict", None)
    with torch.no_grad():
        dense = model(**inputs, return_dict=False)[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with dit_accel.apply(model, plan) as handle, torch.no_grad():
            handle.set_step(0, 1)
            sparse = model(**inputs, return_dict=False)[0]
    assert sparse.shape == dense.shape and torch.isfinite(sparse).all() and not torch.equal(sparse, dense)
    return [str(w.message) for w in seen if issubclass(w.category, DitAccelWarning)]


def test_model_config_is_the_public_plain_config_and_survives_the_plan_file(tmp_path):
    model = _wan()
    config = model_config(model)
    assert config["in_channels"] == model.config.in_channels and config["patch_size"] == list(model.config.patch_size)
    assert not [k for k in config if k.startswith("_")]  # (_name_or_path: a local path or a hub id of one model)
    plan = _plan(model)
    plan.save(tmp_path / "plan.json")
    back = SparsePlan.load(tmp_path / "plan.json")
    assert back.provenance["model_config"] == config
    assert config_differences(back.provenance["model_config"], model) == []


def test_a_plan_of_another_config_warns_naming_the_entries_and_still_runs():
    calibrated_on = _wan()
    other = _wan(in_channels=calibrated_on.config.in_channels + 4, out_channels=calibrated_on.config.out_channels)
    assert type(other) is type(calibrated_on) and other.config.num_layers == calibrated_on.config.num_layers
    messages = _warnings_of_apply(other, _plan(calibrated_on))
    assert len(messages) == 1, messages
    text = messages[0]
    assert "calibrated on another model (calib-model)" in text
    assert f"in_channels={calibrated_on.config.in_channels!r} in the plan, {other.config.in_channels!r} here" in text
    assert "out_channels" not in text and "calibrate a plan for this one (dit-accel calibrate)" in text


@pytest.mark.parametrize("provenance", [{}, {"model_config": None}], ids=["same-config", "no-record"])
def test_the_same_config_or_a_plan_without_the_record_runs_without_the_warning(provenance):
    calibrated_on = _wan()
    plan = _plan(calibrated_on, **provenance)
    other = _wan(in_channels=calibrated_on.config.in_channels + 4)
    target = calibrated_on if not provenance else other
    assert [m for m in _warnings_of_apply(target, plan) if "calibrated on another model" in m] == []


def test_an_entry_only_one_side_has_is_no_difference():
    model = _wan()
    recorded = {**model_config(model), "a_key_of_a_newer_diffusers": 3}
    del recorded["eps"]
    assert config_differences(recorded, model) == []
    assert config_differences({**recorded, "num_layers": 99}, model) == [
        f"num_layers=99 in the plan, {model.config.num_layers!r} here"]
