"""``dit-accel finetune`` folders on the other ComfyUI families with a Diffusers transformer: Qwen-Image, HiDream,
LTX-Video, Cosmos Predict2, Cosmos 1, Chroma, Lumina 2, Mochi, HunyuanImage 2.1, SD3 / SD3.5 and AuraFlow. Per
family, the folder is written as ``dit-accel finetune`` writes it (a peft LoRA on the family's Diffusers transformer,
the SLA projections of the attention modules ``dit_accel.apply`` finds) from a Diffusers transformer of the same sizes
as the ComfyUI model (tests/comfyui/weights_families.py), and loaded through the fine-tuned weights node: ComfyUI's
patched weights must be its base weights plus alpha / rank * B @ A at the rows the oracle names, and nowhere else."""

import pytest
import torch
from safetensors.torch import load_file

import dit_accel
from dit_accel.checkpoints.finetuned import LORA_FILE, SLA_FILE
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.families import family_for
from dit_accel.comfyui.weights import layer_names
from dit_accel.pipelines.presets import preset_for
from dit_accel.pipelines.transformer_hook import attention_modules
from dit_accel.training.config import DEFAULT_TARGETS
from tests.comfyui.models import IMAGE_CASES, build, patched_weights
from tests.comfyui.test_weights import _folder
from tests.comfyui.weights_families import PAIRS, build_diffusers, save_random_finetune

RANK, ALPHA = 2, 4.0
FAMILIES = list(PAIRS)


def _swap(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first])


def _write(path, pair, targets, seed: int):
    """A ``dit-accel finetune`` folder of ``pair``'s Diffusers transformer: a random LoRA on exactly ``targets`` (a
    list of suffixes, or the full module names as one regex), a random SLA projection per attention module; returns
    the folder and the LoRA as written."""
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets)
    save_random_finetune(path, build_diffusers(pair), config, pair.head_dim, seed)
    return path, load_file(str(path / LORA_FILE))


def _exactly(names) -> str:
    return "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"


@pytest.fixture(scope="module")
def loaded(comfy, tmp_path_factory):
    """Per family: (base MODEL, folder, the LoRA written, the node's MODEL), the LoRA on every oracle module."""
    out = {}
    for i, case in enumerate(FAMILIES):
        pair = PAIRS[case]
        model = build(comfy, pair.comfy)
        folder, lora = _write(tmp_path_factory.mktemp(case), pair, _exactly(pair.oracle), seed=60 + i)
        (patched,) = NODE_CLASS_MAPPINGS["DitAccelFinetuned"]().patch(
            model, weights_path=str(folder), lora_strength=1.0, allow_other_grid=False, backend="torch")
        out[case] = (model, folder, lora, patched)
    return out


@pytest.mark.parametrize("case", FAMILIES)
def test_the_diffusers_modules_are_the_comfyui_weights_rows_by_construction(comfy, loaded, case):
    """Each oracle module of the Diffusers transformer has the shape of the ComfyUI rows it names."""
    pair = PAIRS[case]
    diffusers = dict(build_diffusers(pair).named_modules())
    comfy_weights = loaded[case][0].model.diffusion_model.state_dict()
    for module, (weight, row, _) in pair.oracle.items():
        want = diffusers[module].weight.shape
        got = comfy_weights[f"{weight}.weight"][row:row + want[0]].shape
        assert got == want, f"{module}: Diffusers {tuple(want)}, ComfyUI {weight} rows {row}: {tuple(got)}"


@pytest.mark.parametrize("case", FAMILIES)
def test_the_lora_patches_the_comfyui_rows_of_its_diffusers_modules(loaded, case):
    model, _, lora, patched = loaded[case]
    oracle = PAIRS[case].oracle
    assert {k.removeprefix("transformer.").partition(".lora_")[0] for k in lora} == set(oracle)
    base = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    expected = {k: v.clone() for k, v in base.items()}
    for module, (weight, row, swapped) in oracle.items():
        a, b = lora[f"transformer.{module}.lora_A.weight"], lora[f"transformer.{module}.lora_B.weight"]
        delta = (ALPHA / RANK * b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])  # (SD3's conv too)
        expected[f"{weight}.weight"][row:row + delta.shape[0]] += _swap(delta) if swapped else delta
    got = patched_weights(patched)
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
    changed = {k for k in base if not torch.equal(got[k], base[k])}
    assert changed == {f"{w}.weight" for w, _, _ in oracle.values()}
    assert all(torch.equal(v, base[k]) for k, v in patched_weights(model).items())  # the model given keeps its weights


@pytest.mark.parametrize("case", FAMILIES)
def test_each_sla_projection_lands_in_the_layer_its_diffusers_name_says(loaded, case):
    model, folder, _, patched = loaded[case]
    pair = PAIRS[case]
    inner = model.model.diffusion_model
    layers = family_for(inner).layers(inner)
    diffusers = build_diffusers(pair)
    names = [n for n, _ in attention_modules(diffusers, "", preset_for(diffusers))]
    assert names == pair.layers  # dit_accel.apply's names and order on the Diffusers transformer
    assert layer_names(inner, layers) == names
    patch = patched.model_options["transformer_options"]["optimized_attention_override"].patch
    assert sorted(patch.projections) == list(range(len(names)))
    sla = load_file(str(folder / SLA_FILE))
    for index, name in enumerate(names):
        assert torch.equal(patch.projections[index].weight, sla[f"{name}.weight"]), name
        assert torch.equal(patch.projections[index].bias, sla[f"{name}.bias"]), name


