"""ComfyUI, trust round 20 of the nodes' inputs.

- The node ran a folder's LoRA at the method file's lora.alpha, where dit_accel.apply (Diffusers' loader) reads the
  LoRA file's adapter metadata: a hand-made folder whose two disagree (or whose LoRA file has no metadata: Diffusers
  runs it at alpha = rank) ran at another scale through the node than through apply. The node now reads apply's
  source and says in the log that the method file's value is not used; a LoRA whose ranks are not its metadata's r
  (apply refuses it) is refused, and so is a kohya-style <module>.alpha (the node said "another model").
- dpm_fast and dpm_adaptive make no model call in the last step: dense_last_steps=1 ran nothing dense, unsaid.
- A folder of both Wan 2.2 A14B experts loaded with the other part's expert (the two MODELs look alike) is said
  from the sampler's part of the schedule.
- dense_above_sigma above every step's sigma (SD's 14.6 on a flow model) ran no step dense, unsaid; inf was taken;
  the widget's step of 0.01 made ComfyUI's frontend round a typed 0.875 to 0.88.
- A plan for another model said "this pipeline's transformer is ...": ComfyUI has no pipeline.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import dit_accel
from dit_accel.checkpoints.finetuned import LORA_FILE, METHOD_FILE, write_weights_folder
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from tests.comfyui.models import CASES, patched_weights, report_steps, sample


def _wan_lora(g, rank=2):
    return {f"transformer.blocks.{i}.attn1.to_q.lora_{side}.weight": torch.randn(*shape, generator=g) * 0.2
            for i in range(2) for side, shape in (("A", (rank, 64)), ("B", (64, rank)))}


def _finetuned(path, lora, metadata=None, alpha=4.0):
    """A `dit-accel finetune`-style folder of Dense with ``lora`` (adapter metadata ``metadata``; None: none) and
    ``lora.alpha`` ``alpha`` in its method file."""
    info = {"format": 1, "method": {"method": "dense"}, "files": {"lora": LORA_FILE, "sla_projections": None},
            "lora": {"rank": 2, "alpha": alpha, "target_modules": ["attn1.to_q"]}}

    def write(staging):
        meta = None if metadata is None else {"lora_adapter_metadata": json.dumps(
            {f"transformer.{k}": v for k, v in metadata.items()})}
        save_file(lora, str(staging / LORA_FILE), metadata=meta)

    return write_weights_folder(path, write, info)


def _scale_of(wan, folder, lora) -> float:
    """The scale the node ran the LoRA at: (patched - base) of block 0's q over its B @ A."""
    weights, base = patched_weights(patch_model(wan, dit_accel.Dense(), weights=folder)), patched_weights(wan)
    a, b = (lora[f"transformer.blocks.0.attn1.to_q.lora_{s}.weight"] for s in "AB")
    delta = weights["blocks.0.self_attn.q.weight"] - base["blocks.0.self_attn.q.weight"]
    return float((delta * (b @ a)).sum() / (b @ a).pow(2).sum())


@pytest.mark.parametrize("metadata, scale", [(None, 1.0), ({"r": 2, "lora_alpha": 8.0}, 4.0)],
                         ids=["no-metadata", "metadata-alpha-8"])
def test_the_lora_runs_at_the_alpha_apply_reads_not_the_method_files(comfy, wan, tmp_path, caplog, metadata, scale):
    """lora.alpha=4 in the method file, rank 2: apply runs scale 1 without adapter metadata (Diffusers: alpha =
    rank) and 8 / 2 = 4 with lora_alpha=8 there; the node ran 4 / 2 = 2 in both."""
    lora = _wan_lora(torch.Generator().manual_seed(1))
    folder = _finetuned(tmp_path / "ft", lora, metadata)
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        assert math.isclose(_scale_of(wan, folder, lora), scale, rel_tol=1e-4)
    said = [r.getMessage() for r in caplog.records if "records lora.alpha" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"dit_accel: {folder / METHOD_FILE} records lora.alpha=4.0, but the "
                                                 f"LoRA {folder / LORA_FILE} runs at "), said
    caplog.clear()
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):  # the two agree: nothing said, alpha / rank
        agreed = _finetuned(tmp_path / "agreed", lora, {"r": 2, "lora_alpha": 4.0})
        assert math.isclose(_scale_of(wan, agreed, lora), 2.0, rel_tol=1e-4)
    assert not [r for r in caplog.records if "records lora.alpha" in r.getMessage()]


