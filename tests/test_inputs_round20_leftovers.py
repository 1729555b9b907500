"""Leftovers of trust round 20 found by the helpers outside their areas: ``weights="~/..."`` in ``apply``,
``handle.load_weights`` and ``load_method`` (the folder under the home folder, not "not a folder")."""
import torch

import dit_accel
from dit_accel.checkpoints.finetuned import load_method, save_trained_weights
from dit_accel.models import tiny as T
from tests.pipelines.test_apply import _inputs, _run


def test_a_weights_folder_under_the_home_folder_is_read_through_a_tilde(tmp_path, monkeypatch):
    from peft import LoraConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    model = T.build_tiny_transformer("wan", seed=3)
    kwargs, method = _inputs("wan", model, batch=1), dit_accel.SLA(topk=0.5)
    lora = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False)
    with dit_accel.apply(model, method, backend="torch") as handle:
        model.add_adapter(lora)
        trained = _run(model, kwargs)
        save_trained_weights(tmp_path / "ft", transformer=model, method=method, lora_config=lora,
                             sla_projections=handle.sla_projections())
    model.unload_lora()
    assert load_method("~/ft") == method
    with dit_accel.apply(model, method, backend="torch", weights="~/ft"):
        torch.testing.assert_close(_run(model, kwargs), trained, atol=1e-5, rtol=1e-5)
    with dit_accel.apply(model, method, backend="torch") as handle:
        handle.load_weights("~/ft")
        torch.testing.assert_close(_run(model, kwargs), trained, atol=1e-5, rtol=1e-5)
    assert not (tmp_path / "~").exists()


def test_generate_refuses_a_ulysses_degree_the_heads_of_a_model_folder_do_not_take_before_loading(monkeypatch,
                                                                                                     capsys):
    """``--cp ulysses=3`` on tiny-shapes (4 heads, read from its folder's config.json): refused before anything
    loads or any rank is waited for (before: every rank loaded the model, then said it)."""
    from dit_accel.cli.main import main
    from dit_accel.models import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", no_load)
    assert main(["generate", "--model", "tiny-shapes", "--cp", "ulysses=3", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dit-accel generate: error: context parallelism with ulysses_degree=3 (--cp ulysses=3) splits the attention "
        "heads into 3 equal groups, but WanTransformer3DModel has num_attention_heads=4: use a Ulysses degree that "
        "divides it (2, 4), or ring")


def test_a_layer_list_that_is_no_list_of_integers_is_told_the_form_of_one(capsys):
    """``--dense-layers a,b`` was told "not an int or a comma-separated tuple like 6,8,8" (a grid's form)."""
    import pytest

    from dit_accel.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "tiny-wan", "--dense-layers", "a,b"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "argument --dense-layers: 'a,b' is not a list of integers: give them separated by commas, e.g. 0,5,7 (or none)")
