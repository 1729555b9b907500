"""Method configs carried into files and back: weights folders' method JSON, plans, FastVideo strategies
(round 12 of the input audit, second wave)."""

import json

import pytest
import torch

import dit_accel
from dit_accel.checkpoints.finetuned import METHOD_FILE, method_from_dict, save_trained_weights
from dit_accel.models.tiny import build_tiny_pipeline
from dit_accel.plans.per_head import PerHead
from dit_accel.training import load_method
from tests.training import probe
from tests.utils import method_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)

GRID = (4, 8, 12)  # a small video token grid every mask below is built on


def _brute_tile_mask(grid, tile, window):
    """STA by its definition (METHODS.md): a query's window is ``window`` tiles per dimension centred on its tile
    (an even ``w`` covers ``w + 1``), pushed inward at the grid's tile borders; keys in those tiles are attended."""
    coords = torch.cartesian_prod(*[torch.arange(g) for g in grid]).reshape(-1, len(grid))
    mask = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for d, (g, t, w) in enumerate(zip(grid, tile, window)):
        n = -(-g // t)
        cover = min(w + (w % 2 == 0), n)
        tiles = coords[:, d] // t
        lo = (tiles - cover // 2).clamp(0, n - cover)
        mask &= (lo[:, None] <= tiles[None, :]) & (tiles[None, :] < lo[:, None] + cover)
    return mask


ROUND_TRIPS = [
    dit_accel.Tile(tile=(2, 4, 4), window=(1, 2, 3), block_size=32),
    dit_accel.Tile(tile=(2, 4, 4), window=(1, 2, 3), fit=True),
    dit_accel.Tile(tile=4, window=((1, 1, 3), (3, 3, 1))),
    dit_accel.GNA(kernel_size=(3, 5, 5), stride=(1, 2, 2), dilation=(1, 1, 2), is_causal=(True, False, False),
                  tile=(2, 4, 8), fit=True),
    dit_accel.GNA(kernel_size=((3, 3, 3), (2, 5, 5))),
    dit_accel.Radial(decay=0.95, block_size=64, sink_frames=(0, 2), spatial="window"),
    dit_accel.Radial(sink_frames=(), rule="reference"),
    dit_accel.SLA.reference(0.1, block_q=128),
    dit_accel.VSA(topk=3, tile=(4, 8, 8)),
    dit_accel.VSA(sparsity=0.5),
    PerHead((dit_accel.Tile(tile=(2, 4, 4), window=(1, 1, 3)), dit_accel.Dense(), dit_accel.SLA(topk=0.2))),
]


@pytest.mark.parametrize("method", ROUND_TRIPS, ids=lambda m: repr(m)[:40])
def test_every_method_reads_back_from_its_json_as_the_same_config(method):
    """A weights folder's method JSON (``to_dict`` through JSON, :func:`method_from_dict`) gives back an equal
    config, of equal hash: a field dropped or defaulted would reload the folder as another method, silently.
    Before: a PerHead (``save_pretrained`` under ``apply(pipe, PerHead(...))`` writes one) was refused on load,
    ``name='per_head' is not a registered method``."""
    back = method_from_dict(json.loads(json.dumps(method.to_dict())))
    assert back == method and hash(back) == hash(method) and type(back) is type(method)


def test_a_tile_read_back_attends_the_brute_force_pattern():
    """The pattern of a read-back Tile, against STA written out here (not only config equality)."""
    method = dit_accel.Tile(tile=(2, 4, 4), window=(1, 2, 3))
    back = method_from_dict(json.loads(json.dumps(method.to_dict())))
    assert torch.equal(method_mask(back, GRID), _brute_tile_mask(GRID, (2, 4, 4), (1, 2, 3)))


def test_a_per_head_folder_saved_while_applied_loads_back_and_runs_as_saved(tmp_path):
    """Before: ``transformer.save_pretrained(DIR)`` under ``apply(pipe, PerHead(...))`` wrote the SLA heads'
    projections and ``{"method": "per_head", ...}``, and ``load_method(DIR)`` then refused the folder it wrote:
    ``its method config is not valid (name='per_head' is not a registered method ...)``."""
    method = PerHead((dit_accel.SLA(topk=0.5), dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))))
    pipe = build_tiny_pipeline("tiny-wan")
    with dit_accel.apply(pipe, method) as handle:
        with torch.no_grad():
            for proj in handle.sla_projections().values():
                proj.weight.normal_(0, 0.1)
        saved = probe(pipe.transformer)
        pipe.transformer.save_pretrained(tmp_path / "s")
    assert load_method(tmp_path / "s") == method
    fresh = build_tiny_pipeline("tiny-wan")
    with dit_accel.apply(fresh, load_method(tmp_path / "s"), weights=tmp_path / "s"):
        torch.testing.assert_close(probe(fresh.transformer), saved, rtol=0, atol=1e-6)
    with dit_accel.apply(fresh, method):  # (the projections matter: without the folder the output differs)
        assert not torch.allclose(probe(fresh.transformer), saved, atol=1e-4)


