"""Round 10 of the node's inputs and workflows. Settings that left the method unrun without a word (the run dense
where the user asked for sparse attention) are now said once in ComfyUI's log (logger ``dit_accel.comfyui``), at
the first model call that shows them, as ``dit_accel.apply`` warns of them; path widgets take ``~`` and say when
they are empty; a LoRA that ComfyUI's loader would not apply as trained, and an install into a
``custom_nodes/dit_accel`` the command did not write, are one-line errors that change nothing."""

import json
import logging

import pytest
import torch

import dit_accel
from dit_accel.comfyui import NODE_CLASS_MAPPINGS, patch_model
from dit_accel.comfyui.install import main as install_main
from dit_accel.plans.sparse_plan import Phase, SparsePlan

from tests.comfyui.models import COMMON_WIDGETS as COMMON, CASES, override_of, run_node, sample
from tests.comfyui.test_weights import RANK, _folder, _lora

TILE = dit_accel.Tile(tile=(1, 2, 2), window=(3, 1, 1))
SPARSE_LATENT = (1, 16, 3, 10, 10)  # grid (3, 5, 5): TILE visits a third of the key blocks (at (3, 4, 4) all)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "dit_accel.comfyui" and r.levelno == logging.WARNING]


def _kinds(patched):
    """``sparse`` / ``dense`` per model call, from the patch's report lines."""
    return ["sparse" if " layers sparse (" in line else "dense" for line in override_of(patched).patch.report.lines]


def test_a_published_preset_whose_dense_steps_cover_a_short_run_is_said(comfy, wan, caplog):
    """Radial's Wan 2.1 preset runs its first 12 steps dense (of 50): a 4-step run (a distilled Wan) was dense at
    every step, and only the info lines said "dense step". dit_accel.apply warns of this; the node did not."""
    presets = NODE_CLASS_MAPPINGS["DitAccelRadial"].INPUT_TYPES()["required"]["preset"][0]
    label = next(p for p in presets if p.startswith("Wan 2.1:"))
    patched = run_node("DitAccelRadial", wan, preset=label, decay=1.0, block_size="128", sink_frames="0",
                       spatial="band", rule="union", **COMMON)
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        sample(comfy, patched, CASES["wan21-t2v"], steps=4)
    assert _kinds(patched) == ["dense"] * 4
    said = [m for m in _warnings(caplog) if "cover all" in m]
    assert said == ["dit_accel: dense_steps=12 + dense_last_steps=0 cover all 4 sampling steps of this sampler: "
                    "every step runs dense. Lower them or raise the number of steps"]


def test_dense_first_and_last_steps_that_meet_are_said_once_and_a_sparse_step_is_not(comfy, wan, caplog):
    case = CASES["wan21-t2v"]
    patched = patch_model(wan, TILE, dense_steps=1, dense_last_steps=1, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patched, case, steps=2, latent=SPARSE_LATENT)
        sample(comfy, patched, case, steps=2, latent=SPARSE_LATENT)  # the same step count again: said once
    assert [m for m in _warnings(caplog) if "cover all 2 sampling steps" in m] == [_warnings(caplog)[0]]
    assert len(_warnings(caplog)) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patched, case, steps=3, latent=SPARSE_LATENT)  # step 1 of 3 is sparse
    assert _kinds(patched)[-3:] == ["dense", "sparse", "dense"] and _warnings(caplog) == []


def test_a_dense_above_sigma_below_every_steps_sigma_is_said(comfy, wan, caplog):
    """Wan samples with a shift of 8: at 4 steps its sigmas are 1, 0.96, 0.89 and 0.73, so dense_above_sigma=0.5
    ("the noisier half dense") ran every step dense, which only the info lines said."""
    patched = patch_model(wan, TILE, dense_above_sigma=0.5, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patched, CASES["wan21-t2v"], steps=4, latent=SPARSE_LATENT)
        sample(comfy, patched, CASES["wan21-t2v"], steps=4, latent=SPARSE_LATENT)
    assert _kinds(patched) == ["dense"] * 8
    assert _warnings(caplog) == ["dit_accel: dense_above_sigma=0.5 is below the sigma of every step of this sampler "
                                 "(the last starts at 0.7273): every step runs dense. Raise it (calls above it run "
                                 "dense), or set 0 (off)"]
    caplog.clear()
    patched = patch_model(wan, TILE, dense_above_sigma=0.9, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patched, CASES["wan21-t2v"], steps=4, latent=SPARSE_LATENT)
    assert _kinds(patched) == ["dense", "dense", "sparse", "sparse"] and _warnings(caplog) == []


