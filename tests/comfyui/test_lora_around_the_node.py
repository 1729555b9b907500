"""ComfyUI's LoraLoaderModelOnly before and after a dit_accel node, on ComfyUI's own WanModel.

What that node does to the MODEL (``nodes.LoraLoader.load_lora`` -> ``comfy.sd.load_lora_for_models``): the LoRA
state dict through ``comfy.lora_convert.convert_lora``, its keys mapped by ``comfy.lora.model_lora_keys_unet``,
``comfy.lora.load_lora``, then ``model.clone()`` and ``add_patches(patches, strength)``. ``nodes`` and ``comfy.sd``
import torchvision, which does not load here; ``comfy.lora`` and ``comfy.lora_convert`` do, so
:func:`lora_loader_model_only` runs exactly those steps of ComfyUI's own code.
"""

import importlib

import torch

from dit_accel.comfyui.patch import WRAPPER_KEY
from dit_accel.patterns.tile import tile_mask
from tests.comfyui.models import (COMMON_WIDGETS, CASES, masked_reference, override_of, patched_weights, run_node,
                                  sample, with_override)

CASE = CASES["wan21-t2v"]  # dim 64, 2 layers, grid 3 x 4 x 4 (48 tokens)
TILE = dict(preset="custom", tile="1,2,2", window="3,1,1", block_size="", fit=False,
            **dict(COMMON_WIDGETS, backend="torch"))
RANK, ALPHA, STRENGTH = 2, 3.0, 0.7
NUM_CALLS = 2 * 2  # video self-attention calls per sampling run: 2 layers x 2 steps (cfg 1: one call per step)


def _lora() -> dict:
    """A LoRA for the tiny WanModel in the key formats ComfyUI reads for it: its own (``diffusion_model.<module>``
    with ``lora_up`` / ``lora_down`` / ``alpha``, as ComfyUI's LoRA nodes save) on every self-attention projection,
    and kohya's (``lora_unet_<module with _>``) on the cross-attention query and the first feed-forward layer."""
    g = torch.Generator().manual_seed(31)
    out = {}

    def add(key, rows, cols):
        out[f"{key}.lora_up.weight"] = torch.randn(rows, RANK, generator=g) * 0.3
        out[f"{key}.lora_down.weight"] = torch.randn(RANK, cols, generator=g) * 0.3
        out[f"{key}.alpha"] = torch.tensor(ALPHA)

    for i in range(2):
        for name in ("q", "k", "v", "o"):
            add(f"diffusion_model.blocks.{i}.self_attn.{name}", 64, 64)
        add(f"lora_unet_blocks_{i}_cross_attn_q", 64, 64)
        add(f"lora_unet_blocks_{i}_ffn_0", 64, 64)
    return out


LORA = _lora()
TARGETS = {f"blocks.{i}.{m}.weight" for i in range(2)
           for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "ffn.0")}


def lora_loader_model_only(model, lora: dict, strength: float):
    """``LoraLoaderModelOnly().load_lora_model_only(model, <file holding lora>, strength)[0]``, step by step with
    ComfyUI's own functions (``comfy.sd.load_lora_for_models`` with ``clip=None``)."""
    comfy_lora = importlib.import_module("comfy.lora")  # (the snapshot the `comfy` fixture put on sys.path)
    lora_convert = importlib.import_module("comfy.lora_convert")
    if strength == 0:
        return model
    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    loaded = comfy_lora.load_lora(lora_convert.convert_lora(lora), key_map)
    clone = model.clone()
    applied = clone.add_patches(loaded, strength)
    assert set(applied) == set(loaded)  # (ComfyUI logs "NOT LOADED" for the others)
    assert {k[len("diffusion_model."):] for k in loaded} == TARGETS  # every LoRA key matched a weight
    return clone


def _merged_by_hand(weights: dict) -> dict:
    """``weights`` (the model's own) with ``W += STRENGTH * ALPHA / RANK * up @ down`` on each target, computed
    here."""
    weights = {k: v.clone() for k, v in weights.items()}
    for target in TARGETS:
        module = target[:-len(".weight")]
        key = (f"diffusion_model.{module}" if "self_attn" in module
               else "lora_unet_" + module.replace(".", "_"))
        up, down = LORA[f"{key}.lora_up.weight"], LORA[f"{key}.lora_down.weight"]
        weights[target] += STRENGTH * ALPHA / RANK * (up @ down)
    return weights


def _assert_weights(patcher, expected: dict) -> None:
    got = patched_weights(patcher)
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6, msg=k)