@pytest.mark.parametrize("given", [dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1)),
                                   dit_accel.GNA(kernel_size=(2, 3, 3), is_causal=(False, False, False))],
                         ids=["tile", "gna"])
def test_a_folder_runs_under_its_setting_with_one_number_spelt_out_per_dimension(given, tmp_path):
    """Before: a folder trained with ``--window 1`` (saved as ``"window": 1``) refused ``Tile(..., window=(1, 1,
    1))``, the same window on the model, as "trained for ... differs in ['window']"; GNA's ``is_causal=False``
    against ``(False, False, False)`` alike. A setting that differs is still refused."""
    saved = given.replace(window=1) if isinstance(given, dit_accel.Tile) else given.replace(is_causal=False)
    pipe = build_tiny_pipeline("tiny-wan")
    save_trained_weights(tmp_path / "w", transformer=pipe.transformer, method=saved, lora_config=None)
    with dit_accel.apply(pipe, saved):
        expected = probe(pipe.transformer)
    with dit_accel.apply(pipe, given, weights=tmp_path / "w"):
        torch.testing.assert_close(probe(pipe.transformer), expected, rtol=0, atol=0)
    other = given.replace(window=(1, 1, 3)) if isinstance(given, dit_accel.Tile) else given.replace(
        is_causal=(True, False, False))
    field = "window" if isinstance(given, dit_accel.Tile) else "is_causal"
    with pytest.raises(ValueError, match=rf"differs in \['{field}'\]"):
        dit_accel.apply(pipe, other, weights=tmp_path / "w")
    assert json.loads((tmp_path / "w" / METHOD_FILE).read_text())["method"] == json.loads(json.dumps(saved.to_dict()))