def test_a_lora_whose_rank_is_not_its_metadatas_r_is_refused(comfy, wan, tmp_path):
    """Metadata r=4 over rank-2 tensors: apply refuses it; the node ran it at lora_alpha / 2."""
    lora = _wan_lora(torch.Generator().manual_seed(2))
    folder = _finetuned(tmp_path / "ft", lora, {"r": 4, "lora_alpha": 4.0})
    with pytest.raises(ValueError) as err:
        patch_model(wan, dit_accel.Dense(), weights=folder)
    assert str(err.value) == (f"dit_accel: {folder / LORA_FILE}: the LoRA of blocks.0.attn1.to_q has rank {{'A': 2, "
                              "'B': 2} (lora_A rows / lora_B columns), but its adapter metadata says r=4, which "
                              "dit_accel.apply refuses too: train or convert it again")


def test_a_nan_lora_alpha_in_the_adapter_metadata_is_refused(comfy, wan, tmp_path):
    lora = _wan_lora(torch.Generator().manual_seed(3))
    folder = _finetuned(tmp_path / "ft", lora, {"r": 2, "lora_alpha": float("nan")}, alpha=None)
    with pytest.raises(ValueError, match=r"its adapter metadata gives lora_alpha=nan; expected a finite number"):
        patch_model(wan, dit_accel.Dense(), weights=folder)


@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
def test_a_sampler_that_never_reaches_the_last_step_is_said(comfy, wan, caplog, sampler):
    """dpm_fast at 4 steps integrates from sigma_max down to sigmas[-2] and calls the model at none below it: with
    dense_last_steps=1 every call ran sparse, and nothing said the dense last step never came."""
    case = CASES["wan21-t2v"]
    patched = patch_model(wan, dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)), dense_last_steps=1)
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        sample(comfy, patched, case, steps=4, sampler=sampler)
    assert {s for s, _, _ in report_steps(patched)} <= {0, 1, 2}  # (ComfyUI's own: no call in step 3)
    said = [r.getMessage() for r in caplog.records if "makes no model call in the last" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"dit_accel: the {sampler} sampler makes no model call in the last "
                                                 "of its 4 steps"), said
    assert "dense_last_steps=1 runs no call dense" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):  # euler steps through them: nothing to say
        sample(comfy, patched, case, steps=4, sampler="euler")
    patched = patch_model(wan, dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)), dense_last_steps=1)
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):  # a part ending above 0: integrated to its end
        _part(comfy, patched, 0, 2, sampler)
    assert not [r for r in caplog.records if "makes no model call" in r.getMessage()]


def _two_experts(path):
    g = torch.Generator().manual_seed(6)
    lora = _wan_lora(g)
    lora.update({k.replace("transformer.", "transformer_2.", 1): v for k, v in _wan_lora(g).items()})
    return _finetuned(path, lora, {"r": 2, "lora_alpha": 4.0})


def _part(comfy, patched, start_step, last_step, sampler="euler"):
    """KSamplerAdvanced's part of a 4-step schedule (steps start_step to last_step; leftover noise kept)."""
    case = CASES["wan21-t2v"]
    noise = torch.randn(case.latent, generator=torch.Generator().manual_seed(5))
    comfy.sample.sample(patched, noise, 4, 1.0, sampler, "simple", case.cond(), case.cond(), torch.zeros(case.latent),
                        start_step=start_step, last_step=last_step, disable_pbar=True, seed=0)


@pytest.mark.parametrize("expert", ["transformer", "transformer_2"])
def test_an_expert_sampling_the_other_experts_part_is_said(comfy, wan, tmp_path, caplog, expert):
    """The low-noise MODEL given expert=transformer (or the high-noise one transformer_2) loaded the other expert's
    weights without a word: the two MODELs look alike; their KSamplerAdvanced parts of the schedule do not."""
    patched = patch_model(wan, dit_accel.Dense(), weights=_two_experts(tmp_path / "a14b"), expert=expert)
    wrong, right = ((2, None), (0, 2)) if expert == "transformer" else ((0, 2), (2, None))
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        _part(comfy, patched, *right)
    assert not [r for r in caplog.records if "was given expert=" in r.getMessage()]
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        _part(comfy, patched, *wrong)
    said = [r.getMessage() for r in caplog.records if "was given expert=" in r.getMessage()]
    other = "transformer_2" if expert == "transformer" else "transformer"
    part = "low" if expert == "transformer" else "high"
    assert len(said) == 1 and said[0].startswith(f"dit_accel: this WanModel was given expert={expert} "), said
    assert said[0].endswith(f"if this MODEL is the {part}-noise expert, set expert={other} on its dit_accel "
                            "fine-tuned weights node"), said


