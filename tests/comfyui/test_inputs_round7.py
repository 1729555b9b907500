"""Node and patch_model inputs that ran silently wrong or failed late: each is now a one-line error when the node
runs, and the MODEL given stays as it was."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import dit_accel
from dit_accel.checkpoints.finetuned import VSA_FILE, write_weights_folder
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.plans.sparse_plan import Phase, SparsePlan
from tests.comfyui.models import COMMON_WIDGETS as COMMON, CASES, build, override_of, run_node, sample
from tests.comfyui.test_weights import RANK, _folder, _lora

TILE = dict(preset="custom", tile="1,2,2", window="3,1,1", block_size="", fit=False)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_second_dit_accel_node_on_a_patched_model_is_refused(comfy, wan):
    """Tile -> Dense ran Tile (the Dense override declined every call to the Tile one before it)."""
    case = CASES["wan21-t2v"]
    tiled = run_node("DitAccelTile", wan, **TILE, **COMMON)
    before = sample(comfy, tiled, case)
    with pytest.raises(ValueError, match=r"^dit_accel: this MODEL already comes out of a dit_accel node \(Tile") as err:
        run_node("DitAccelDense", tiled, **COMMON)
    assert "Connect this node's model input to the MODEL before the first dit_accel node" in _one_line(err)
    assert torch.equal(sample(comfy, tiled, case), before)  # the patched model is as it was
    run_node("DitAccelDense", wan, **COMMON)  # the loader's MODEL takes another node


def test_a_lora_for_another_size_of_wan_is_refused(comfy, wan, tmp_path):
    """ComfyUI logged a shape mismatch and sampled without the LoRA: the output was the base model's."""
    big = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(RANK, 128),
           "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(128, RANK)}
    folder = _folder(tmp_path / "big", dit_accel.Dense(), lora=big)
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(2, 128\), but ComfyUI's WanModel "
                                         r"blocks.0.self_attn.q is 64x64") as err:
        patch_model(wan, dit_accel.Dense(), weights=folder)
    assert "another size of Wan" in _one_line(err)


def test_weights_with_non_finite_values_are_refused(wan, tmp_path):
    """A NaN in the LoRA or the SLA projections made every output NaN (the Diffusers path refuses such files)."""
    lora = _lora(torch.Generator().manual_seed(2))
    lora["transformer.blocks.0.attn1.to_q.lora_A.weight"][0, 0] = float("nan")
    folder = _folder(tmp_path / "lora", dit_accel.Dense(), lora=lora)
    with pytest.raises(ValueError, match="lora_A.weight has 1 non-finite values"):
        patch_model(wan, dit_accel.Dense(), weights=folder)
    sla = {f"blocks.{i}.attn1.weight": torch.full((32, 32), float("inf")) for i in range(2)}
    folder = _folder(tmp_path / "sla", dit_accel.SLA(topk=0.5), sla=sla)
    with pytest.raises(ValueError, match="blocks.0.attn1.weight has 1024 non-finite values"):
        patch_model(wan, dit_accel.SLA(topk=0.5), weights=folder)


