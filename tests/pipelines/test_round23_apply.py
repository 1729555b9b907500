"""``dit_accel.apply`` and its handle driven as a Diffusers user drives them (round 23, trust): nested ``with`` blocks,
copies of a handle, a pipeline without its transformer, the user deleting dit_accel's LoRA adapter. Tiny models on
the CPU; each test names what was wrong before its fix."""

import copy
import pickle

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T

from tests.pipelines.lora_folders import TILE, wan_lora_folder
from tests.pipelines.lora_folders import lora_config as _lora


@pytest.fixture(scope="module")
def wan():
    model = T.build_tiny_transformer("wan")
    return model, T.tiny_transformer_inputs("wan", model)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_an_inner_with_of_the_same_handle_leaves_the_outer_block_sparse(wan):
    """Before: ``with handle: ... with handle: ...`` (a helper that enters the handle it is given): leaving the inner
    block removed the handle, and the rest of the outer block ran the original (dense) model without a word."""
    model, inputs = wan
    dense = _run(model, inputs)
    handle = dit_accel.apply(model, TILE, backend="torch")
    sparse = _run(model, inputs)
    assert not torch.equal(sparse, dense)
    with handle:
        with handle:
            pass
        assert not handle.removed
        assert torch.equal(_run(model, inputs), sparse)
    assert handle.removed  # the outermost block removes it
    assert torch.equal(_run(model, inputs), dense)


def test_an_error_in_nested_with_blocks_still_removes_the_handle(wan):
    model, inputs = wan
    dense = _run(model, inputs)
    handle = dit_accel.apply(model, TILE, backend="torch")
    with pytest.raises(KeyError):
        with handle:
            with handle:
                raise KeyError("x")
    assert handle.removed and torch.equal(_run(model, inputs), dense)


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_a_handle_cannot_be_copied(wan, how):
    """Before: ``copy.copy(handle)`` shared the handle's hooks: the copy's remove() took dit_accel off the model and
    the original still read as active (its ``with`` block then ran dense); a removed handle deep-copied or pickled
    the whole model it held."""
    model, inputs = wan
    do = {"copy": copy.copy, "deepcopy": copy.deepcopy, "pickle": pickle.dumps}[how]
    line = (r"cannot copy or pickle AccelHandle\(.*\): it is the one record of what apply\(\) installed on a live "
            r"model\. Pass the handle itself around; to save the setting, keep the method config")
    with dit_accel.apply(model, TILE, backend="torch") as handle:
        sparse = _run(model, inputs)
        with pytest.raises(TypeError, match=line if how == "copy" else r"cannot (deepcopy or pickle "
                                                                          r"WanTransformer3DModel|copy or pickle)"):
            do(handle)  # (deepcopy and pickle reach the model's own refusal first, or this one)
        assert not handle.removed and torch.equal(_run(model, inputs), sparse)
    with pytest.raises(TypeError, match=line):
        do(handle)