def test_a_strategy_searched_for_other_steps_is_said(comfy, wan, tmp_path, caplog):
    """A FastVideo strategy listing steps 10-11 on a 2-step run: every call dense, without a word in the log."""
    strategy = tmp_path / "strategy.json"
    strategy.write_text(json.dumps({f"{s}_{layer}_{h}": [3, 1, 1] for s in (10, 11) for layer in range(2)
                                    for h in range(2)}))
    patched = run_node("DitAccelTileStrategy", wan, path=str(strategy), tile="1,2,2", **COMMON)
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patched, CASES["wan21-t2v"], steps=2)
    assert _kinds(patched) == ["dense"] * 2
    assert _warnings(caplog) == [f"dit_accel: {strategy} lists steps 10-11, but this run has 2 steps: every call runs "
                                 "dense. Pass the strategy searched for 2 steps, or run more steps"]


def _replaced(patched, override):
    """``patched`` as a node after the dit_accel node leaves it: its own attention override set."""
    clone = patched.clone()
    clone.model_options["transformer_options"]["optimized_attention_override"] = override
    return clone


def attention_sage_like(func, *args, **kwargs):
    """An override that runs every call itself (a SageAttention patch node that replaces the override)."""
    return func(*args, **kwargs)


def test_an_override_set_after_the_node_that_does_not_hand_calls_on_is_said(comfy, wan, caplog):
    """The model ran without dit_accel (ComfyUI's dense attention) and nothing, not even an info line, said so."""
    patched = patch_model(wan, TILE, backend="torch")
    with caplog.at_level(logging.INFO, logger="dit_accel.comfyui"):
        sample(comfy, _replaced(patched, attention_sage_like), CASES["wan21-t2v"], steps=2)
    assert not override_of(patched).patch.report.lines  # no layer call reached dit_accel
    said = _warnings(caplog)
    assert len(said) == 1 and said[0].startswith(
        "dit_accel: no self-attention call of WanModel reached dit_accel: the sampled MODEL's transformer_options"
        "['optimized_attention_override'] is another node's (attention_sage_like), set after the dit_accel node, "
        "which runs them without handing them on, so the model runs without dit_accel's method")
    assert "Put that node before the dit_accel node" in said[0]


def test_an_override_after_the_node_that_keeps_self_attention_is_said(comfy, wan, caplog):
    """Stacked as ComfyUI's own sparse-attention node stacks, but running every self-attention call itself (48
    video tokens): only cross-attention reached dit_accel, so its method never ran."""
    patched = patch_model(wan, TILE, backend="torch")
    ours = override_of(patched)

    def other_sparse_node(func, *args, **kwargs):
        return func(*args, **kwargs) if args[0].shape[1] == 48 else ours(func, *args, **kwargs)

    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, _replaced(patched, other_sparse_node), CASES["wan21-t2v"], steps=2)
    assert not override_of(patched).patch.report.lines
    assert len(_warnings(caplog)) == 1 and "is another node's (test_an_override_after_the_node_that_keeps_self_" \
        "attention_is_said.<locals>.other_sparse_node)" in _warnings(caplog)[0]


def test_an_override_set_after_the_node_that_hands_calls_on_is_not_said(comfy, wan, caplog):
    """Stacked as ComfyUI's own sparse-attention node stacks: dit_accel still runs every self-attention call."""
    patched = patch_model(wan, TILE, backend="torch")
    ours = override_of(patched)

    def stacked(func, *args, **kwargs):
        return ours(func, *args, **kwargs)

    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, _replaced(patched, stacked), CASES["wan21-t2v"], steps=2, latent=SPARSE_LATENT)
    assert _kinds(patched) == ["sparse"] * 2 and _warnings(caplog) == []


@pytest.mark.parametrize("method", [dit_accel.Dense(), TILE], ids=["dense", "tile"])
def test_the_node_alone_says_nothing(comfy, wan, caplog, method):
    patched = patch_model(wan, method, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patched, CASES["wan21-t2v"], steps=2, latent=SPARSE_LATENT)
    assert _warnings(caplog) == []
    assert _kinds(patched) == ["dense" if method == dit_accel.Dense() else "sparse"] * 2


