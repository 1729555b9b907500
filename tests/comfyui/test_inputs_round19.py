"""ComfyUI, trust round 19 of the nodes' inputs.

- A FastVideo STA strategy given to the plan node was imported as a plan with the tile (6, 8, 8), which the plan
  node has no widget for: a strategy searched at another tile ran other windows without a word. It is refused,
  naming the TileStrategy node (whose tile widget sets the tile).
- A file or folder meant for another path node said nothing of that node: a plan in the TileStrategy node ("key
  'format' is not "step_layer_head""), a fine-tuned folder there ("it is a folder"), a fine-tuned folder's own
  dit_accel_method.json in the fine-tuned node ("A plan JSON goes into the dit_accel plan node").
- A LoRA whose adapter metadata says rsLoRA (peft scales it by alpha / sqrt(rank), as dit_accel.apply loads it) ran
  at alpha / rank through the node; one with per-module alphas (alpha_pattern) ran every module at lora_alpha; a NaN
  lora.alpha in the method file made the patched weights NaN.
- A ComfyUI whose attention never calls the override (an older one) ran every call dense, the node patching nothing.
- A preset ran its own values over widgets the user had changed, saying nothing; a calibration's report folder in the
  plan node said "it is a folder", not which plan that calibration wrote.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import dit_accel
from dit_accel.checkpoints.finetuned import LORA_FILE, METHOD_FILE, write_weights_folder
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from tests.comfyui.models import COMMON_WIDGETS, patched_weights, run_node

STRATEGY = '{"0_0_0": [3, 1, 1], "0_0_1": [3, 1, 1]}'


def _widgets(name: str, **changed) -> dict:
    """Every widget of the node ``name`` at its default, ``changed`` set."""
    spec = NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]
    return {**{k: v[1]["default"] for k, v in spec.items() if k != "model"}, **changed}


def _finetuned(path, lora=None, metadata=None, alpha=4.0):
    """A `dit-accel finetune`-style folder of Dense with ``lora`` (its adapter metadata ``metadata``)."""
    info = {"format": 1, "method": {"method": "dense"}, "files": {"lora": LORA_FILE if lora else None,
                                                                  "sla_projections": None}}
    if lora:
        info["lora"] = {"rank": 2, "alpha": alpha, "target_modules": ["attn1.to_q"]}

    def write(staging):
        if lora:
            meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in (metadata or {}).items()})}
            save_file(lora, str(staging / LORA_FILE), metadata=meta if metadata else None)

    return write_weights_folder(path, write, info)


def test_a_strategy_in_the_plan_node_is_refused_naming_the_strategy_node(wan, tmp_path):
    strategy = tmp_path / "mask_strategy.json"
    strategy.write_text(STRATEGY)
    with pytest.raises(ValueError) as err:
        run_node("DitAccelPlan", wan, **_widgets("DitAccelPlan", plan_path=str(strategy)))
    assert str(err.value) == (f"dit_accel: widget plan_path={str(strategy)!r} is a FastVideo STA mask strategy, not a "
                              "plan: load it with the dit_accel TileStrategy node (path)")
    # which runs it with the tile its widget gives
    patched = run_node("DitAccelTileStrategy", wan, path=str(strategy), tile="1,2,2", **COMMON_WIDGETS)
    assert patched.model_options["transformer_options"]["optimized_attention_override"].patch.schedule.method.tile \
        == (1, 2, 2)


def test_a_file_for_another_path_node_names_that_node(wan, tmp_path):
    folder, plan = tmp_path / "ft", tmp_path / "plan.json"
    _finetuned(folder)
    dit_accel.SparsePlan([dit_accel.Phase(0, None)], num_layers=2).save(plan)
    method_file = str(folder / METHOD_FILE)
    with pytest.raises(ValueError) as err:  # (before: "key 'format' is not "step_layer_head" ...")
        run_node("DitAccelTileStrategy", wan, path=str(plan), tile="6,8,8", **COMMON_WIDGETS)
    assert str(err.value).startswith(f"dit_accel: widget path={str(plan)!r} is a dit_accel plan (dit-accel calibrate's "
                                     "JSON), not a FastVideo STA mask-strategy JSON"), str(err.value)
    assert str(err.value).endswith(": load it with the dit_accel plan node (plan_path)")
    with pytest.raises(ValueError) as err:  # (before: "<folder>: cannot read it: it is a folder")
        run_node("DitAccelTileStrategy", wan, path=str(folder), tile="6,8,8", **COMMON_WIDGETS)
    assert str(err.value).endswith(": load it with the dit_accel fine-tuned weights node (weights_path)")
    with pytest.raises(ValueError) as err:  # (before: "... is not a folder; ... A plan JSON goes into the plan node")
        run_node("DitAccelFinetuned", wan, **_widgets("DitAccelFinetuned", weights_path=method_file))
    assert str(err.value) == (f"dit_accel: widget weights_path={method_file!r} is a file of the dit-accel finetune "
                              f"output folder {folder}, not a dit-accel finetune output folder: load its folder with "
                              "the dit_accel fine-tuned weights node (weights_path)")
    with pytest.raises(ValueError) as err:  # (before: "format: must be "dit_accel.sparse_plan"; got 1 ...")
        run_node("DitAccelPlan", wan, **_widgets("DitAccelPlan", plan_path=method_file))
    assert str(err.value).endswith("not a plan: load its folder with the dit_accel fine-tuned weights node "
                                   "(weights_path)"), str(err.value)
    strategy = tmp_path / "mask_strategy.json"
    strategy.write_text(STRATEGY)
    with pytest.raises(ValueError, match=r"is a FastVideo STA mask strategy, not a dit-accel finetune output folder: "
                                         r"load it with the dit_accel TileStrategy node \(path\)$"):
        run_node("DitAccelFinetuned", wan, **_widgets("DitAccelFinetuned", weights_path=str(strategy)))
    # what each node takes still loads there (a plan kept in a fine-tuned folder too)
    run_node("DitAccelPlan", wan, **_widgets("DitAccelPlan", plan_path=str(plan)))
    dit_accel.SparsePlan([dit_accel.Phase(0, None)], num_layers=2).save(folder / "plan.json")
    run_node("DitAccelPlan", wan, **_widgets("DitAccelPlan", plan_path=str(folder / "plan.json")))
    run_node("DitAccelFinetuned", wan, **_widgets("DitAccelFinetuned", weights_path=str(folder)))


def _wan_lora(g):
    return {f"transformer.blocks.{i}.attn1.to_q.lora_{side}.weight": torch.randn(*shape, generator=g) * 0.2
            for i in range(2) for side, shape in (("A", (2, 64)), ("B", (64, 2)))}


def test_an_rslora_runs_at_alpha_over_the_root_of_its_rank_as_on_the_diffusers_path(comfy, wan, tmp_path):
    lora = _wan_lora(torch.Generator().manual_seed(3))
    meta = {"r": 2, "lora_alpha": 4.0, "use_rslora": True, "target_modules": ["attn1.to_q"]}
    weights = patched_weights(patch_model(wan, dit_accel.Dense(), weights=_finetuned(tmp_path / "ft", lora, meta)))
    base = patched_weights(wan)
    for i in range(2):
        a = lora[f"transformer.blocks.{i}.attn1.to_q.lora_A.weight"]
        b = lora[f"transformer.blocks.{i}.attn1.to_q.lora_B.weight"]
        key = f"blocks.{i}.self_attn.q.weight"
        torch.testing.assert_close(weights[key], base[key] + 4.0 / math.sqrt(2) * b @ a, rtol=1e-5, atol=1e-6)


def test_a_lora_with_per_module_alphas_is_refused(comfy, wan, tmp_path):
    lora = _wan_lora(torch.Generator().manual_seed(4))
    meta = {"r": 2, "lora_alpha": 4.0, "alpha_pattern": {"blocks.0.attn1.to_q": 8.0}, "target_modules": ["attn1.to_q"]}
    with pytest.raises(ValueError, match=r"adapter metadata sets alpha_pattern \(per-module LoRA alphas: "
                                         r"'blocks.0.attn1.to_q' and 0 more\), which the node cannot apply"):
        patch_model(wan, dit_accel.Dense(), weights=_finetuned(tmp_path / "ft", lora, meta))


def test_a_comfyui_whose_attention_ignores_the_override_is_refused(comfy, wan, monkeypatch):
    """An older ComfyUI (no wrap_attn: its attention functions take no transformer_options) never calls the
    override: the node patched, the sampler ran ComfyUI's dense attention, and nothing said so."""
    attention = comfy.attention

    def old_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False):
        return q

    monkeypatch.setattr(attention, "optimized_attention", old_attention)
    with pytest.raises(ValueError, match=r"^dit_accel: this ComfyUI's attention does not call transformer_options"
                                         r"\[.optimized_attention_override.\] .* \(update ComfyUI\)"):
        patch_model(wan, dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)))
    monkeypatch.setattr(attention, "optimized_attention", lambda q, k, v, heads, **kwargs: q)  # computes, no hook
    with pytest.raises(ValueError, match="update ComfyUI"):
        run_node("DitAccelDense", wan, **COMMON_WIDGETS)
    monkeypatch.undo()
    patch_model(wan, dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)))  # ComfyUI 0.3.64's: the override is called


