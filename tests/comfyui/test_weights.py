"""``dit-accel finetune`` folders on ComfyUI's WanModel: the LoRA (Diffusers names) as ComfyUI weight patches,
the SLA projections in the override, through the fine-tuned weights node."""

import json

import pytest
import torch
from safetensors.torch import save_file

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.checkpoints.finetuned import LORA_FILE, SLA_FILE, write_weights_folder
from tests.comfyui.models import CASES, build, sample

RANK, ALPHA = 2, 4.0


def _folder(path, method, lora=None, sla=None):
    files = {"lora": LORA_FILE if lora else None, "sla_projections": SLA_FILE if sla else None}
    info = {"format": 1, "method": json.loads(json.dumps(method.to_dict())), "files": files,
            "lora": {"rank": RANK, "alpha": ALPHA, "target_modules": ["to_q", "to_v"]}}

    def write(staging):
        if lora:  # (with the adapter metadata dit-accel finetune writes: its lora_alpha is the one the LoRA runs at)
            ranks = {int(t.shape[0]) for k, t in lora.items() if ".lora_A." in k and t.dim() == 2}
            meta = {"transformer.r": ranks.pop(), "transformer.lora_alpha": ALPHA} if len(ranks) == 1 else None
            save_file(lora, str(staging / LORA_FILE),
                      metadata=None if meta is None else {"lora_adapter_metadata": json.dumps(meta)})
        if sla:
            save_file(sla, str(staging / SLA_FILE))

    return write_weights_folder(path, write, info)


def _lora(g):
    out = {}
    for i in range(2):
        for name in ("to_q", "to_v"):
            out[f"transformer.blocks.{i}.attn1.{name}.lora_A.weight"] = torch.randn(RANK, 64, generator=g) * 0.2
            out[f"transformer.blocks.{i}.attn1.{name}.lora_B.weight"] = torch.randn(64, RANK, generator=g) * 0.2
    return out


@pytest.fixture(scope="module")
def wan(comfy):
    return build(comfy, CASES["wan21-t2v"])


def test_the_lora_is_the_merged_weights_comfyui_runs(comfy, wan, tmp_path):
    case = CASES["wan21-t2v"]
    lora = _lora(torch.Generator().manual_seed(11))
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=lora)
    before = sample(comfy, wan, case)
    out = sample(comfy, patch_model(wan, dit_accel.Dense(), weights=folder), case)
    merged = build(comfy, case)  # the same random weights, then W += alpha / rank * B @ A by hand
    with torch.no_grad():
        for i in range(2):
            for name, attr in (("to_q", "q"), ("to_v", "v")):
                a = lora[f"transformer.blocks.{i}.attn1.{name}.lora_A.weight"]
                b = lora[f"transformer.blocks.{i}.attn1.{name}.lora_B.weight"]
                getattr(merged.model.diffusion_model.blocks[i].self_attn, attr).weight += ALPHA / RANK * b @ a
    torch.testing.assert_close(out, sample(comfy, merged, case), rtol=1e-5, atol=1e-5)
    assert (out - before).abs().max() > 1e-3
    assert torch.equal(sample(comfy, wan, case), before)  # the model given keeps its weights


def test_the_node_runs_the_folders_method_with_its_sla_projections(comfy, wan, tmp_path):
    case = CASES["wan21-t2v"]
    g = torch.Generator().manual_seed(12)
    sla = {}
    for i in range(2):
        sla[f"blocks.{i}.attn1.weight"] = torch.randn(32, 32, generator=g) * 0.3
        sla[f"blocks.{i}.attn1.bias"] = torch.randn(32, generator=g) * 0.3
    method = dit_accel.SLA(topk=0.5)
    folder = _folder(tmp_path / "ft", method, sla=sla)
    node = NODE_CLASS_MAPPINGS["DitAccelFinetuned"]
    (patched,) = node().patch(wan, weights_path=str(folder), lora_strength=1.0, allow_other_grid=False,
                              backend="torch")
    patch = patched.model_options["transformer_options"]["optimized_attention_override"].patch
    assert patch.schedule.method == method and sorted(patch.projections) == [0, 1]
    assert torch.equal(patch.projections[1].weight, sla["blocks.1.attn1.weight"])
    trained = sample(comfy, patched, case)
    untrained = sample(comfy, patch_model(wan, method, backend="torch"), case)
    assert (trained - untrained).abs().max() > 1e-4  # the projections take part in the sparse calls
    zero = _folder(tmp_path / "zero", method, sla={k: torch.zeros_like(v) for k, v in sla.items()})
    torch.testing.assert_close(sample(comfy, patch_model(wan, method, weights=zero, backend="torch"), case), untrained,
                               rtol=1e-6, atol=1e-6)  # a zero projection is training-free SLA


def test_weights_that_do_not_fit_are_one_line_errors(comfy, wan, tmp_path):
    bad = _lora(torch.Generator().manual_seed(13))
    bad["transformer.blocks.0.norm9.lora_A.weight"] = torch.zeros(RANK, 64)
    folder = _folder(tmp_path / "bad", dit_accel.Dense(), lora=bad)
    with pytest.raises(ValueError, match="modules ComfyUI's WanModel does not have"):
        patch_model(wan, dit_accel.Dense(), weights=folder)
    folder = _folder(tmp_path / "ok", dit_accel.Dense(), lora=_lora(torch.Generator().manual_seed(14)))
    with pytest.raises(ValueError, match="modules ComfyUI's HunyuanVideo does not have"):  # (Wan's modules)
        patch_model(build(comfy, CASES["hunyuan-video"]), dit_accel.Dense(), weights=folder)
    with pytest.raises(ValueError, match="modules ComfyUI's LTXVModel does not have"):  # (Wan's modules)
        patch_model(build(comfy, CASES["ltx-video"]), dit_accel.Dense(), weights=folder)
    (folder / LORA_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match=LORA_FILE):
        patch_model(wan, dit_accel.Dense(), weights=folder)
    with pytest.raises(ValueError, match="weights_path is empty"):
        NODE_CLASS_MAPPINGS["DitAccelFinetuned"]().patch(wan, weights_path="", backend="auto")