def test_settings_for_a_larger_video_that_run_dense_at_this_size_are_said(comfy, wan, caplog):
    """Settings for a larger video (a tile of 6 x 8 x 8 tokens) on a preview-sized latent: the window covers the
    grid, so every call runs dense; only the info lines said it, where dit_accel.apply warns."""
    method = dit_accel.Tile(tile=(6, 8, 8), window=(1, 1, 1))
    patched = patch_model(wan, method, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patched, CASES["wan21-t2v"], steps=2)
        sample(comfy, patched, CASES["wan21-t2v"], steps=2)
    assert _kinds(patched) == ["dense"] * 4
    assert _warnings(caplog) == [f"dit_accel: {method!r} on WanModel layer 0 (and every layer it runs on): the window "
                                 "covers the whole grid (3, 4, 4); a smaller window (or tile) makes it sparse, so it "
                                 "runs dense attention (no speedup)"]


def test_a_plan_that_visits_every_key_block_is_said_once_per_grid(comfy, wan, caplog):
    """At grid (3, 4, 4) TILE masks tokens inside the one key block it visits: the result is the method's, but no
    work is saved (dit_accel.apply says so); at grid (3, 5, 5) it skips blocks and nothing is said."""
    patched = patch_model(wan, TILE, backend="torch")
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patched, CASES["wan21-t2v"], steps=2)
        sample(comfy, patched, CASES["wan21-t2v"], steps=2, latent=SPARSE_LATENT)
    assert _kinds(patched) == ["sparse"] * 4
    assert _warnings(caplog) == [f"dit_accel: {TILE!r} on WanModel layer 0 (and every layer it runs on) visits every "
                                 "key block of grid (3, 4, 4): it masks tokens inside the blocks but saves no work (no "
                                 "speedup); a larger grid or a smaller window or block makes it sparse"]


def test_a_plans_dense_phase_and_a_dense_node_are_not_said(comfy, wan, caplog):
    """A calibrated plan's dense steps and the Dense node are dense on purpose."""
    plan = SparsePlan([Phase(0, 1), Phase(1, None, {1: TILE})], num_layers=2)
    with caplog.at_level(logging.WARNING, logger="dit_accel.comfyui"):
        sample(comfy, patch_model(wan, plan, backend="torch"), CASES["wan21-t2v"], steps=2, latent=SPARSE_LATENT)
        sample(comfy, patch_model(wan, dit_accel.Dense()), CASES["wan21-t2v"], steps=2)
    assert _warnings(caplog) == []


