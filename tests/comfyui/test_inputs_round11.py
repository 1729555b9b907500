"""Round 11 of the node's inputs: fine-tuned folders whose SLA projections do not cover the layers that run SLA
(a layer ran untrained, or with nn.Linear's random bias, without a word) are one-line errors that change nothing,
as ``dit_accel.apply`` refuses them; the fine-tuned node runs the layers a folder was trained with dense dense (as
``dit-accel generate --weights`` does) and no longer says a plan folder runs another method; FLOAT widgets keep the
values ComfyUI's frontend would round away; and a plan, strategy or folder written again at the same path is read
again (ComfyUI reused the node's cached MODEL while its widgets were the same)."""

import json
import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import save_file

import dit_accel
from dit_accel.checkpoints.finetuned import SLA_FILE, write_weights_folder
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.nodes import published
from dit_accel.plans.sparse_plan import Phase, SparsePlan

from tests.comfyui.models import CASES, override_of, run_node, sample
from tests.comfyui.test_weights import _folder, _lora

SLA = dit_accel.SLA(topk=0.5)


def _projections(seed: int, layers=(0, 1), kinds=("weight", "bias")):
    g = torch.Generator().manual_seed(seed)
    shapes = {"weight": (32, 32), "bias": (32,)}
    return {f"blocks.{i}.attn1.{kind}": torch.randn(shapes[kind], generator=g) * 0.3 for i in layers for kind in kinds}


def _finetuned(model, folder, **widgets):
    return run_node("DitAccelFinetuned", model, weights_path=str(folder), lora_strength=1.0, allow_other_grid=False,
                    backend="torch", expert="transformer", **widgets)


@pytest.mark.parametrize("sla, lora, message", [
    (_projections(1, layers=(1,)), None,
     r"was trained with SLA, but its sla_projections.safetensors holds no SLA projection for layers 0 "
     r"\(blocks.0.attn1\) of this WanModel, which run SLA: they would run untrained \(a zero projection\)"),
    (None, _lora(torch.Generator().manual_seed(2)),
     r"was trained with SLA, but it has no sla_projections.safetensors, so it holds no SLA projection for layers 0 "
     r"\(blocks.0.attn1\), 1 \(blocks.1.attn1\) of this WanModel"),
    (_projections(3, kinds=("weight",)), None,
     r"sla_projections.safetensors has the weight of layer 0's SLA projection \(blocks.0.attn1.weight\) but not its "
     r"bias: each projection is a Linear\(D, D\) weight and bias, as dit-accel finetune writes them; train or "
     r"convert it again"),
    (_projections(4, kinds=("bias",)), None,
     r"has the bias of layer 0's SLA projection \(blocks.0.attn1.bias\) but not its weight"),
], ids=["a-layer-missing", "no-projections-file", "weights-without-bias", "bias-without-weight"])
def test_sla_projections_that_miss_a_layer_running_sla_are_refused(comfy, wan, tmp_path, sla, lora, message):
    """The node ran SLA on a layer without its trained projection (a zero one: training-free SLA there), or with the
    random bias (or weight) nn.Linear starts with, a different one per run; dit_accel.apply refuses such a folder
    ("does not match the model's SLA layers: missing ...")."""
    folder = _folder(tmp_path / "ft", SLA, lora=lora, sla=sla)
    before, patches = sample(comfy, wan, CASES["wan21-t2v"]), dict(wan.patches)
    with pytest.raises(ValueError, match=message) as err:
        _finetuned(wan, folder)
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    with pytest.raises(ValueError, match=message):
        patch_model(wan, SLA, weights=folder)
    assert wan.patches == patches and torch.equal(sample(comfy, wan, CASES["wan21-t2v"]), before)


def test_projections_of_every_layer_that_runs_sla_load(comfy, wan, tmp_path):
    """What the check lets through: every SLA layer's projection, or a layer set dense that has none (it never runs
    SLA); a folder trained with another method runs SLA with a warning, training-free (it has no projections)."""
    case = CASES["wan21-t2v"]
    folder = _folder(tmp_path / "full", SLA, sla=_projections(5))
    patch = override_of(_finetuned(wan, folder)).patch
    assert sorted(patch.projections) == [0, 1]
    partial = _folder(tmp_path / "partial", SLA, sla=_projections(6, layers=(1,)))
    patched = patch_model(wan, SLA, weights=partial, dense_layers=[0], backend="torch")
    assert sorted(override_of(patched).patch.projections) == [1]
    sample(comfy, patched, case)
    dense_lora = _folder(tmp_path / "dense", dit_accel.Dense(), lora=_lora(torch.Generator().manual_seed(7)))
    assert override_of(patch_model(wan, SLA, weights=dense_lora)).patch.projections == {}


def _frontend_value(value: float, spec: dict) -> float:
    """What ComfyUI's frontend keeps of a typed FLOAT: rounded to ``round``, which defaults to the decimals its
    ``step`` shows (10 ** -max(0, -floor(log10(step)))); ``round: False`` keeps it as typed."""
    step_round = 10.0 ** -max(0, -math.floor(math.log10(spec["step"])))
    unit = spec.get("round", step_round)
    return value if unit is False else round(value / unit) * unit