def _unpatched_out(comfy, model):
    """The model's own output and its weights, read after sampling it (ComfyUI leaves the weights of the MODEL it
    sampled last patched in place until it loads another): what every test checks again at its end."""
    return sample(comfy, model, CASE), {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


def _assert_unchanged(comfy, model, before) -> None:
    out, weights = before
    assert not model.patches and "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    assert torch.equal(sample(comfy, model, CASE), out)
    now = model.model.diffusion_model.state_dict()
    assert all(torch.equal(now[k], weights[k]) for k in weights)


def _lora_then_tile(comfy, wan, sparse_calls):
    """Order 1 (LoRA, then the dit_accel Tile node): its output, with the sparse calls it made checked."""
    del sparse_calls[:]
    patched = run_node("DitAccelTile", lora_loader_model_only(wan, LORA, STRENGTH), **TILE)
    out = sample(comfy, patched, CASE)
    assert sparse_calls == [48] * NUM_CALLS  # every video self-attention call ran the plan
    return patched, out


def test_lora_then_tile_is_the_masked_reference_on_the_lora_model(comfy, wan, sparse_calls):
    before = _unpatched_out(comfy, wan)
    patched, out = _lora_then_tile(comfy, wan, sparse_calls)
    _assert_weights(patched, _merged_by_hand(before[1]))  # the node's MODEL samples with the LoRA merged ...

    lora_model = lora_loader_model_only(wan, LORA, STRENGTH)
    calls = []
    del sparse_calls[:]
    reference = sample(comfy, with_override(lora_model, masked_reference(tile_mask(CASE.grid(), (1, 2, 2), (3, 1, 1)),
                                                                         CASE.text, calls)), CASE)
    assert calls == [48] * NUM_CALLS and not sparse_calls  # the reference saw the same calls, ran no plan
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # ... and every self-attention call sparse

    without_lora = sample(comfy, run_node("DitAccelTile", wan, **TILE), CASE)
    assert (out - without_lora).abs().max() > 1e-3  # the LoRA changes the result
    assert (out - sample(comfy, lora_model, CASE)).abs().max() > 1e-3  # and so does the pattern
    _assert_unchanged(comfy, wan, before)


def test_tile_then_lora_is_lora_then_tile(comfy, wan, sparse_calls):
    """LoraLoaderModelOnly after the node: its clone of the node's MODEL keeps the node's wrapper and override."""
    before = _unpatched_out(comfy, wan)
    _, expected = _lora_then_tile(comfy, wan, sparse_calls)

    tiled = run_node("DitAccelTile", wan, **TILE)
    tiled_out = sample(comfy, tiled, CASE)
    del sparse_calls[:]
    patched = lora_loader_model_only(tiled, LORA, STRENGTH)
    assert override_of(patched) is override_of(tiled)  # one Patch: its plans, report and call state shared
    wrappers = [w for hooks in tiled.wrappers.values() for w in hooks.get(WRAPPER_KEY, ())]
    assert len(wrappers) == 1 and [w for hooks in patched.wrappers.values() for w in hooks.get(WRAPPER_KEY, ())] \
        == wrappers  # and the node's diffusion_model wrapper
    out = sample(comfy, patched, CASE)
    assert sparse_calls == [48] * NUM_CALLS
    assert torch.equal(out, expected)
    _assert_weights(patched, _merged_by_hand(before[1]))

    assert not tiled.patches and torch.equal(sample(comfy, tiled, CASE), tiled_out)  # the node's MODEL keeps no LoRA
    _assert_unchanged(comfy, wan, before)  # and the loader's MODEL neither LoRA nor override


def test_dense_through_the_node_with_a_lora_is_comfyuis_own_output(comfy, wan, sparse_calls):
    before = _unpatched_out(comfy, wan)
    own = sample(comfy, lora_loader_model_only(wan, LORA, STRENGTH), CASE)
    assert (own - before[0]).abs().max() > 1e-3  # the LoRA changes ComfyUI's own output
    lora_then_dense = run_node("DitAccelDense", lora_loader_model_only(wan, LORA, STRENGTH), **COMMON_WIDGETS)
    dense_then_lora = lora_loader_model_only(run_node("DitAccelDense", wan, **COMMON_WIDGETS), LORA, STRENGTH)
    assert torch.equal(sample(comfy, lora_then_dense, CASE), own)
    assert torch.equal(sample(comfy, dense_then_lora, CASE), own)
    assert not sparse_calls
    _assert_unchanged(comfy, wan, before)
