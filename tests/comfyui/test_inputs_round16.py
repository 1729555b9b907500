"""ComfyUI, trust round 16: a fine-tuned folder's LoRA that covers only part of the modules its adapter metadata
names on this ComfyUI model (trained on a model of the same width with fewer layers) is refused, as
``dit_accel.apply(..., weights=DIR)`` refuses it on the Diffusers model; before, the node patched the layers the file
has and ran the rest without the LoRA."""

import pytest
import torch
from peft import LoraConfig

import dit_accel

from dit_accel.comfyui import NODE_CLASS_MAPPINGS
from tests.comfyui.models import AS_DIFFUSERS_CASES, build, patched_weights


def save_random_finetune(path, transformer, config, seed: int, method=dit_accel.Tile()) -> None:
    """Write ``path`` as ``dit-accel finetune --method tile`` would: the peft LoRA ``config`` on ``transformer``
    (random values from ``seed``) and no SLA projections (they would name the missing layers first)."""
    from dit_accel.checkpoints.finetuned import save_trained_weights

    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_trained_weights(path, transformer=transformer, method=method, lora_config=config)


def _diffusers_wan(layers: int):
    """Diffusers' Wan transformer of ComfyUI's test WanModel's width (64 in 2 heads of 32, feed-forward 64)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads")


def _run(model, folder):
    return NODE_CLASS_MAPPINGS["DitAccelFinetuned"]().patch(model, weights_path=str(folder), lora_strength=1.0,
                                                             allow_other_grid=False, backend="torch")[0]


def test_a_wan_lora_of_fewer_layers_is_refused_naming_the_modules_it_lacks(comfy, wan, tmp_path):
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"])
    save_random_finetune(tmp_path / "one", _diffusers_wan(1), config, seed=1)  # ComfyUI's model has 2 blocks
    with pytest.raises(ValueError, match=r"one/pytorch_lora_weights\.safetensors: its adapter metadata says the LoRA "
                                         r"adapts target_modules=\['to_q', 'to_v'\], but it holds no LoRA for 4 such "
                                         r"module\(s\) of ComfyUI's WanModel \(blocks\.1\.attn1\.to_q, "
                                         r"blocks\.1\.attn1\.to_v, blocks\.1\.attn2\.to_q, blocks\.1\.attn2\.to_v\): "
                                         r"it was trained on another model"):
        _run(wan, tmp_path / "one")
    save_random_finetune(tmp_path / "two", _diffusers_wan(2), config, seed=1)
    patched = _run(wan, tmp_path / "two")  # every module it names: loads, and patches all 8 weights
    before = patched_weights(wan)
    changed = {k for k, v in patched_weights(patched).items() if not v.equal(before[k])}
    assert changed == {f"blocks.{i}.{a}.{p}.weight" for i in range(2) for a in ("self_attn", "cross_attn")
                       for p in ("q", "v")}


def _diffusers_flux(single: int):
    """dit_accel's tiny Diffusers FLUX (the width of AS_DIFFUSERS_CASES["flux"]) with ``single`` single blocks."""
    import diffusers

    from dit_accel.models.tiny import TRANSFORMERS

    return diffusers.FluxTransformer2DModel(**{**TRANSFORMERS["flux"].config, "num_single_layers": single})


def test_a_flux_lora_without_the_single_block_its_metadata_names_is_refused(comfy, tmp_path):
    model = build(comfy, AS_DIFFUSERS_CASES["flux"])  # one double and one single block
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"])
    save_random_finetune(tmp_path / "no-single", _diffusers_flux(0), config, seed=2, method=dit_accel.Tile(tile=(8, 8), window=(2, 2)))
    with pytest.raises(ValueError, match=r"holds no LoRA for 1 such module\(s\) of ComfyUI's Flux "
                                         r"\(single_transformer_blocks\.0\.attn\.to_q\)"):
        _run(model, tmp_path / "no-single")
    # a module the metadata leaves out (exclude_modules, as peft reads it) is not asked for
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"],
                        exclude_modules=["single_transformer_blocks.0.attn.to_q"])
    save_random_finetune(tmp_path / "excluded", _diffusers_flux(1), config, seed=2, method=dit_accel.Tile(tile=(8, 8), window=(2, 2)))
    _run(model, tmp_path / "excluded")
