"""Round 14: a record of what ran, fed back as a config."""
import json

import pytest

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.eval.runner import MethodSpec
from dit_accel.methods import method_from_name


def _write_strategy(path, window) -> None:
    path.write_text(json.dumps({f"0_{layer}_{head}": list(window) for layer in range(2) for head in range(2)}))


def test_a_strategy_record_builds_the_config_again_and_refuses_a_changed_file(tmp_path):
    """A TileStrategy's record (``ran_dict``: the generate sidecar's ``method``, an eval report's row) carries
    ``windows_sha256``. Before: that record, fed back (``method_from_name(**record)``, an eval --method-config row
    copied from a report) was refused as an unknown option. Now it builds the config, and refuses a file whose
    windows changed since, instead of running other windows than the record names."""
    path = tmp_path / "strategy.json"
    _write_strategy(path, (1, 1, 1))
    record = dit_accel.Tile.from_strategy(path, tile=(1, 4, 4)).ran_dict()
    options = {k: v for k, v in record.items() if k != "method"}
    assert method_from_name(record["method"], **options).ran_dict() == record
    assert MethodSpec.parse(record["method"], dict(options)).method.ran_dict() == record
    _write_strategy(path, (1, 3, 3))
    with pytest.raises(ValueError, match=r"windows_sha256=.*changed since the record was made"):
        method_from_name(record["method"], **options)
    with pytest.raises(ValueError, match=r"--method-config: tile_strategy: windows_sha256="):
        MethodSpec.parse(record["method"], dict(options))
    assert method_from_name("tile_strategy", path=str(path), tile=(1, 4, 4)).ran_dict()["windows_sha256"] \
        != record["windows_sha256"]  # without the hash, the file runs as it is now


def test_other_methods_still_refuse_the_record_key():
    with pytest.raises(TypeError, match="windows_sha256"):
        method_from_name("tile", windows_sha256="ab")
    with pytest.raises(ValueError, match="has no option 'windows_sha256'"):
        MethodSpec.parse("tile", {"windows_sha256": "ab"})


def test_python_calibrate_reads_a_cached_hub_snapshot_before_loading(tmp_path, monkeypatch):
    """A hub id that names no family, with its snapshot in the local cache: the CLI read the snapshot (round 13),
    but the Python calibrate's checks did not, so a tile of the wrong rank for a renamed FLUX ran the dense model
    before it was refused. Now the checks before loading read the snapshot, as the CLI does."""
    import huggingface_hub.constants

    from dit_accel.calibrate.settings import CalibrationSettings, _check_run_inputs, grid_dims

    cache, repo = tmp_path / "hub", "models--someone--renamed-model"
    snapshot = cache / repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (cache / repo / "refs").mkdir()
    (cache / repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert grid_dims("someone/renamed-model") == 2
    assert grid_dims("someone/not-cached") is None  # not known before loading: checked on the grid later
    with pytest.raises(ValueError, match="2 dimensions|H,W"):  # (whether built or checked after: before loading)
        _check_run_inputs(CalibrationSettings(model="someone/renamed-model", prompts=["a fox"], min_psnr=20.0,
                                              tile=(2, 2, 2)))


def test_vsa_weights_of_one_transformer_on_two_experts_say_both_get_its_gates(tmp_path):
    """``apply(pipe, VSA(...), weights=<one transformer's folder>)`` on Wan 2.2's two experts. Before: both experts
    ran that folder's gates, and nothing said so (the low-noise expert's trained gates were never read). Now a
    warning names the transformers that share them and how to give each its own; one transformer says nothing."""
    import warnings

    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    from tests.pipelines.test_inputs_round13_apply import _gated_folder

    high = _gated_folder(tmp_path / "transformer", 0)
    low = T.build_tiny_transformer("wan", seed=1)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=high, transformer_2=low)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with dit_accel.apply(pipe, dit_accel.VSA(topk=1), backend="torch", weights=tmp_path / "transformer") as h:
            assert set(h.vsa_gates.values()) == {str(tmp_path / "transformer")} and len(h.vsa_gates) == 4
    said = [str(w.message) for w in seen if "each gets these same gates" in str(w.message)]
    assert len(said) == 1 and "transformer, transformer_2" in said[0], [str(w.message) for w in seen]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with dit_accel.apply(high, dit_accel.VSA(topk=1), backend="torch", weights=tmp_path / "transformer"):
            pass
    assert not [w for w in seen if "same gates" in str(w.message)]