@pytest.mark.parametrize("strength", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_non_finite_lora_strength_is_refused(wan, tmp_path, strength):
    """ComfyUI's FLOAT widget lets NaN through its min/max check: the LoRA patches made the output NaN."""
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=_lora(torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match=rf"^lora_strength={strength!r} is invalid: a finite number"):
        run_node("DitAccelFinetuned", wan, weights_path=str(folder), lora_strength=strength, allow_other_grid=False,
              backend="auto")


def test_sla_projections_of_another_head_dim_are_refused_by_the_node(wan, tmp_path):
    """They were accepted and failed at the first sparse step inside the sampler (a matmul shape error)."""
    sla = {f"blocks.{i}.attn1.weight": torch.zeros(64, 64) for i in range(2)}
    folder = _folder(tmp_path / "ft", dit_accel.SLA(topk=0.5), sla=sla)
    with pytest.raises(ValueError, match=r"blocks.0.attn1.weight has shape \(64, 64\), but layer 0 of this WanModel "
                                         r"takes \(32, 32\) \(its head dim is 32\)"):
        run_node("DitAccelFinetuned", wan, weights_path=str(folder), lora_strength=1.0, allow_other_grid=False,
              backend="torch")


def test_a_folder_with_trained_vsa_gates_is_refused(wan, tmp_path):
    """The gates were dropped without a word: VSA ran its fine branch alone, not the model that was trained."""
    method = dit_accel.VSA(tile=(1, 2, 2))
    info = {"format": 1, "method": json.loads(json.dumps(method.to_dict())),
            "files": {"lora": None, "sla_projections": None, "vsa_gates": VSA_FILE}}
    folder = write_weights_folder(
        tmp_path / "vsa", lambda staging: save_file({"blocks.0.to_gate_compress.weight": torch.zeros(64, 64)},
                                                    str(staging / VSA_FILE)), info)
    with pytest.raises(ValueError, match=r"holds trained VSA gates \(vsa_gates.safetensors\), which ComfyUI's "
                                         r"WanModel has no modules for"):
        run_node("DitAccelFinetuned", wan, weights_path=str(folder), lora_strength=1.0, allow_other_grid=False,
              backend="torch")


def test_a_nan_dense_above_sigma_is_refused(wan):
    """NaN > 0 is False, so the node turned it into None: dense_above_sigma silently off."""
    with pytest.raises(ValueError, match=r"^dense_above_sigma=nan is invalid: a sigma >= 0"):
        run_node("DitAccelTile", wan, **TILE, **dict(COMMON, dense_above_sigma=math.nan))


def test_a_plan_naming_a_video_method_is_refused_on_an_image_model(comfy, tmp_path):
    """The plan's phases were not checked against FLUX's 2-D grid: it failed at its first sparse step, after
    the dense ones had run."""
    plan = SparsePlan([Phase(0, 1), Phase(1, None, {1: dit_accel.Radial()})], num_layers=2)
    path = plan.save(tmp_path / "plan.json")
    with pytest.raises(ValueError, match=r"method 'radial' needs a video's \(T, H, W\) token grid, but the sparse "
                                         r"calls of FLUX .*\(plan .*plan.json runs it") as err:
        run_node("DitAccelPlan", build(comfy, CASES["flux"]), plan_path=str(path), allow_other_grid=False,
              backend="auto")
    _one_line(err)


def test_a_blank_sink_frames_widget_is_refused(wan):
    """Blank read as none (no sink frames), where Radial's default is frame 0; other blank widgets with a
    default are refused or mean the default."""
    with pytest.raises(ValueError, match=r"^dit_accel: widget sink_frames='  ' is invalid: .*or none\)$"):
        run_node("DitAccelRadial", wan, preset="custom", decay=1.0, block_size="128", sink_frames="  ", spatial="band",
              rule="union", **COMMON)
    patched = run_node("DitAccelRadial", wan, preset="custom", decay=1.0, block_size="128", sink_frames="none",
                    spatial="band", rule="union", **COMMON)
    assert override_of(patched).patch.schedule.method.sink_frames == ()


def test_a_preset_published_for_another_family_is_refused(wan):
    """HunyuanVideo's published Tile setting ran on a Wan model without a word."""
    presets = NODE_CLASS_MAPPINGS["DitAccelTile"].INPUT_TYPES()["required"]["preset"][0]
    label = next(p for p in presets if p.startswith("HunyuanVideo:"))
    with pytest.raises(ValueError, match=r"was published for HunyuanVideo \(HunyuanVideo\); this MODEL is WanModel "
                                         r"\(Wan\): choose a preset published for it, or custom"):
        run_node("DitAccelTile", wan, **dict(TILE, preset=label), **COMMON)


def test_dense_layers_in_brackets_are_layer_indices_as_on_the_command_line(wan):
    """"[1]" made the first layer dense (as "1" does); the command line reads it as layer 1, like "1,"."""
    for text in ("[1]", "(1)", "1,"):
        patched = run_node("DitAccelTile", wan, **TILE, **dict(COMMON, dense_layers=text))
        assert override_of(patched).patch.schedule.dense_layers == {1}, text
    assert override_of(run_node("DitAccelTile", wan, **TILE, **dict(COMMON, dense_layers="1"))).patch.schedule \
        .dense_layers == {0}


def test_a_strategy_for_another_head_count_is_refused_by_the_node(wan, tmp_path):
    """A strategy with windows for 1 head on this 2-head model was accepted and failed inside the sampler."""
    strategy = tmp_path / "strategy.json"
    strategy.write_text('{"0_0_0": [3, 1, 1], "0_1_0": [3, 1, 1]}')
    with pytest.raises(ValueError, match=r"strategy.json has windows for 1 heads per layer, but WanModel's "
                                         r"self-attention layers run 2 heads: use a strategy searched for this model"):
        run_node("DitAccelTileStrategy", wan, path=str(strategy), tile="1,2,2", **COMMON)


def test_a_strategy_naming_layers_the_model_lacks_is_said_in_comfyuis_log(wan, tmp_path, caplog):
    """dit_accel.apply warns of strategy entries for layers the model lacks (the file is another model's); the node
    said nothing."""
    strategy = tmp_path / "strategy.json"
    strategy.write_text('{"0_0_0": [3, 1, 1], "0_0_1": [3, 1, 1], "0_5_0": [3, 1, 1], "0_5_1": [3, 1, 1]}')
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        run_node("DitAccelTileStrategy", wan, path=str(strategy), tile="1,2,2", **COMMON)
    assert any("names attention layers 5, but WanModel has 2 (0..1): those entries never run" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