def test_float_widgets_keep_their_defaults_and_published_values(wan):
    """SLA's linear_eps (default 1e-6, step 0.001) showed 0.000, and its reference value 1e-5 typed into it became 0,
    which SLA refuses as "SLA.linear_eps=0.0 is invalid" (the user typed 1e-5)."""
    checked = []
    for name, node in NODE_CLASS_MAPPINGS.items():
        widgets = node.INPUT_TYPES()["required"]
        method = name.removeprefix("DitAccel").lower()
        values = [entry.config for entry in published(method).values()]
        for widget, spec in widgets.items():
            if spec[0] != "FLOAT":
                continue
            for value in [spec[1]["default"], *(config[widget] for config in values if widget in config)]:
                checked.append((name, widget, value))
                assert math.isclose(_frontend_value(value, spec[1]), value, rel_tol=1e-9, abs_tol=1e-12), \
                    (name, widget, value, spec[1])
    assert ("DitAccelSLA", "linear_eps", 1e-5) in checked and ("DitAccelSLA", "linear_eps", 1e-6) in checked
    patched = run_node("DitAccelSLA", wan, topk=0.05, negligible=0.0, block_q="64", block_k="64",
                       feature_map="softmax", linear_tokens="marginal", rounding="ceil",
                       linear_eps=_frontend_value(1e-5, NODE_CLASS_MAPPINGS["DitAccelSLA"].INPUT_TYPES()["required"]
                                                  ["linear_eps"][1]),
                       dense_steps=0, dense_last_steps=0, dense_above_sigma=0.0, dense_layers="", backend="auto")
    assert math.isclose(override_of(patched).patch.schedule.method.linear_eps, 1e-5, rel_tol=1e-9)


def _trained_with_dense_layers(path, method, sla, dense_layers):
    """A folder as `dit-accel finetune --dense-layers` writes it: every layer's projection, and the dense layers
    recorded in its dit_accel_method.json."""
    info = {"format": 1, "method": json.loads(json.dumps(method.to_dict())), "dense_layers": dense_layers,
            "files": {"lora": None, "sla_projections": SLA_FILE}}
    return write_weights_folder(path, lambda staging: save_file(sla, str(staging / SLA_FILE)), info)


def test_the_finetuned_node_runs_the_layers_trained_dense_dense(comfy, wan, tmp_path):
    """A folder trained with layer 0 dense ran SLA on layer 0 (with its untrained projection) in the node, where
    `dit-accel generate --weights` runs the folder's dense_layers dense, as it was trained."""
    case = CASES["wan21-t2v"]
    folder = _trained_with_dense_layers(tmp_path / "ft", SLA, _projections(8), [0])
    patched = _finetuned(wan, folder)
    assert override_of(patched).patch.schedule.dense_layers == {0}
    out = sample(comfy, patched, case)
    torch.testing.assert_close(out, sample(comfy, patch_model(wan, SLA, weights=folder, dense_layers=[0],
                                                              backend="torch"), case), rtol=0, atol=0)
    # (patch_model without them ran layer 0 sparse, silently unlike the trained model: refused since round 12)
    patches = dict(wan.patches)
    with pytest.raises(ValueError, match=r"were trained with dense_layers=\[0\] .*but layer\(s\) \[0\] run sla here"):
        patch_model(wan, SLA, weights=folder, backend="torch")
    assert wan.patches == patches
    none = _trained_with_dense_layers(tmp_path / "none", SLA, _projections(8), None)
    assert override_of(_finetuned(wan, none)).patch.schedule.dense_layers == frozenset()
    wrong = _trained_with_dense_layers(tmp_path / "wrong", SLA, _projections(8), [0, 7])
    with pytest.raises(ValueError, match=r"^dit_accel: .*wrong was trained with dense_layers=\[0, 7\], which this "
                                         r"MODEL cannot run \(dense_layers has layer indices 7 but the model has 2 "
                                         r"attention layers \(0..1\)\): the weights are for another model$"):
        _finetuned(wan, wrong)
    text = _trained_with_dense_layers(tmp_path / "text", SLA, _projections(8), "abc")
    with pytest.raises(ValueError, match=r"^dit_accel: .*text was trained with dense_layers='abc', which this MODEL "
                                         r"cannot run \(dense_layers='abc' is invalid: "):
        _finetuned(wan, text)


def _is_changed(name, **widgets):
    """The node's IS_CHANGED as ComfyUI's execution calls it before each run (the class's, every input by name, a
    linked input such as the model as None): ComfyUI reuses the node's cached MODEL while this stays the same."""
    return NODE_CLASS_MAPPINGS[name].IS_CHANGED(model=None, **widgets)


