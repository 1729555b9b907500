"""Wan 2.2 A14B's two experts in ComfyUI: two MODELs, one weights folder whose second expert's tensors are keyed
``transformer_2.``. Each MODEL gets exactly its expert's part (``expert`` widget): its LoRA, merged as by hand, and
its SLA projections, in the layers of their names; a folder without the part the widget names is refused."""

import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from tests.comfyui.models import CASES, build, override_of, sample
from tests.comfyui.test_weights import ALPHA, RANK, _folder

CASE = CASES["wan21-t2v"]  # (ComfyUI runs each A14B expert as a WanModel of Wan 2.1's layout)
SEEDS = {"transformer": 0, "transformer_2": 1}  # the high- and the low-noise expert: other weights
PREFIX = {"transformer": "transformer.", "transformer_2": "transformer_2."}
# each expert's LoRA on other modules, so a mix-up cannot pass
TARGETS = {"transformer": {"blocks.0.attn1.to_q": "blocks.0.self_attn.q", "blocks.1.ffn.net.2": "blocks.1.ffn.2"},
           "transformer_2": {"blocks.0.attn1.to_k": "blocks.0.self_attn.k",
                             "blocks.1.attn1.to_v": "blocks.1.self_attn.v",
                             "blocks.1.attn2.to_out.0": "blocks.1.cross_attn.o"}}
METHOD = dit_accel.SLA(topk=0.5)


@pytest.fixture(scope="module")
def experts(comfy):
    return {e: build(comfy, CASE, seed=s) for e, s in SEEDS.items()}


def _lora(expert, inner, seed):
    g, modules, out = torch.Generator().manual_seed(seed), dict(inner.named_modules()), {}
    for diffusers_name, comfy_name in TARGETS[expert].items():
        out_f, in_f = modules[comfy_name].weight.shape
        out[f"{PREFIX[expert]}{diffusers_name}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.2
        out[f"{PREFIX[expert]}{diffusers_name}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.2
    return out


def _projections(expert, seed):
    g, prefix = torch.Generator().manual_seed(seed), "" if expert == "transformer" else "transformer_2."
    out = {}
    for i in range(2):
        out[f"{prefix}blocks.{i}.attn1.weight"] = torch.randn(32, 32, generator=g) * 0.3
        out[f"{prefix}blocks.{i}.attn1.bias"] = torch.randn(32, generator=g) * 0.3
    return out


@pytest.fixture(scope="module")
def parts(experts):
    """Each expert's LoRA and SLA projections, as a two-expert folder holds them."""
    return {e: (_lora(e, experts[e].model.diffusion_model, 30 + i), _projections(e, 40 + i))
            for i, e in enumerate(SEEDS)}


@pytest.fixture
def both(parts, tmp_path):
    lora = {k: v for e in parts for k, v in parts[e][0].items()}
    sla = {k: v for e in parts for k, v in parts[e][1].items()}
    return _folder(tmp_path / "a14b", METHOD, lora=lora, sla=sla)


def _node(model, folder, expert):
    node = NODE_CLASS_MAPPINGS["DitAccelFinetuned"]
    return node().patch(model, weights_path=str(folder), lora_strength=1.0, allow_other_grid=False, backend="torch",
                        expert=expert)[0]


@pytest.mark.parametrize("expert", list(SEEDS))
def test_each_expert_runs_its_lora_merged_by_hand(comfy, experts, parts, both, tmp_path, expert):
    """Through the node: the expert's own LoRA (as ComfyUI runs the merged weights) with its own projections."""
    out = sample(comfy, _node(experts[expert], both, expert), CASE)
    merged = build(comfy, CASE, seed=SEEDS[expert])  # the same random weights, then W += alpha / rank * B @ A
    modules = dict(merged.model.diffusion_model.named_modules())
    lora, sla = parts[expert]
    with torch.no_grad():
        for diffusers_name, comfy_name in TARGETS[expert].items():
            a, b = (lora[f"{PREFIX[expert]}{diffusers_name}.lora_{s}.weight"] for s in "AB")
            modules[comfy_name].weight += ALPHA / RANK * b @ a
    projections_only = _folder(tmp_path / "sla", METHOD, sla=sla)
    reference = sample(comfy, patch_model(merged, METHOD, weights=projections_only, backend="torch", expert=expert),
                       CASE)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    without_lora = sample(comfy, patch_model(experts[expert], METHOD, weights=projections_only, backend="torch",
                                             expert=expert), CASE)
    assert (out - without_lora).abs().max() > 1e-3  # the LoRA takes part


@pytest.mark.parametrize("expert", list(SEEDS))
def test_each_expert_gets_exactly_its_weights(experts, parts, both, expert):
    patched = _node(experts[expert], both, expert)
    patch = override_of(patched).patch
    _, sla = parts[expert]
    prefix = "" if expert == "transformer" else "transformer_2."
    assert sorted(patch.projections) == [0, 1]
    for i in range(2):
        assert torch.equal(patch.projections[i].weight, sla[f"{prefix}blocks.{i}.attn1.weight"])
        assert torch.equal(patch.projections[i].bias, sla[f"{prefix}blocks.{i}.attn1.bias"])
    assert set(patched.patches) == {f"diffusion_model.{m}.weight" for m in TARGETS[expert].values()}
    assert experts[expert].patches == {}  # the MODEL given keeps its weights


def test_the_high_noise_node_says_the_folder_holds_the_other_expert_too(experts, both, caplog):
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        patch_model(experts["transformer"], METHOD, weights=both)  # (expert's default: transformer)
    assert "also holds transformer_2 weights" in caplog.text and "expert=transformer_2" in caplog.text


def test_a_folder_without_the_widgets_expert_is_refused(experts, parts, tmp_path):
    lora, sla = parts["transformer"]
    one = _folder(tmp_path / "one", METHOD, lora=lora, sla=sla)  # one transformer's weights
    with pytest.raises(ValueError, match=r"has no transformer_2 part .*load it with expert=transformer"):
        _node(experts["transformer_2"], one, "transformer_2")
    lora2, sla2 = parts["transformer_2"]
    second = _folder(tmp_path / "second", METHOD, lora=lora2, sla=sla2)
    with pytest.raises(ValueError, match="holds only transformer_2 weights .* with expert=transformer_2"):
        _node(experts["transformer"], second, "transformer")
    _node(experts["transformer_2"], second, "transformer_2")  # (which is how it loads)
    with pytest.raises(ValueError, match=r"widget expert='transformer_3' is invalid: choose one of transformer, "
                                         r"transformer_2"):
        _node(experts["transformer"], one, "transformer_3")
    with pytest.raises(ValueError, match="expert='transformer_2' picks a part of a weights folder, but no weights"):
        patch_model(experts["transformer_2"], METHOD, expert="transformer_2")
    with pytest.raises(ValueError, match="expert='high' is invalid"):
        patch_model(experts["transformer"], METHOD, weights=one, expert="high")


def test_the_second_experts_unknown_modules_are_named(experts, parts, tmp_path):
    lora = dict(parts["transformer_2"][0])
    lora["transformer_2.blocks.0.norm9.lora_A.weight"] = torch.zeros(RANK, 64)
    folder = _folder(tmp_path / "bad", dit_accel.Dense(), lora=lora)
    with pytest.raises(ValueError, match=r"modules ComfyUI's WanModel does not have \(transformer_2\.blocks\.0\.norm9"):
        patch_model(experts["transformer_2"], dit_accel.Dense(), weights=folder, expert="transformer_2")