def test_widgets_a_preset_overrides_are_said_in_the_log(wan, caplog):
    """Radial's Wan 2.1 preset with dense_steps=20 and decay=0.5 typed: it ran dense_steps=12 and decay=0.2, and
    nothing said that the widgets shown were not the ones run."""
    presets = NODE_CLASS_MAPPINGS["DitAccelRadial"].INPUT_TYPES()["required"]["preset"][0]
    label = next(p for p in presets if p.startswith("Wan 2.1:"))
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        patched = run_node("DitAccelRadial", wan, **_widgets("DitAccelRadial", preset=label, decay=0.5, dense_steps=20))
    schedule = patched.model_options["transformer_options"]["optimized_attention_override"].patch.schedule
    assert schedule.dense_steps == 12 and schedule.method.decay == 0.2  # (the preset's, as docs/comfyui.md says)
    said = [r.getMessage() for r in caplog.records if "sets the widgets" in r.getMessage()]
    assert said == [f"dit_accel: preset {label!r} sets the widgets decay=0.5 (the preset's: 0.2), dense_steps=20 (the "
                    "preset's: 12), which run as the preset's, not as set; choose preset custom to run the widgets' "
                    "values"], said
    caplog.clear()
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):  # the widgets at their defaults: nothing to say
        run_node("DitAccelRadial", wan, **_widgets("DitAccelRadial", preset=label))
    assert not [r for r in caplog.records if "sets the widgets" in r.getMessage()]