@pytest.mark.parametrize("case", FAMILIES)
def test_a_folder_of_the_default_target_modules_loads(comfy, loaded, tmp_path, case):
    """`dit-accel finetune`'s default --target-modules: every module they hit on the Diffusers transformer is
    mapped, onto a weight of its shape."""
    folder, lora = _write(tmp_path / "default", PAIRS[case], list(DEFAULT_TARGETS), seed=70)
    assert lora
    patched = patch_model(loaded[case][0], dit_accel.SLA(topk=0.5), weights=folder, backend="torch")
    assert patched.patches
    modules = {k.partition(".lora_")[0] for k in lora}
    assert len(patched.patches) <= len(modules)  # (several thirds of one fused weight are one patched weight)


def _bad_lora(module: str, out_f: int = 32, in_f: int = 32):
    return {f"transformer.{module}.lora_A.weight": torch.zeros(RANK, in_f),
            f"transformer.{module}.lora_B.weight": torch.zeros(out_f, RANK)}


@pytest.mark.parametrize("case, module", [
    ("qwen-image", "transformer_blocks.2.attn.to_q"), ("hidream", "double_stream_blocks.0.block.attn1.to_q_x"),
    ("ltx-video", "transformer_blocks.0.attn3.to_q"), ("cosmos-predict2", "transformer_blocks.0.attn3.to_q"),
    ("cosmos1", "transformer_blocks.5.attn1.to_q"), ("chroma", "single_transformer_blocks.3.attn.to_q"),
    ("lumina2", "context_refiner.0.norm1.linear"), ("mochi", "transformer_blocks.0.attn2.to_q"),
    ("hunyuan-image21", "context_embedder_3.linear_1"),
    ("sd3", "transformer_blocks.1.attn.to_add_out"), ("sd3", "transformer_blocks.1.attn2.to_q"),
    ("auraflow", "single_transformer_blocks.0.attn.add_q_proj"), ("auraflow", "joint_transformer_blocks.0.attn2.to_q"),
])
def test_a_module_no_comfyui_weight_holds_is_refused_naming_the_key_and_family(comfy, loaded, tmp_path, case, module):
    folder = _folder(tmp_path / "bad", dit_accel.Dense(), lora=_bad_lora(module))
    name = family_for(loaded[case][0].model.diffusion_model).name
    with pytest.raises(ValueError, match=rf"does not have \(transformer\.{module.replace('.', r'[.]')}\.lora_A\.weight"
                                         rf".* the weights are for another model than this {name}$") as err:
        patch_model(loaded[case][0], dit_accel.Dense(), weights=folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("module", list(PAIRS["mochi"].refused))
def test_mochis_feed_forward_input_is_refused_with_its_reason(comfy, loaded, tmp_path, module):
    folder = _folder(tmp_path / "ff", dit_accel.Dense(), lora=_bad_lora(module, out_f=16384, in_f=64))
    with pytest.raises(ValueError, match=rf"a LoRA on {module.replace('.', '[.]')} .*ComfyUI's Mochi \(AsymmDiTJoint\) "
                                         rf"cannot take exactly: .*{PAIRS['mochi'].refused[module]}"):
        patch_model(loaded["mochi"][0], dit_accel.Dense(), weights=folder)


@pytest.mark.parametrize("case, family", [("omnigen2", "OmniGen2"), ("chroma-radiance", "Chroma Radiance")])
def test_families_without_a_diffusers_transformer_are_refused_by_name(comfy, tmp_path, case, family):
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=_bad_lora("transformer_blocks.0.attn.to_q"))
    with pytest.raises(ValueError, match=rf"weights into ComfyUI's {family} model is not supported: it has no "
                                         "Diffusers transformer"):
        patch_model(build(comfy, IMAGE_CASES[case]), dit_accel.Dense(), weights=folder)


@pytest.mark.parametrize("case", ["qwen-image", "hidream", "ltx-video", "cosmos1", "lumina2", "mochi", "sd3",
                                  "auraflow"])
def test_sla_projections_of_another_head_size_are_refused(comfy, loaded, tmp_path, case):
    layer, d = PAIRS[case].layers[0], PAIRS[case].head_dim
    folder = _folder(tmp_path / "sla", dit_accel.SLA(topk=0.5), sla={f"{layer}.weight": torch.zeros(16, 16)})
    with pytest.raises(ValueError, match=rf"{layer.replace('.', '[.]')}\.weight has shape \(16, 16\), but layer 0 of "
                                         rf"this \w+ takes \({d}, {d}\) \(its head dim is {d}\)"):
        patch_model(loaded[case][0], dit_accel.SLA(topk=0.5), weights=folder, backend="torch")
