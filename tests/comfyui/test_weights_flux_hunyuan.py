"""``dit-accel finetune`` folders of FLUX and HunyuanVideo on ComfyUI's ``Flux`` / ``HunyuanVideo``: ComfyUI fuses
Diffusers' ``to_q`` / ``to_k`` / ``to_v`` (``add_*_proj``) into ``img_attn.qkv`` / ``txt_attn.qkv`` and, in single
blocks, with ``proj_mlp`` into ``linear1``, so a LoRA on one of them must patch its rows of the fused weight and no
other. The folder is written as ``dit-accel finetune`` writes it (``save_trained_weights``: a peft LoRA on dit_accel's
tiny Diffusers transformer, the SLA projections of the attention modules ``dit_accel.apply`` finds), loaded through
the fine-tuned weights node into a ComfyUI model of the same block sizes (``AS_DIFFUSERS_CASES``)."""

import pytest
import torch
from safetensors.torch import load_file

import dit_accel
from dit_accel.checkpoints.finetuned import LORA_FILE, SLA_FILE
from dit_accel.training.config import DEFAULT_TARGETS
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.families import family_for
from dit_accel.comfyui.weights import layer_names
from dit_accel.models.tiny import TRANSFORMERS, build_tiny_transformer
from tests.comfyui.models import AS_DIFFUSERS_CASES, CASES, build, patched_weights, sample
from tests.comfyui.test_weights import _folder
from tests.comfyui.weights_families import save_random_finetune

RANK, ALPHA = 2, 4.0
TINY = {"flux": "flux", "hunyuan-video": "hunyuan"}  # ComfyUI case -> dit_accel's tiny Diffusers transformer
HIDDEN = 32  # both tiny transformers: 2 heads of 16


def _rows(h: int) -> dict:
    """Diffusers module -> (ComfyUI weight, its first row; the module's output features follow), written out here
    from the two models' code (Diffusers' FluxTransformer2DModel / HunyuanVideoTransformer3DModel blocks, ComfyUI's
    comfy.ldm.flux.layers DoubleStreamBlock / SingleStreamBlock): the oracle the node is checked against."""
    double = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", h), "attn.to_v": ("img_attn.qkv", 2 * h),
              "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", h),
              "attn.add_v_proj": ("txt_attn.qkv", 2 * h), "attn.to_out.0": ("img_attn.proj", 0),
              "attn.to_add_out": ("txt_attn.proj", 0), "ff.net.0.proj": ("img_mlp.0", 0), "ff.net.2": ("img_mlp.2", 0),
              "ff_context.net.0.proj": ("txt_mlp.0", 0), "ff_context.net.2": ("txt_mlp.2", 0)}
    single = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", h), "attn.to_v": ("linear1", 2 * h),
              "proj_mlp": ("linear1", 3 * h), "proj_out": ("linear2", 0)}
    return {**{f"transformer_blocks.0.{k}": (f"double_blocks.0.{w}", r) for k, (w, r) in double.items()},
            **{f"single_transformer_blocks.0.{k}": (f"single_blocks.0.{w}", r) for k, (w, r) in single.items()}}


def _refiner_rows(h: int) -> dict:
    """HunyuanVideo's text token refiner, as :func:`_rows` (Diffusers' HunyuanVideoIndividualTokenRefinerBlock,
    ComfyUI's TokenRefinerBlock: q, k, v the thirds of self_attn.qkv), both of its blocks (ComfyUI builds two, as the
    published model has); the default --target-modules hit it."""
    block = {"attn.to_q": ("self_attn.qkv", 0), "attn.to_k": ("self_attn.qkv", h),
             "attn.to_v": ("self_attn.qkv", 2 * h), "attn.to_out.0": ("self_attn.proj", 0),
             "ff.net.0.proj": ("mlp.0", 0), "ff.net.2": ("mlp.2", 0), "norm_out.linear": ("adaLN_modulation.1", 0)}
    return {f"context_embedder.token_refiner.refiner_blocks.{i}.{k}":
            (f"txt_in.individual_token_refiner.blocks.{i}.{w}", r) for i in range(2) for k, (w, r) in block.items()}


ROWS = {"flux": _rows(HIDDEN), "hunyuan-video": {**_rows(HIDDEN), **_refiner_rows(HIDDEN)}}