def test_path_widgets_read_a_leading_tilde_as_the_home_folder(wan, tmp_path, monkeypatch):
    """No shell expands a widget's text: "~/plan.json" was refused with "cannot read it: no such file", for a file
    that was there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    plan = SparsePlan([Phase(0, 1), Phase(1, None, {1: TILE})], num_layers=2)
    plan.save(tmp_path / "plan.json")
    patched = run_node("DitAccelPlan", wan, plan_path=' "~/plan.json" ', allow_other_grid=False, backend="auto")
    loaded = override_of(patched).patch.schedule.method.sparse_plan
    assert loaded.source == str(tmp_path / "plan.json") and loaded.to_json() == plan.to_json()
    (tmp_path / "strategy.json").write_text(json.dumps({f"0_{layer}_{h}": [3, 1, 1] for layer in range(2)
                                                        for h in range(2)}))
    patched = run_node("DitAccelTileStrategy", wan, path="~/strategy.json", tile="1,2,2", **COMMON)
    assert override_of(patched).patch.schedule.method.path == str(tmp_path / "strategy.json")
    with pytest.raises(ValueError, match=r"widget weights_path='.*/nothing' is not a folder"):  # the expanded path is named
        run_node("DitAccelFinetuned", wan, weights_path="~/nothing", lora_strength=1.0, allow_other_grid=False,
                 backend="auto", expert="transformer")


def test_install_refuses_a_dit_accel_folder_it_did_not_write(tmp_path, capsys):
    """A clone of the repository in custom_nodes/dit_accel (no __init__.py at its top): the command wrote its shim
    into it, where docs/comfyui.md says it refuses a custom_nodes/dit_accel it did not write."""
    root = tmp_path / "ComfyUI"
    (root / "comfy").mkdir(parents=True)
    clone = root / "custom_nodes" / "dit_accel"
    (clone / "dit_accel").mkdir(parents=True)
    (clone / "pyproject.toml").write_text("[project]\n")
    assert install_main(["install", str(root)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {clone} exists and holds files this command did not write (dit_accel, pyproject.toml): "
                   "move that folder away first (it is another node pack, or a clone, named dit_accel)\n")
    assert sorted(p.name for p in clone.iterdir()) == ["dit_accel", "pyproject.toml"]  # left as it was
    clone.rename(tmp_path / "moved away")
    clone.write_text("")  # a file of that name
    assert install_main(["install", str(root)]) == 2
    assert f"error: {clone} exists and is not a folder: move it away first" in capsys.readouterr().err
    clone.unlink()
    (clone / "__pycache__").mkdir(parents=True)  # what ComfyUI leaves of an earlier shim
    assert install_main(["install", str(root)]) == 0 and (clone / "__init__.py").read_text().startswith("# Written")


def _lora_with(change):
    lora = _lora(torch.Generator().manual_seed(1))
    change(lora)
    return lora


Q0 = "transformer.blocks.0.attn1.to_q"


@pytest.mark.parametrize("change, message", [
    (lambda lora: lora.pop(f"{Q0}.lora_B.weight"),
     r"holds lora_A of blocks.0.attn1.to_q but no lora_B; expected both lora_A and lora_B of every module it adapts "
     r"\(the LoRA is incomplete\): train or convert it again"),
    (lambda lora: lora.pop(f"{Q0}.lora_A.weight"),
     r"holds lora_B of blocks.0.attn1.to_q but no lora_A; expected both lora_A and lora_B"),
    (lambda lora: lora.update({f"{Q0}.lora_A.weight": torch.zeros(RANK + 1, 64)}),
     r"the LoRA of blocks.0.attn1.to_q has rank \{'A': 3, 'B': 2\} \(lora_A rows / lora_B columns\); expected "
     r"one rank on both sides: train or convert it again"),
    (lambda lora: lora.update({f"{Q0}.lora_magnitude_vector": torch.ones(64)}),
     r"has transformer.blocks.0.attn1.to_q.lora_magnitude_vector, which ComfyUI's LoRA loader does not apply"),
    (lambda lora: lora.update({f"{Q0}.lora_B.bias": torch.ones(64)}),
     r"has transformer.blocks.0.attn1.to_q.lora_B.bias, which ComfyUI's LoRA loader does not apply"),
], ids=["no-lora_B", "no-lora_A", "two-ranks", "dora", "lora-bias"])
def test_a_lora_comfyui_would_not_apply_as_trained_is_refused(wan, tmp_path, change, message):
    """lora_A alone, a DoRA magnitude or a LoRA bias: dropped by ComfyUI's loader without a word (the module ran
    unadapted, or as a plain LoRA); lora_B alone: a raw KeyError from comfy.lora; two ranks: sampled without that
    module's LoRA (an error line in ComfyUI's log). Each is now one line when the node runs, and the MODEL given keeps
    its patches."""
    folder = _folder(tmp_path / "ft", dit_accel.Dense(), lora=_lora_with(change))
    before = dict(wan.patches)
    with pytest.raises(ValueError, match=message) as err:
        run_node("DitAccelFinetuned", wan, weights_path=str(folder), lora_strength=1.0, allow_other_grid=False,
                 backend="auto", expert="transformer")
    assert "\n" not in str(err.value) and str(folder) in str(err.value)
    assert wan.patches == before


@pytest.mark.parametrize("path", ["", "  ", '""'])
def test_an_empty_strategy_path_is_said_as_the_widget(wan, path):
    """The config's own error named its Python API: "TileStrategy.path='' is invalid: pass the FastVideo STA
    mask-strategy JSON file, e.g. Tile.from_strategy('mask_strategy_hunyuan.json')", as the plan and weights
    widgets do not."""
    with pytest.raises(ValueError, match=r"^dit_accel: widget path is empty: give the path of the FastVideo STA "
                                         r"mask-strategy JSON \(\"step_layer_head\" -> \[wt, wh, ww\]\)$"):
        run_node("DitAccelTileStrategy", wan, path=path, tile="1,2,2", **COMMON)
