"""ComfyUI, trust round 17 of the nodes' inputs.

- A relative path widget (plan_path, weights_path, a strategy's path) is read from ComfyUI's working folder, which
  is not ComfyUI's own folder where ComfyUI was started from another (the Windows portable starts in the folder
  above it): "no such file" alone named a path the user sees in the ComfyUI folder. The node now says where a
  relative path is read from, and to give the full path.
- A Tile whose explicit block_size is no box of its tile (tile 2,4,4 holds 32 tokens; block_size 64) is wrong at
  every grid, yet the node took it and the first sampling step failed deep in the sampler, naming the Python API
  (``Tile.block_size=64``). patch_model refuses it, and the node names the widget.
"""

import os

import pytest

import dit_accel
from dit_accel.comfyui import patch_model
from tests.comfyui.models import COMMON_WIDGETS, override_of, run_node


@pytest.mark.parametrize("node, widget, extra", [
    ("DitAccelPlan", "plan_path", dict(allow_other_grid=False, backend="auto")),
    ("DitAccelFinetuned", "weights_path", dict(lora_strength=1.0, allow_other_grid=False, backend="auto",
                                               expert="transformer")),
    ("DitAccelTileStrategy", "path", dict(tile="6,8,8", **COMMON_WIDGETS)),
])
def test_a_relative_path_that_is_not_there_names_the_folder_it_is_read_from(comfy, wan, tmp_path, monkeypatch, node,
                                                                              widget, extra):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        run_node(node, wan, **{widget: "models/dit_accel/wan.json", **extra})
    assert str(err.value) == (f"dit_accel: widget {widget}='models/dit_accel/wan.json' is not there: a relative path "
                              f"is read from ComfyUI's working folder {os.getcwd()}, not from ComfyUI's folder or its "
                              "models folder; give the full path")


def test_a_tile_block_that_is_no_box_of_the_tile_is_refused_by_the_node_not_the_sampler(comfy, wan):
    tile = dict(tile="2,4,4", window="1,1,1", fit=False, **COMMON_WIDGETS)
    with pytest.raises(ValueError) as err:
        run_node("DitAccelTile", wan, block_size="64", **tile)
    assert str(err.value) == ("dit_accel: widget block_size='64' is invalid for tile (2, 4, 4) (32 tokens): a block "
                              "must be a box of whole trailing tile dimensions, e.g. 32 (the whole tile) or 16 or 8; "
                              "or leave block_size unset for 64-token blocks")
    with pytest.raises(ValueError, match=r"^Tile\.block_size=64 is invalid for tile \(2, 4, 4\)"):
        patch_model(wan, dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 1), block_size=64))
    # a block that is a box of the tile (32: the whole tile) runs as before
    assert override_of(run_node("DitAccelTile", wan, block_size="32", **tile)).patch.schedule.method.block_size == 32


def test_the_docs_name_every_choice_of_the_backend_widget():
    """docs/comfyui.md listed auto, triton, torch and flex; the widget also offers fa4 and cudnn."""
    from pathlib import Path

    from dit_accel.comfyui.nodes import NODE_CLASS_MAPPINGS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "comfyui.md").read_text()
    line = next(b for b in doc.split("\n- ") if b.startswith("`backend`:"))
    choices = NODE_CLASS_MAPPINGS["DitAccelTile"].INPUT_TYPES()["required"]["backend"][0]
    assert [c for c in choices if f"`{c}`" not in line] == []


def test_a_grid_the_method_refuses_is_said_as_dit_accels_with_the_model_and_grid(comfy, wan):
    """GNA's default kernel of 7 on a 3-frame latent (a short Wan clip) failed in the sampler with the pattern's bare
    message, shown on ComfyUI's sampler node with nothing saying it was dit_accel's."""
    from tests.comfyui.models import CASES, sample

    patched = run_node("DitAccelGNA", wan, kernel_size="7", stride="1", dilation="1", is_causal=False, tile="",
                       fit=False, **COMMON_WIDGETS)
    with pytest.raises(ValueError) as err:
        sample(comfy, patched, CASES["wan21-t2v"], steps=1)
    text = str(err.value)
    assert text.startswith("dit_accel: GNA(kernel_size=7, stride=1, dilation=1, is_causal=False, tile=None, fit=False) "
                           "cannot run on the token grid (3, 4, 4) of this WanModel call (the latent's size in "
                           "patches): kernel_size*dilation = 7*1 = 7 exceeds the grid extent 3 along dimension 0"), text


def test_the_masked_reference_reads_a_bool_key_mask_as_comfyui_does():
    """The tests' reference added a bool key mask to the scores (True: +1) instead of masking the False keys, as
    ComfyUI's attention reads a bool mask: a family passing one would have been compared with a wrong reference."""
    import torch

    from tests.comfyui.models import masked_reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 6, 2 * 4, generator=g) for _ in range(3))
    keep = torch.tensor([[True, True, True, True, False, False]])  # [video 4, text 2 of which both padded]
    reference = masked_reference(torch.ones(4, 4, dtype=torch.bool), "last")
    out = reference(None, q, k, v, 2, keep)
    additive = torch.zeros(1, 6).masked_fill(~keep, float("-inf"))
    assert torch.allclose(out, reference(None, q, k, v, 2, additive), atol=1e-6)