def _diffusers(case: str):
    """The tiny Diffusers transformer of ``case``; HunyuanVideo's with the two token refiner blocks ComfyUI's has
    (a LoRA of one would leave the second without it, which the node refuses)."""
    if case != "hunyuan-video":
        return build_tiny_transformer(TINY[case])
    import diffusers

    return diffusers.HunyuanVideoTransformer3DModel(**{**TRANSFORMERS["hunyuan"].config, "num_refiner_layers": 2})


def _write_folder(path, case: str, seed: int, targets=None):
    """A ``dit-accel finetune`` folder of the tiny Diffusers transformer of ``case``: LoRA (rank 2, alpha 4) on every
    module of ``ROWS[case]`` (or of the peft ``targets``), random, and a random SLA projection for each attention
    module; returns the folder, the LoRA as written and the projections' names."""
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets or sorted(ROWS[case]))
    names = save_random_finetune(path, _diffusers(case), config, 16, seed)
    return path, load_file(str(path / LORA_FILE)), names


@pytest.fixture(scope="module")
def loaded(comfy, tmp_path_factory):
    """Per family: (base MODEL, its folder, the LoRA written, the projections' names, the node's MODEL)."""
    out = {}
    for i, case in enumerate(TINY):
        model = build(comfy, AS_DIFFUSERS_CASES[case])
        folder, lora, names = _write_folder(tmp_path_factory.mktemp(case), case, seed=30 + i)
        (patched,) = NODE_CLASS_MAPPINGS["DitAccelFinetuned"]().patch(
            model, weights_path=str(folder), lora_strength=1.0, allow_other_grid=False, backend="torch")
        out[case] = (model, folder, lora, names, patched)
    return out


@pytest.mark.parametrize("case", list(TINY))
def test_a_lora_on_a_diffusers_module_patches_its_rows_of_comfyuis_fused_weight(loaded, case):
    model, _, lora, _, patched = loaded[case]
    base = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    expected = {k: v.clone() for k, v in base.items()}
    for module, (weight, row) in ROWS[case].items():
        a = lora[f"transformer.{module}.lora_A.weight"]
        b = lora[f"transformer.{module}.lora_B.weight"]
        expected[f"{weight}.weight"][row:row + b.shape[0]] += ALPHA / RANK * b @ a
    got = patched_weights(patched)
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    assert changed == {f"{w}.weight" for w, _ in ROWS[case].values()}  # the fused weights and no others
    assert all(torch.equal(v, base[k]) for k, v in patched_weights(model).items())  # the model given keeps its weights


@pytest.mark.parametrize("case", list(TINY))
def test_each_sla_projection_lands_in_the_layer_its_diffusers_name_says(loaded, case):
    model, folder, _, names, patched = loaded[case]
    inner = model.model.diffusion_model
    layers = family_for(inner).layers(inner)
    assert names == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]  # Diffusers' order
    assert layer_names(inner, layers) == names  # ComfyUI's double_blocks.0, then single_blocks.0
    assert layers == [inner.double_blocks[0], inner.single_blocks[0]]
    patch = patched.model_options["transformer_options"]["optimized_attention_override"].patch
    assert patch.schedule.method == dit_accel.SLA(topk=0.5) and sorted(patch.projections) == [0, 1]
    sla = load_file(str(folder / SLA_FILE))
    for index, name in enumerate(names):
        assert torch.equal(patch.projections[index].weight, sla[f"{name}.weight"])
        assert torch.equal(patch.projections[index].bias, sla[f"{name}.bias"])


def _bad_lora(**extra):
    good = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(RANK, HIDDEN),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(HIDDEN, RANK)}
    return {**good, **extra}