def test_a_dense_above_sigma_above_every_step_is_said(comfy, wan, caplog):
    """dense_above_sigma=14.6 (SD's sigma_max) on Wan, whose sigmas run from 1: no step ran dense, and nothing said
    so (only a threshold below every step was said); inf, which the docs say is refused, was taken as off."""
    case = CASES["wan21-t2v"]
    patched = patch_model(wan, dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)), dense_above_sigma=14.6)
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):
        sample(comfy, patched, case, steps=2)
    assert {kind for _, _, kind in report_steps(patched)} == {"sparse"}
    said = [r.getMessage() for r in caplog.records if "dense_above_sigma=14.6" in r.getMessage()]
    assert said == ["dit_accel: dense_above_sigma=14.6 is at or above the sigma of every step of this sampler (the "
                    "first starts at 1, the top of this model's schedule): no step runs dense. Lower it below that "
                    "(calls above it run dense; a flow model's sigmas, Wan's, FLUX's, run from 1 down), or set 0 "
                    "(off)"], said
    caplog.clear()
    patched = patch_model(wan, dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)), dense_above_sigma=0.9)
    with caplog.at_level("WARNING", logger="dit_accel.comfyui"):  # the first step dense: nothing to say
        sample(comfy, patched, case, steps=2)
    assert not [r for r in caplog.records if "dense_above_sigma" in r.getMessage()]
    with pytest.raises(ValueError, match=r"^dense_above_sigma=inf is invalid: a sigma >= 0 and finite"):
        patch_model(wan, dit_accel.Dense(), dense_above_sigma=float("inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64], ids=["float", "int"])
def test_a_kohya_alpha_in_the_lora_is_refused_as_apply_refuses_it(comfy, wan, tmp_path, dtype):
    """A LoRA file with kohya's <module>.alpha beside lora_A/lora_B: the node said "LoRA tensors for modules ComfyUI's
    WanModel does not have ... the weights are for another model" (an int alpha: "is int64; expected float")."""
    lora = _wan_lora(torch.Generator().manual_seed(7))
    lora.update({f"transformer.blocks.{i}.attn1.to_q.alpha": torch.tensor(4, dtype=dtype) for i in range(2)})
    folder = _finetuned(tmp_path / "ft", lora, {"r": 2, "lora_alpha": 4.0})
    with pytest.raises(ValueError) as err:
        patch_model(wan, dit_accel.Dense(), weights=folder)
    assert str(err.value).startswith(f"dit_accel: {folder / LORA_FILE} holds transformer.blocks.0.attn1.to_q.alpha, "
                                     "a kohya-style LoRA alpha, which Diffusers' loader (dit_accel.apply) does not "
                                     "apply, nor does this node"), str(err.value)
    assert str(err.value).endswith("Convert the checkpoint with dit-accel convert (it folds alpha / rank into lora_A), "
                                   "or save the file without the alpha tensors")


def test_dense_above_sigma_takes_three_decimals():
    """ComfyUI's frontend rounds a FLOAT widget to its step's decimals: at step 0.01 a typed 0.875 (Wan 2.2 A14B's
    switch of experts) ran as 0.88."""
    for name, node in NODE_CLASS_MAPPINGS.items():
        spec = node.INPUT_TYPES()["required"].get("dense_above_sigma")
        if spec is not None:
            decimals = max(-math.floor(math.log10(spec[1]["step"])), 0)
            assert round(0.875, decimals) == 0.875, name


def test_a_plan_for_another_model_names_the_comfyui_model(wan):
    """A FLUX plan on Wan said "this pipeline's transformer is WanTransformer3DModel": ComfyUI has no pipeline, and
    shows the model as WanModel."""
    plan = dit_accel.SparsePlan([dit_accel.Phase(0, None, default=dit_accel.Tile(tile=(1, 2, 2), window=(1, 1, 1)))],
                                num_layers=2, provenance={"model_class": "FluxTransformer2DModel",
                                                          "model_id": "black-forest-labs/FLUX.1-dev"})
    with pytest.raises(ValueError) as err:
        patch_model(wan, plan)
    assert str(err.value) == ("dit_accel: the plan was calibrated for FluxTransformer2DModel (black-forest-labs/"
                              "FLUX.1-dev); this MODEL is ComfyUI's WanModel (Wan; Diffusers' WanTransformer3DModel): "
                              "calibrate a plan for this model (dit-accel calibrate)")