def test_a_calibration_report_folder_in_the_plan_node_names_the_plan_it_wrote(wan, tmp_path):
    """`dit-accel calibrate --out plan.json --report-dir report`: the report folder in plan_path said "cannot read it:
    it is a folder; expected a dit_accel sparse plan", without the plan's path the folder's calibration.json records."""
    report = tmp_path / "report"
    report.mkdir()
    (report / "calibration.json").write_text(json.dumps({"plan_path": str(tmp_path / "plan.json"), "settings": {}}))
    with pytest.raises(ValueError) as err:
        run_node("DitAccelPlan", wan, **_widgets("DitAccelPlan", plan_path=str(report)))
    assert str(err.value) == (f"dit_accel: widget plan_path={str(report)!r} is the report folder of a calibration, not "
                              f"a plan: the plan it wrote is {tmp_path / 'plan.json'}; give that file")


@pytest.mark.parametrize("alpha", [float("nan"), "abc"], ids=["nan", "text"])
def test_a_lora_alpha_that_is_no_finite_number_is_refused(comfy, wan, tmp_path, alpha):
    """lora.alpha NaN in the folder's method file made every patched weight NaN (and the output), without a word;
    text failed with "could not convert string to float", naming no file."""
    folder = _finetuned(tmp_path / "ft", _wan_lora(torch.Generator().manual_seed(5)), alpha=alpha)
    with pytest.raises(ValueError) as err:
        patch_model(wan, dit_accel.Dense(), weights=folder)
    if alpha != alpha:  # NaN: refused where the method file is read (no JSON number), naming the key
        assert str(err.value).startswith(f"{folder / METHOD_FILE}: holds NaN at lora.alpha: no JSON number")
        return
    assert str(err.value) == (f"dit_accel: {folder / METHOD_FILE}: lora.alpha={alpha!r} is invalid: a finite number "
                              "(the LoRA's scale is alpha / rank) or null; train or convert it again")