def test_a_pipeline_whose_transformer_is_none_is_named():
    """Before: a Diffusers pipeline loaded without its transformer (``transformer=None``) was told "apply() needs a
    Diffusers pipeline with a `transformer` ...; got WanPipeline": it is one."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=None)
    with pytest.raises(ValueError, match=r"WanPipeline whose transformer( and transformer_2)? (is|are) None \(not "
                                         r"loaded\): load the transformer into the pipeline first \(pipe\.transformer "
                                         r"= \.\.\.\), or pass the transformer module"):
        dit_accel.apply(pipe, TILE)


def test_a_pipeline_without_any_transformer_attribute_keeps_its_message():
    with pytest.raises(TypeError, match=r"needs a Diffusers pipeline with a `transformer` or a transformer module; "
                                        r"got object"):
        dit_accel.apply(object(), TILE)


# ------------------------------------------------------------------ LoRA the user changed while applied
@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    return wan_lora_folder(tmp_path_factory.mktemp("round23") / "w")


def test_remove_after_the_user_deleted_dit_accels_adapter_gives_back_the_plain_model(lora_folder):
    """Before: ``transformer.delete_adapters("dit_accel")`` while applied (Diffusers then drops ``peft_config``), then
    ``remove()``: the emptied peft layers stayed, so ``state_dict()`` (and ``save_pretrained``) held
    ``to_q.base_layer.weight`` keys that ``from_pretrained`` does not read."""
    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    dense, before = _run(model, inputs), {k: v.clone() for k, v in model.state_dict().items()}
    handle = dit_accel.apply(model, TILE, backend="torch", weights=lora_folder)
    model.delete_adapters(handle.lora_adapter)
    handle.remove()
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_run(model, inputs), dense)


def test_a_lora_of_the_users_under_dit_accels_adapter_name_is_refused(lora_folder):
    """Before: the user's adapter named "dit_accel" (``load_lora_weights(..., adapter_name="dit_accel")``) was
    replaced by the weights folder's LoRA, and ``remove()`` then deleted it: the user's LoRA was gone without a word."""
    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    model.add_adapter(_lora(["to_k"]), adapter_name="dit_accel")
    with_lora, before = _run(model, inputs), {k: v.clone() for k, v in model.state_dict().items()}
    line = (r"weights='.*': WanTransformer3DModel already holds a LoRA adapter named 'dit_accel' that dit_accel did "
            r"not load; .* Load your LoRA under another adapter name .* or delete it .*, then apply again")
    with pytest.raises(ValueError, match=line):
        dit_accel.apply(model, TILE, backend="torch", weights=lora_folder)
    assert list(model.peft_config) == ["dit_accel"] and torch.equal(_run(model, inputs), with_lora)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    with dit_accel.apply(model, TILE, backend="torch") as handle:  # (load_weights refuses it too)
        with pytest.raises(ValueError, match=line):
            handle.load_weights(lora_folder)
    assert list(model.peft_config) == ["dit_accel"] and torch.equal(_run(model, inputs), with_lora)


def test_apply_with_weights_and_a_second_load_still_replace_dit_accels_own_adapter(lora_folder):
    model = T.build_tiny_transformer("wan")
    handle = dit_accel.apply(model, TILE, backend="torch", weights=lora_folder)
    handle.load_weights(lora_folder)
    with pytest.warns(dit_accel.DitAccelWarning, match="was applied to"):
        handle = dit_accel.apply(model, TILE, backend="torch", weights=lora_folder)
    assert list(model.peft_config) == ["dit_accel"]
    handle.remove()
    assert not getattr(model, "peft_config", None)


@pytest.mark.parametrize("targets", [["to_k"], ["to_q"]], ids=["other-layers", "same-layers"])
def test_a_lora_the_user_fused_is_fused_again_after_remove(lora_folder, targets):
    """Before: the user's adapter fused into the weights (``transformer.fuse_lora()``), then ``apply(weights=DIR)``:
    peft's loading unmerged it, and ``remove()`` left it unmerged (the weights changed, ``unfuse_lora()`` a no-op,
    ``unload_lora()`` dropped the LoRA). Now it stays fused where the folder's LoRA does not adapt the same layers;
    where it does it is unmerged while applied (so both run) and merged back, bit for bit, by ``remove()``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = T.build_tiny_transformer("wan")
    inputs = T.tiny_transformer_inputs("wan", model)
    model.add_adapter(_lora(targets), adapter_name="mine")
    with dit_accel.apply(model, TILE, backend="torch", weights=lora_folder):
        want = _run(model, inputs)  # both LoRAs, unfused
    model.fuse_lora(adapter_names=["mine"])
    fused, before = _run(model, inputs), {k: v.clone() for k, v in model.state_dict().items()}

    def merged():
        return {n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and m.merged_adapters == ["mine"]}

    layers = merged()
    assert len(layers) == 4
    with dit_accel.apply(model, TILE, backend="torch", weights=lora_folder):
        torch.testing.assert_close(_run(model, inputs), want, atol=1e-5, rtol=1e-5)
        assert merged() == (layers if targets == ["to_k"] else set())
    assert merged() == layers and torch.equal(_run(model, inputs), fused)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_layer_and_step_lists_given_as_int_tensors_are_taken(wan, tmp_path):
    """Before: ``dense_layers=torch.tensor([0])`` (or ``torch.arange(n)``) was refused as "expected a list of
    non-negative ints", which it is; a float tensor is still refused."""
    model, inputs = wan
    with dit_accel.apply(model, TILE, backend="torch", dense_layers=torch.arange(1)) as handle:
        assert handle.schedule.dense_layers == frozenset({0})
    with dit_accel.apply(model, TILE, backend="torch", capture=tmp_path / "c", capture_layers=torch.tensor(1)):
        pass
    with pytest.raises(ValueError, match=r"dense_layers=tensor\(\[0\.\]\) is invalid: expected a list of non-negative "
                                         r"ints or None"):
        dit_accel.apply(model, TILE, dense_layers=torch.tensor([0.0]))


