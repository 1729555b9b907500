"""Round 11 of the node's inputs, second pass: a LoRA on a module of the Diffusers transformer that the node does not
map (Wan's ``proj_out`` and ``condition_embedder.*``, HunyuanVideo's and HunyuanImage 2.1's embedders) was refused as
"the weights are for another model than this Wan"; a
fine-tuned folder's SLA projections ran in the call's dtype (bf16) where ``dit_accel.apply`` runs them in fp32, and
the cast in place rounded the folder's weights for every later call."""

from pathlib import Path

import pytest
import torch

import dit_accel
from dit_accel.comfyui import patch_model
from dit_accel.comfyui.override import CallState
from dit_accel.kernels.sla.api import sla_attention

from tests.comfyui.models import CASES, build, override_of, sample
from tests.comfyui.test_weights import RANK, _folder, _lora

SLA = dit_accel.SLA(topk=0.5)


def _projections(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {"weight": (32, 32), "bias": (32,)}
    return {f"blocks.{i}.attn1.{kind}": torch.randn(shapes[kind], generator=g) * 0.3
            for i in (0, 1) for kind in ("weight", "bias")}


@pytest.mark.parametrize("module, in_f, out_f", [
    ("proj_out", 64, 64), ("condition_embedder.time_embedder.linear_1", 32, 64),
    ("condition_embedder.text_embedder.linear_2", 64, 64), ("patch_embedding", 64, 64),
], ids=["proj_out", "time-embedder", "text-embedder", "patch-embedding"])
def test_a_lora_on_a_wan_module_the_node_does_not_map_says_so(comfy, wan, tmp_path, module, in_f, out_f):
    """`dit-accel finetune --target-modules to_q,proj_out` on Wan: the node said "the weights are for another model
    than this Wan", which they are not; it now names the module as one it does not patch, and what to do."""
    lora = _lora(torch.Generator().manual_seed(1))
    lora[f"transformer.{module}.lora_A.weight"] = torch.zeros(RANK, in_f)
    lora[f"transformer.{module}.lora_B.weight"] = torch.zeros(out_f, RANK)
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=lora)
    patches = dict(wan.patches)
    with pytest.raises(ValueError, match=rf"^dit_accel: .* has a LoRA on {module.replace('.', '[.]')} \(transformer"
                                         rf"[.]{module.replace('.', '[.]')}[.]lora_A[.]weight\), a module of Diffusers' "
                                         r"WanTransformer3DModel that the node does not patch on ComfyUI's WanModel \(it "
                                         r"maps the attention and feed-forward modules of blocks\.N\): train without "
                                         r"it \(--target-modules\), or run the folder with dit_accel\.apply on the "
                                         r"Diffusers pipeline$") as err:
        patch_model(wan, dit_accel.Dense(), weights=folder)
    assert "another model" not in str(err.value) and "\n" not in str(err.value)
    assert wan.patches == patches


@pytest.mark.parametrize("case, module, diffusers_class, model_name", [
    ("hunyuan-video", "x_embedder.proj", "HunyuanVideoTransformer3DModel", "HunyuanVideo"),
    ("hunyuan-video", "time_text_embed.timestep_embedder.linear_1", "HunyuanVideoTransformer3DModel", "HunyuanVideo"),
    ("hunyuan-video", "norm_out.linear", "HunyuanVideoTransformer3DModel", "HunyuanVideo"),
    ("hunyuan-image21", "context_embedder_2.linear_1", "HunyuanImageTransformer2DModel", "HunyuanVideo"),
    ("hunyuan-image21", "time_guidance_embed.timestep_embedder.linear_2", "HunyuanImageTransformer2DModel",
     "HunyuanVideo"),
    ("wan22-animate", "motion_encoder.motion_network.0", "WanAnimateTransformer3DModel", "AnimateWanModel"),
])
def test_a_lora_on_an_embedder_the_node_does_not_map_says_so(models, tmp_path, case, module, diffusers_class,
                                                              model_name):
    """The same for HunyuanVideo's and HunyuanImage 2.1's embedders and Wan Animate's motion encoder (modules of the
    Diffusers transformer the node has no map for), said as "the weights are for another model" before."""
    lora = {f"transformer.{module}.lora_A.weight": torch.zeros(RANK, 8),
            f"transformer.{module}.lora_B.weight": torch.zeros(8, RANK)}
    with pytest.raises(ValueError, match=rf"has a LoRA on {module.replace('.', '[.]')} .*, a module of Diffusers' "
                                         rf"{diffusers_class} that the node does not patch on ComfyUI's {model_name} "
                                         r"\(it maps .*\): train without it") as err:
        patch_model(models(case), dit_accel.Dense(), weights=_folder(tmp_path / "ft", dit_accel.Dense(), lora=lora))
    assert "another model" not in str(err.value)


def test_a_lora_on_a_block_the_model_lacks_is_still_another_models(comfy, wan, tmp_path):
    """What stays "another model": a block past the model's (a 40-block Wan's LoRA on the 2-block one)."""
    lora = _lora(torch.Generator().manual_seed(2))
    lora["transformer.blocks.5.attn1.to_q.lora_A.weight"] = torch.zeros(RANK, 64)
    lora["transformer.blocks.5.attn1.to_q.lora_B.weight"] = torch.zeros(64, RANK)
    with pytest.raises(ValueError, match=r"does not have \(transformer\.blocks\.5\.attn1\.to_q\.lora_A\.weight, \.\.\. "
                                         r"2 in all; .*\): the weights are for another model than this Wan$"):
        patch_model(wan, dit_accel.Dense(), weights=_folder(tmp_path / "ft", dit_accel.Dense(), lora=lora))