@pytest.mark.parametrize("case, module, message", [
    ("hunyuan-video", "context_embedder.proj_in",
     r"has a LoRA on context_embedder\.proj_in \(transformer\.context_embedder\.proj_in\.lora_A\.weight\), a "
     r"module of Diffusers' HunyuanVideoTransformer3DModel that the node does not patch on ComfyUI's HunyuanVideo \(it "
     r"maps the modules of transformer_blocks\.N, single_transformer_blocks\.N \(ComfyUI's FLUX map of its double and "
     r"single blocks\) and the attention and feed-forward modules of "
     r"context_embedder\.token_refiner\.refiner_blocks\.N\)"),
    ("hunyuan-video", "context_embedder.proj_out",
     r"modules ComfyUI's HunyuanVideo does not have \(transformer\.context_embedder\.proj_out\.lora_A\.weight, "
     r"\.\.\. 2 in all; dit_accel maps the modules of transformer_blocks\.N, single_transformer_blocks\.N "
     r"\(ComfyUI's FLUX map of its double and single blocks\) and the attention and feed-forward modules of "
     r"context_embedder\.token_refiner\.refiner_blocks\.N\): the weights are for another model than this "
     r"HunyuanVideo$"),
    ("flux", "single_transformer_blocks.3.attn.to_q",
     r"modules ComfyUI's Flux does not have \(transformer\.single_transformer_blocks\.3\.attn\.to_q\.lora_A"),
], ids=["hunyuan-text-embedder", "hunyuan-no-such-module", "flux-no-such-block"])
def test_modules_comfyui_does_not_map_are_refused_naming_the_first(comfy, loaded, tmp_path, case, module, message):
    lora = _bad_lora(**{f"transformer.{module}.lora_A.weight": torch.zeros(RANK, HIDDEN),
                        f"transformer.{module}.lora_B.weight": torch.zeros(HIDDEN, RANK)})
    folder = _folder(tmp_path / "bad", dit_accel.Dense(), lora=lora)
    with pytest.raises(ValueError, match=message) as err:
        patch_model(loaded[case][0], dit_accel.Dense(), weights=folder)
    assert "\n" not in str(err.value)


def test_weights_of_another_size_are_refused(comfy, loaded, tmp_path):
    other = build(comfy, CASES["flux"])  # hidden 64 in 2 heads of 32, feed-forward 2x: not the tiny Diffusers FLUX
    with pytest.raises(ValueError, match=r"attn\.(weight|bias) has shape \(16(, 16|,)\), but layer [01] of this Flux "
                                         r"takes \(32(, 32|,)\) \(its head dim is 32\)"):
        patch_model(other, dit_accel.SLA(topk=0.5), weights=loaded["flux"][1], backend="torch")
    folder = _folder(tmp_path / "lora", dit_accel.Dense(), lora=loaded["flux"][2])
    with pytest.raises(ValueError, match=r"transformer\.\S+\.lora_[AB]\.weight (has shape|patches rows) .*ComfyUI's "
                                         r"Flux (double|single)_blocks\.0\.\S+ .*another size of FLUX"):
        patch_model(other, dit_accel.Dense(), weights=folder)
    sla = {"single_transformer_blocks.4.attn.weight": torch.zeros(16, 16)}
    folder = _folder(tmp_path / "sla", dit_accel.SLA(topk=0.5), sla=sla)
    with pytest.raises(ValueError, match=r"'single_transformer_blocks\.4\.attn\.weight', which is no self-attention "
                                         r"layer of this HunyuanVideo \(2 layers: transformer_blocks\.0\.attn, "
                                         r"single_transformer_blocks\.0\.attn"):
        patch_model(loaded["hunyuan-video"][0], dit_accel.SLA(topk=0.5), weights=folder, backend="torch")


@pytest.mark.parametrize("case", list(TINY))
def test_the_node_samples_with_the_folderspatched_weights(comfy, loaded, case):
    model, _, _, _, patched = loaded[case]
    spec = AS_DIFFUSERS_CASES[case]
    trained = sample(comfy, patched, spec)
    untrained = sample(comfy, patch_model(model, dit_accel.SLA(topk=0.5), backend="torch"), spec)
    assert torch.isfinite(trained).all() and (trained - untrained).abs().max() > 1e-4


@pytest.mark.parametrize("case", list(TINY))
def test_a_folder_of_the_default_target_modules_loads(comfy, loaded, tmp_path, case):
    """`dit-accel finetune`'s default --target-modules (suffixes: HunyuanVideo's token refiner has them too)."""
    folder, lora, _ = _write_folder(tmp_path / "default", case, seed=40, targets=list(DEFAULT_TARGETS))
    modules = {k.partition(".lora_")[0] for k in lora}
    assert set(ROWS[case]) >= {m.removeprefix("transformer.") for m in modules}  # the rows checked above
    patched = patch_model(loaded[case][0], dit_accel.SLA(topk=0.5), weights=folder, backend="torch")
    assert len(patched.patches) == len({ROWS[case][m.removeprefix("transformer.")][0] for m in modules})