def test_a_method_record_passed_as_the_method_says_how_to_build_its_config(wan):
    """Before: a record (``handle.summary()["config"]``, a sidecar's) passed as the method got "Try
    dit_accel.Tile(...)", not how to turn the record into its config."""
    model, _ = wan
    record = {"method": "radial", "decay": 0.5}
    with pytest.raises(TypeError, match=r"got dict\. Try dit_accel\.method_from_name\(record\.pop\('method'\), "
                                        r"\*\*record\) to build the config this 'radial' record describes"):
        dit_accel.apply(model, record)
    with pytest.raises(TypeError, match=r"layer_methods\[0\] must be .*got dict\. Try dit_accel\.method_from_name"):
        dit_accel.apply(model, TILE, layer_methods={0: record})
    assert dit_accel.method_from_name(record.pop("method"), **record) == dit_accel.Radial(decay=0.5)


class _Pipe:
    """A pipeline-like object (what apply() reads of one: its transformer and scheduler), weakly referable."""

    def __init__(self, transformer):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer, self.scheduler = transformer, FlowMatchEulerDiscreteScheduler()
        self.text_encoder = torch.nn.Linear(2, 2)  # (stands in for the encoders a kept pipeline would hold)


def test_a_transformer_kept_after_the_pipeline_is_deleted_does_not_keep_the_pipeline():
    """Before: the step source held the pipeline given to apply(), so ``t = pipe.transformer; del pipe`` kept the
    whole pipeline (its VAE and text encoders) alive through the applied transformer's hooks."""
    import gc
    import weakref

    model = T.build_tiny_transformer("wan")
    pipe = _Pipe(model)
    handle = dit_accel.apply(pipe, TILE, backend="torch", dense_steps=1)
    gone, encoder = weakref.ref(pipe), weakref.ref(pipe.text_encoder)
    del pipe
    gc.collect()
    assert gone() is None and encoder() is None
    inputs = T.tiny_transformer_inputs("wan", model)
    handle.set_step(1, 2)  # (no pipeline to read the step from: set_step still serves)
    _run(model, inputs)
    assert handle.summary()["sparse_calls"] == 2
    handle.remove()


@pytest.mark.parametrize("path", ["plan.json", "out/Strategy.JSON"])
def test_a_json_file_passed_as_the_method_says_how_to_read_it(wan, path):
    """Before: a plan or strategy file's path passed as the method got "Try dit_accel.method_from_name('plan.json')",
    which then says it is no registered method."""
    from pathlib import Path

    model, _ = wan
    line = (rf"got (str|PosixPath)\. Try dit_accel\.SparsePlan\.load\('{path}'\) for a calibrated plan, or "
            rf"dit_accel\.Tile\.from_strategy\('{path}'\) for a FastVideo STA strategy file")
    for given in (path, Path(path)):
        with pytest.raises(TypeError, match=line):
            dit_accel.apply(model, given)


def test_a_strategy_file_leaving_out_layers_of_the_model_warns(tmp_path):
    """A strategy naming layer 0 alone of tiny-wan's 2 ran layer 1 dense at every step, without a word (a strategy
    made for a smaller model); one naming both layers, at some steps only (its early steps dense), says nothing."""
    import json
    import warnings

    path = tmp_path / "strategy.json"
    path.write_text(json.dumps({f"0_0_{h}": [1, 1, 1] for h in range(2)}))
    pipe = T.build_tiny_pipeline("tiny-wan")
    with pytest.warns(dit_accel.DitAccelWarning, match=r"strategy\.json names no window for attention layer\(s\) 1 "
                                                       r"of WanTransformer3DModel's 2 at any step: they run dense"):
        dit_accel.apply(pipe, dit_accel.Tile.from_strategy(path, tile=(1, 2, 2))).remove()
    path.write_text(json.dumps({f"3_{layer}_{h}": [1, 1, 1] for layer in range(2) for h in range(2)}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dit_accel.apply(pipe, dit_accel.Tile.from_strategy(path, tile=(1, 2, 2))).remove()
    assert not [w for w in caught if "names no window" in str(w.message)]
