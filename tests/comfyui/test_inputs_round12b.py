"""Round 12 (second wave) of the nodes: the data-dependent methods (VSA, SLA) at a partial density equal a reference
written here from their definitions (METHODS.md "VSA", "SLA": the key cubes or blocks chosen per call, batch and
head from the call's own q and k) on each video family's own token layout, cond and uncond in one batch; the plan,
fine-tuned and strategy nodes on a MODEL that already comes out of a dit_accel node say so before reading their
file (the file's error hid it); a value a method refuses is said as the node's widget (it said ``VSA.tile=(1, 1)``,
the Python API's field); a plan and a fine-tuned folder given to each other's node name the other node; an install
that cannot write leaves no empty custom_nodes/dit_accel behind, and one given a folder beside ComfyUI names it."""

import dataclasses
import math

import pytest
import torch

import dit_accel
import dit_accel.comfyui.install
from dit_accel.comfyui import NODE_CLASS_MAPPINGS
from dit_accel.comfyui.install import main as install_main

from tests.comfyui.models import (CASES, COMMON_WIDGETS, MOCHI_CASES, MORE_CASES, masked_reference, run_node, sample,
                                  with_override)


def _cubes(grid, tile) -> torch.Tensor:
    """Each video token's cube (t-major cube order, tokens in raster order), from the definition."""
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    per = [math.ceil(n / c) for n, c in zip(grid, tile)]
    return (((t // tile[0]) * per[1] + h // tile[1]) * per[2] + w // tile[2]).reshape(-1)


def _mean_by(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (..., N, D) over the tokens of each group (real tokens only: a partial cube's own)."""
    one_hot = torch.nn.functional.one_hot(group).to(x.dtype)  # (N, G)
    return (one_hot.transpose(0, 1) @ x) / one_hot.sum(0)[:, None]


def vsa_select(grid, tile, topk):
    """VSA's allowed video pairs of one call: per (batch, head, query cube) the ``topk`` key cubes of the largest
    coarse scores (cube means of q and k), every token of those cubes."""
    cube = _cubes(grid, tile)

    def select(q, k):
        scores = _mean_by(q, cube) @ _mean_by(k, cube).transpose(-1, -2)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen.scatter_(-1, scores.topk(min(topk, scores.shape[-1]), dim=-1).indices, True)
        return chosen[..., cube[:, None], cube[None, :]]

    return select


def sla_select(topk, block=64):
    """Training-free SLA (a zero projection: the linear branch adds nothing): per query block of ``block`` tokens in
    sequence order, the ``ceil(topk * blocks)`` key blocks of the largest pooled scores, K smoothed by its mean."""
    def select(q, k):
        n = q.shape[-2]
        blocks = torch.arange(n) // block
        k = k - k.mean(-2, keepdim=True)
        scores = _mean_by(q, blocks) @ _mean_by(k, blocks).transpose(-1, -2)
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen.scatter_(-1, scores.topk(max(1, math.ceil(topk * scores.shape[-1])), dim=-1).indices, True)
        return chosen[..., blocks[:, None], blocks[None, :]]

    return select


VIDEO_CASES = {**CASES, **MORE_CASES, **MOCHI_CASES}


def _case(family: str, cfg: float):
    """The family's case; at cfg 2 HunyuanVideo's prompt unpadded (ComfyUI's HunyuanVideo takes a text mask of
    batch 1 only: its own sampling fails on a batch of 2 with one)."""
    case = VIDEO_CASES[family]
    if family != "hunyuan-video" or cfg == 1:
        return case
    cond = case.cond
    return dataclasses.replace(case, cond=lambda: [[c, {k: v for k, v in extra.items() if k != "attention_mask"}]
                                                   for c, extra in cond()])


# cfg 2: ComfyUI batches the positive and negative prompts into one call of batch 2 (LTX-Video's own sampling fails
# on a batch of 2 with its text mask: cfg 1 there)
@pytest.mark.parametrize("family, cfg", [("wan21-t2v", 2.0), ("ltx-video", 1.0), ("cosmos-predict2", 2.0),
                                         ("mochi", 2.0), ("hunyuan-video", 1.0), ("hunyuan-video", 2.0),
                                         ("wan21-vace", 2.0)])
def test_vsa_at_a_partial_density_equals_the_reference_on_each_video_familys_layout(comfy, models, family, cfg):
    case, model = _case(family, cfg), models(family)
    grid = case.grid()
    tile, topk = (2, 2, 2), 3  # grid (3, 4, 4): 8 cubes, the second frame slab partial; 3 of 8 key cubes kept
    batches = []
    reference = sample(comfy, with_override(model, masked_reference(vsa_select(grid, tile, topk), case.text,
                                                                    n=math.prod(grid), batches=batches)), case,
                       cfg=cfg)
    assert batches and all(b == (2 if cfg > 1 else 1) for b in batches)
    out = sample(comfy, run_node("DitAccelVSA", model, topk=str(topk), sparsity="", tile="2,2,2", dense_steps=0,
                                 dense_last_steps=0, dense_above_sigma=0.0, dense_layers="", backend="torch"),
                 case, cfg=cfg)
    assert (out - sample(comfy, model, case, cfg=cfg)).abs().max() > 1e-4  # the selection changes the result ...
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)  # ... as the reference's does


@pytest.mark.parametrize("sparsity, kept", [("0.6", 4), ("0.99", 1)])
def test_vsas_sparsity_widget_keeps_the_ceiling_of_its_share_of_cubes(comfy, wan, sparsity, kept):
    """ceil((1 - sparsity) * cubes) key cubes, at least one: 4 and 1 of 8."""
    case, calls = CASES["wan21-t2v"], []
    reference = sample(comfy, with_override(wan, masked_reference(vsa_select(case.grid(), (2, 2, 2), kept), "none",
                                                                  calls, n=48)), case, cfg=2.0)
    out = sample(comfy, run_node("DitAccelVSA", wan, **_widgets("DitAccelVSA", sparsity=sparsity, tile="2,2,2",
                                                                backend="torch")), case, cfg=2.0)
    assert calls
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, cfg", [("wan21-t2v", 2.0), ("hunyuan-video", 1.0)])
def test_sla_at_a_partial_density_equals_the_reference(comfy, models, family, cfg):
    case, model = _case(family, cfg), models(family)
    latent = (1, case.latent[1], 2, 16, 16)  # grid (2, 8, 8): 2 blocks of 64 tokens, 1 kept per query block
    calls = []
    reference = sample(comfy, with_override(model, masked_reference(sla_select(0.5), case.text, calls, n=128)), case,
                       latent=latent, cfg=cfg)
    assert calls
    out = sample(comfy, dit_accel.comfyui.patch_model(model, dit_accel.SLA(topk=0.5), backend="torch"), case,
                 latent=latent, cfg=cfg)
    assert (out - sample(comfy, model, case, latent=latent, cfg=cfg)).abs().max() > 1e-4
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def _widgets(name: str, **changed) -> dict:
    """Every widget of the node ``name`` at its default, ``changed`` set."""
    spec = NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]
    return {**{k: v[1]["default"] for k, v in spec.items() if k != "model"}, **changed}


@pytest.mark.parametrize("name, widgets", [
    ("DitAccelPlan", dict(plan_path="/no/such/plan.json")),
    ("DitAccelFinetuned", dict(weights_path="/no/such/folder")),
    ("DitAccelTileStrategy", dict(path="/no/such/mask_strategy.json")),
])
def test_a_file_node_after_a_dit_accel_node_says_so_before_reading_its_file(wan, name, widgets):
    """Before: "/no/such/plan.json: cannot read it: no such file" (fixed, the node would still have refused)."""
    chained = run_node("DitAccelDense", wan, **COMMON_WIDGETS)
    patches = dict(chained.patches)
    with pytest.raises(ValueError, match=r"^dit_accel: this MODEL already comes out of a dit_accel node"):
        run_node(name, chained, **_widgets(name, **widgets))
    assert chained.patches == patches
    with pytest.raises(TypeError, match=r"needs a ComfyUI MODEL"):  # and no MODEL at all is said as such first
        run_node(name, object(), **_widgets(name, **widgets))


@pytest.mark.parametrize("name, widget, text, rest", [
    ("DitAccelVSA", "tile", "1,1", "is invalid: expected three positive ints"),
    ("DitAccelVSA", "sparsity", "1.5", "is invalid: expected a number in [0, 1)"),
    ("DitAccelTile", "tile", "0,8,8", "is invalid: every value must be >= 1"),
    ("DitAccelGNA", "stride", "9", "is invalid: stride must be <= kernel_size=7"),
    ("DitAccelRadial", "decay", 5.0, "is invalid: must be a number in (0, 1]"),
    ("DitAccelSLA", "topk", 2.0, "is invalid: must be a number in (0, 1]"),
])
def test_a_value_the_method_refuses_is_said_as_its_widget(wan, name, widget, text, rest):
    """Before: "VSA.tile=(1, 1) is invalid: ..." (the Python API's field and value, not the widget's text)."""
    with pytest.raises(ValueError) as err:
        run_node(name, wan, **_widgets(name, **{widget: text}))
    assert str(err.value).startswith(f"dit_accel: widget {widget}={text!r} {rest}"), str(err.value)


def test_a_tile_widget_of_other_dimensions_than_the_window_names_the_window_widget(wan):
    with pytest.raises(ValueError, match=r"^dit_accel: widget window='3,3,3' is invalid: every window must have as many "
                                         r"dimensions as tile \(6, 8\)"):
        run_node("DitAccelTile", wan, **_widgets("DitAccelTile", tile="6,8"))


@pytest.mark.parametrize("folder, rest", [("missing", "is not a folder; pass the output folder of `dit-accel finetune`"),
                                          ("empty", "has no dit_accel_method.json")])
def test_a_weights_folder_that_is_not_one_is_said_as_the_widget(wan, tmp_path, folder, rest):
    """Before: "weights='/tmp/.../empty' has no dit_accel_method.json" (patch_model's argument, not the widget)."""
    (tmp_path / "empty").mkdir()
    path = str(tmp_path / folder)
    with pytest.raises(ValueError) as err:
        run_node("DitAccelFinetuned", wan, **_widgets("DitAccelFinetuned", weights_path=path))
    assert str(err.value).startswith(f"dit_accel: widget weights_path={path!r} {rest}"), str(err.value)


def _comfyui(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    return root


@pytest.mark.parametrize("earlier", [False, True])
def test_an_install_that_cannot_write_says_so_and_leaves_the_folder_as_it_was(tmp_path, monkeypatch, capsys, earlier):
    """A read-only custom_nodes folder (simulated: the tests may run as root): before, "error: [Errno 13] Permission
    denied: ..." and an empty custom_nodes/dit_accel left behind, which ComfyUI then reported as a node pack that
    failed to import; an earlier install's shim stays as it was."""
    root = _comfyui(tmp_path)
    if earlier:
        assert install_main(["install", str(root)]) == 0
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))

    def refused(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(dit_accel.comfyui.install, "atomic_write_text", refused)
    assert install_main(["install", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {root / 'custom_nodes' / 'dit_accel' / '__init__.py'} (Permission "
                          f"denied): run the command as a user who may write into {root / 'custom_nodes'}"), err
    assert err.count("\n") == 1
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


@pytest.mark.parametrize("given", ["custom_nodes", "portable"])
def test_install_into_a_folder_beside_comfyui_names_the_comfyui_folder(tmp_path, capsys, given):
    """ComfyUI's custom_nodes folder itself, or the Windows portable's folder (ComfyUI inside it), was only "not a
    ComfyUI folder"; the ComfyUI folder near it is named now."""
    root = _comfyui(tmp_path / "ComfyUI_windows_portable")
    path = root / "custom_nodes" if given == "custom_nodes" else root.parent
    assert install_main(["install", str(path)]) == 2
    assert capsys.readouterr().err == (f"error: {path} is not a ComfyUI folder (it has no comfy/ and custom_nodes/ "
                                       f"folders): give the folder of ComfyUI's main.py ({root}, it seems)\n")
    assert not (root / "custom_nodes" / "dit_accel").exists()


def test_every_widget_has_a_tooltip_and_a_float_default_on_its_step():
    """What ComfyUI's frontend reads besides tests/comfyui/test_install.py's checks (found right, kept): a tooltip on
    every widget, a description per node, each FLOAT default a whole number of its steps (the frontend rounds a
    value to its step's decimals)."""
    for name, node in NODE_CLASS_MAPPINGS.items():
        assert node.DESCRIPTION and node.FUNCTION == "patch", name
        for widget, spec in node.INPUT_TYPES()["required"].items():
            if widget == "model":
                continue
            assert spec[1].get("tooltip"), (name, widget)
            if spec[0] == "FLOAT":
                steps = spec[1]["default"] / spec[1]["step"]
                assert abs(steps - round(steps)) < 1e-6, (name, widget)


def test_a_strategy_nodes_refusals_name_its_widget_or_its_file(wan, tmp_path):
    """Before: "'/.../strategy.json': TileStrategy.tile=(0, 2, 2) is invalid" for the tile widget, and the file's
    windows as "TileStrategy.window=((3, 1), (3, 1))"."""
    good, flat = tmp_path / "strategy.json", tmp_path / "flat.json"
    good.write_text('{"0_0_0": [3, 1, 1], "0_0_1": [3, 1, 1]}')
    flat.write_text('{"0_0_0": [3, 1], "0_0_1": [3, 1]}')
    with pytest.raises(ValueError, match=r"^dit_accel: widget tile='0,2,2' is invalid: every value must be >= 1$"):
        run_node("DitAccelTileStrategy", wan, path=str(good), tile="0,2,2", **COMMON_WIDGETS)
    with pytest.raises(ValueError) as err:
        run_node("DitAccelTileStrategy", wan, path=str(flat), tile="1,2,2", **COMMON_WIDGETS)
    assert str(err.value).startswith(f"dit_accel: {str(flat)!r}: window=((3, 1), (3, 1)) is invalid: every window "
                                     "must have as many dimensions as tile (1, 2, 2)"), str(err.value)


def test_a_plan_and_a_finetune_folder_given_to_each_others_node_name_the_other_node(wan, tmp_path):
    """Before: "<folder>: cannot read it: it is a folder; expected a dit_accel sparse plan" for a fine-tuned folder in
    the plan node, and "weights='plan.json' is not a folder" for a plan in the fine-tuned node."""
    folder, plan = tmp_path / "ft", tmp_path / "plan.json"
    folder.mkdir()
    (folder / "dit_accel_method.json").write_text('{"method": {"method": "dense"}}')
    dit_accel.SparsePlan([dit_accel.Phase(0, None)], num_layers=2).save(plan)
    with pytest.raises(ValueError, match=r"^dit_accel: widget plan_path='.*ft' is a dit-accel finetune output folder, "
                                         r"not a plan: load it with the dit_accel fine-tuned weights node"):
        run_node("DitAccelPlan", wan, **_widgets("DitAccelPlan", plan_path=str(folder)))
    with pytest.raises(ValueError, match=r"^dit_accel: widget weights_path='.*plan[.]json' is not a folder; .* A plan "
                                         r"JSON goes into the dit_accel plan node \(plan_path\)[.]$"):
        run_node("DitAccelFinetuned", wan, **_widgets("DitAccelFinetuned", weights_path=str(plan)))