def test_a_fitted_tile_exports_to_a_strategy_as_it_runs_or_is_refused():
    """Before: a plan of ``Tile(tile=(2, 4, 4), window=(1, 3, 3), fit=True)`` exported the windows as set,
    ``[1, 3, 3]``; on grid (4, 16, 24) that Tile runs tile (2, 16, 2) with window (1, 1, 5), another pattern, so
    the strategy (read back with its tile) ran what the plan never did, silently. Now the grid is needed, and a
    fitted tile that attends otherwise is refused, naming the Tile that runs there; one whose windows as set
    attend what runs exports them."""
    from dit_accel import Phase, SparsePlan
    from dit_accel.plans.per_head import _raster_mask

    grid = (4, 16, 24)
    fitted = dit_accel.Tile(tile=(2, 4, 4), window=(1, 3, 3), fit=True)
    runs = _raster_mask(fitted.plan(grid))
    assert torch.equal(runs, _brute_tile_mask(grid, (2, 16, 2), (1, 1, 5)))
    assert not torch.equal(runs, _brute_tile_mask(grid, (2, 4, 4), (1, 3, 3)))  # what the old export wrote
    plan = SparsePlan((Phase(0, 1, {0: fitted}),), num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=r"fit=True\), so its windows depend on the grid: pass grid=\(T, H, W\)"):
        plan.to_tile_strategy()
    with pytest.raises(ValueError, match=r"runs tile=\(2, 16, 2\), window=\(1, 1, 5\) on grid \(4, 16, 24\) "
                                         r".*build the plan with Tile\(tile=\(2, 16, 2\), window=\(1, 1, 5\)\)"):
        plan.to_tile_strategy(grid=grid)
    same = dit_accel.Tile(tile=(6, 8, 8), window=(1, 1, 3), fit=True)  # runs (4, 8, 8): one tile of frames either way
    assert torch.equal(_raster_mask(same.plan(grid)), _brute_tile_mask(grid, (6, 8, 8), (1, 1, 3)))
    out = SparsePlan((Phase(0, 1, {0: same}),), num_layers=1, num_heads=2).to_tile_strategy(grid=grid)
    assert out == {"0_0_0": [1, 1, 3], "0_0_1": [1, 1, 3]}


def test_a_vsa_folder_of_the_default_sparsity_runs_under_that_sparsity_given(tmp_path):
    """Before: a folder trained with ``VSA()`` (``--method vsa``: FastWan's sparsity 0.8, saved open as
    ``"sparsity": null``) refused ``VSA(sparsity=0.8)``, the setting that runs, as "differs in ['sparsity']"."""
    pipe = build_tiny_pipeline("tiny-wan")
    save_trained_weights(tmp_path / "w", transformer=pipe.transformer, method=dit_accel.VSA(), lora_config=None)
    with dit_accel.apply(pipe, dit_accel.VSA()):
        expected = probe(pipe.transformer)
    with dit_accel.apply(pipe, dit_accel.VSA(sparsity=0.8), weights=tmp_path / "w"):
        torch.testing.assert_close(probe(pipe.transformer), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"differs in \['sparsity'\]"):
        dit_accel.apply(pipe, dit_accel.VSA(sparsity=0.5), weights=tmp_path / "w")


def test_a_strategy_of_one_number_per_tile_imports_as_a_plan(tmp_path):
    """Before: ``SparsePlan.from_tile_strategy(path, tile=4)`` (``Tile.from_strategy`` takes the int) raised a raw
    ``TypeError: 'int' object is not iterable`` recording the tile in the plan's provenance."""
    from dit_accel import SparsePlan

    path = tmp_path / "strategy.json"
    path.write_text(json.dumps({f"{s}_0_{h}": [1, 1, 3] for s in range(2) for h in range(2)}))
    plan = SparsePlan.from_tile_strategy(path, tile=4)
    assert plan.provenance["tile"] == 4 and plan.to_tile_strategy() == json.loads(path.read_text())
    tile = plan.for_layer_step(0, 1)
    assert tile == dit_accel.Tile(tile=4, window=((1, 1, 3), (1, 1, 3)))
    back = SparsePlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert back.content_hash() == plan.content_hash() and back.for_layer_step(0, 1) == tile
    assert torch.equal(method_mask(tile, GRID)[0], _brute_tile_mask(GRID, (4, 4, 4), (1, 1, 3)))


def test_a_strategy_naming_one_head_twice_is_refused(tmp_path):
    """Before: ``"01_0_0"`` beside ``"1_0_0"`` (one step, layer and head spelt two ways) kept whichever came last,
    so the head ran the other window without a word."""
    path = tmp_path / "strategy.json"
    path.write_text('{"1_0_0": [1, 1, 3], "0_0_0": [1, 1, 1], "01_0_0": [3, 3, 3]}')
    with pytest.raises(ValueError, match=r"strategy\.json': keys '1_0_0' and '01_0_0' both name step 1, layer 0, "
                                         r"head 0; keep one of them"):
        dit_accel.Tile.from_strategy(path)