def test_a_plan_strategy_or_folder_written_again_at_the_same_path_is_read_again(wan, tmp_path):
    """`dit-accel calibrate --out plan.json` run again, the workflow queued again: ComfyUI saw the same inputs and
    reused the node's MODEL, so the old plan ran without a word (the same for a strategy file and for weights trained
    again into the same folder). The nodes now tell ComfyUI what their paths hold."""
    path = tmp_path / "plan.json"
    tile = dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))
    SparsePlan([Phase(0, None, default=tile)], num_layers=2).save(path)
    widgets = dict(plan_path=f'"{path}"', allow_other_grid=False, backend="auto")
    first = _is_changed("DitAccelPlan", **widgets)
    assert _is_changed("DitAccelPlan", **widgets) == first  # nothing written: ComfyUI may keep its output
    other = dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1))
    SparsePlan([Phase(0, None, default=other)], num_layers=2).save(path)
    assert _is_changed("DitAccelPlan", **widgets) != first
    assert override_of(run_node("DitAccelPlan", wan, **widgets)).patch.schedule.method.sparse_plan.phases[0].default \
        == other

    strategy = tmp_path / "strategy.json"
    strategy.write_text('{"0_0_0": [3, 1, 1], "0_0_1": [3, 1, 1]}')
    first = _is_changed("DitAccelTileStrategy", path=str(strategy), tile="1,2,2")
    strategy.write_text('{"0_0_0": [1, 1, 1], "0_0_1": [1, 1, 1]}')
    assert _is_changed("DitAccelTileStrategy", path=str(strategy), tile="1,2,2") != first

    folder = _folder(tmp_path / "ft", SLA, sla=_projections(9))
    first = _is_changed("DitAccelFinetuned", weights_path=str(folder), lora_strength=1.0, allow_other_grid=False,
                        backend="auto", expert="transformer")
    shutil.rmtree(folder)
    _folder(folder, SLA, sla=_projections(10))  # trained again into the same folder
    assert _is_changed("DitAccelFinetuned", weights_path=str(folder), lora_strength=1.0, allow_other_grid=False,
                       backend="auto", expert="transformer") != first
    assert _is_changed("DitAccelPlan", plan_path=str(tmp_path / "missing.json")) == str(tmp_path / "missing.json")
    assert not hasattr(NODE_CLASS_MAPPINGS["DitAccelTile"], "IS_CHANGED")  # (no path: ComfyUI's cache as before)


def _plan_folder(path, plan, layers=(1,)):
    info = {"format": 1, "method": {"method": "plan", "plan": plan.to_json()},
            "files": {"lora": None, "sla_projections": SLA_FILE}}
    return write_weights_folder(path, lambda staging: save_file(_projections(11, layers=layers),
                                                                str(staging / SLA_FILE)), info)


def test_a_plan_folder_run_as_recorded_is_not_said_to_run_another_method(comfy, wan, tmp_path, caplog):
    """`finetune --plan`'s folder through the fine-tuned node: "was trained with PlanMethod(...); running
    PlanMethod(...) with its weights" (the same plan: plans were compared as objects); another plan is still said."""
    plan = SparsePlan([Phase(0, 1), Phase(1, None, {1: SLA})], num_layers=2,
                      provenance={"model_class": "WanTransformer3DModel"})
    folder = _plan_folder(tmp_path / "ft", plan)
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        patched = _finetuned(wan, folder)
        sample(comfy, patched, CASES["wan21-t2v"])
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == []
    assert sorted(override_of(patched).patch.projections) == [1]
    other = SparsePlan([Phase(0, None, {1: SLA})], num_layers=2)
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        patch_model(wan, other, weights=folder)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"dit_accel: {folder} was trained with {override_of(patched).patch.schedule.method!r}; running "
        f"{other.as_method()!r} with its weights"]


def test_a_plan_edited_in_a_finetune_folder_is_refused_by_the_node_as_by_apply(wan, tmp_path):
    """`finetune --plan` records the plan's content hash (plan_sha256); apply refuses a folder whose plan no longer
    matches it. The node read the method file on its own and ran the edited plan with the weights, unsaid."""
    trained = SparsePlan([Phase(0, 1), Phase(1, None, {1: SLA})], num_layers=2)
    edited = SparsePlan([Phase(0, None, {1: SLA})], num_layers=2)
    info = {"format": 1, "method": {"method": "plan", "plan": edited.to_json()}, "plan_sha256": trained.content_hash(),
            "files": {"lora": None, "sla_projections": SLA_FILE}}
    folder = write_weights_folder(tmp_path / "ft", lambda staging: save_file(_projections(11, layers=(1,)),
                                                                             str(staging / SLA_FILE)), info)
    with pytest.raises(ValueError, match=r"dit_accel_method\.json: its plan has content sha256 \w+, but the weights "
                                         r"were trained under the plan of content sha256 \w+ \(its plan_sha256\)"):
        patch_model(wan, edited, weights=folder)
    info["plan_sha256"] = edited.content_hash()  # recorded as trained: it runs
    folder = write_weights_folder(tmp_path / "ok", lambda staging: save_file(_projections(11, layers=(1,)),
                                                                             str(staging / SLA_FILE)), info)
    assert sorted(override_of(patch_model(wan, edited, weights=folder)).patch.projections) == [1]