def _call(override, q, k, v, grid, layer=0):
    """One self-attention call of ``layer`` as ComfyUI makes it (``(B, S, H * D)``), inside a model call of ``grid``."""
    patch = override.patch
    patch.layer_from_stack = lambda frame, q=None: layer
    token = patch._call.set(CallState(grid, None, None, None))
    try:
        return override(lambda *a, **kw: pytest.fail("ran ComfyUI's attention"), q, k, v, 2)
    finally:
        patch._call.reset(token)
        del patch.layer_from_stack


def test_sla_projections_run_in_fp32_on_a_bf16_model_as_on_the_diffusers_path(comfy, wan, tmp_path):
    """A bf16 model's calls (torch backend): the node cast the folder's fp32 projection to bf16 in place, so the linear
    branch was projected in bf16 (dit_accel.apply keeps it fp32 and only moves it), and the folder's weights stayed
    rounded for every later call of the patch, an fp32 one too."""
    sla = _projections(3)
    patched = patch_model(wan, SLA, weights=_folder(tmp_path / "ft", SLA, sla=sla), backend="torch")
    override = override_of(patched)
    g = torch.Generator().manual_seed(4)
    grid, n = (2, 8, 16), 256  # 4 key blocks of 64: 2 critical, the rest through the linear branch
    q, k, v = (torch.randn(1, n, 64, generator=g) for _ in range(3))
    proj = torch.nn.Linear(32, 32)  # the Diffusers path's: the folder's fp32 tensors, on q's device
    with torch.no_grad():
        proj.weight.copy_(sla["blocks.0.attn1.weight"])
        proj.bias.copy_(sla["blocks.0.attn1.bias"])

    def reference(q, k, v):
        q4, k4, v4 = (t.view(1, n, 2, 32).transpose(1, 2) for t in (q, k, v))
        return sla_attention(q4, k4, v4, SLA, proj, backend="torch").transpose(1, 2).reshape(1, n, 64)

    half = [t.bfloat16() for t in (q, k, v)]
    out = _call(override, *half, grid)
    assert out.dtype == torch.bfloat16
    expected = reference(*half)
    assert (expected.float() - reference(*[t.float() for t in half]).float()).abs().max() > 0  # (bf16 shows)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    projection = override.patch.projections[0]
    assert projection.weight.dtype == torch.float32
    assert torch.equal(projection.weight, sla["blocks.0.attn1.weight"])
    assert torch.equal(projection.bias, sla["blocks.0.attn1.bias"])
    torch.testing.assert_close(_call(override, q, k, v, grid), reference(q, k, v), rtol=0, atol=0)


def test_an_fp32_run_after_a_bf16_one_keeps_the_trained_projection(comfy, wan, tmp_path):
    """The same patched MODEL sampled again in fp32 (a second workflow run) equals a fresh patch's output."""
    folder = _folder(Path(tmp_path) / "ft", SLA, sla=_projections(5))
    patched = patch_model(wan, SLA, weights=folder, backend="torch")
    g = torch.Generator().manual_seed(6)
    _call(override_of(patched), *(torch.randn(1, 256, 64, generator=g).bfloat16() for _ in range(3)), (2, 8, 16))
    case = CASES["wan21-t2v"]
    fresh = patch_model(wan, SLA, weights=folder, backend="torch")
    torch.testing.assert_close(sample(comfy, patched, case), sample(comfy, fresh, case), rtol=0, atol=0)


def test_a_bf16_model_sampled_through_the_node_keeps_the_projections_fp32(comfy, tmp_path):
    """End to end: ComfyUI's Wan built in bf16 (UNETLoader's weight_dtype), sampled by KSampler's code."""
    case = CASES["wan21-t2v"]
    config = getattr(comfy.supported_models, case.model)(dict(case.config))
    config.set_inference_dtype(torch.bfloat16, None)
    model = config.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * case.scale)
    cpu = torch.device("cpu")
    wan = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    sla = _projections(7)
    patched = patch_model(wan, SLA, weights=_folder(tmp_path / "ft", SLA, sla=sla), backend="torch")
    assert torch.isfinite(sample(comfy, patched, case)).all()
    patch = override_of(patched).patch
    assert "2 layers sparse" in patch.report.lines[-1]
    for i in (0, 1):
        assert patch.projections[i].weight.dtype == torch.float32
        assert torch.equal(patch.projections[i].weight, sla[f"blocks.{i}.attn1.weight"])


def test_a_per_head_config_whose_heads_need_another_grid_is_refused(comfy):
    """Before: patch_model(flux, PerHead((Tile(tile=(1, 4, 4)), ...))) passed (the node looked into a plan's phases
    but not into a PerHead's heads) and failed at the first sparse step, inside the sampler. Now refused when the
    node runs, as apply() refuses it, and the MODEL is unchanged."""
    model = build(comfy, CASES["flux"])
    config = dit_accel.PerHead((dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)),
                                dit_accel.Tile(tile=(2, 2), window=(1, 1))))
    before = sample(comfy, model, CASES["flux"])
    with pytest.raises(ValueError, match=r"Tile's tile=1,4,4 is for a 3-D token grid.* \(head 0 of the "
                                         r"PerHead config runs it\)$"):
        patch_model(model, config)
    assert torch.equal(sample(comfy, model, CASES["flux"]), before)
