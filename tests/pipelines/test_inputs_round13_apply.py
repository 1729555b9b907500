"""apply() records and inputs (round 13): what ``summary()["ran_on_grid"]`` says after ``reset_stats`` and under
ring context parallelism, what a strategy file's record says once the file changed. Tiny models on the CPU, one
process; each test names what was wrong before its fix."""

import json
import types

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from tests.utils import resolved_here

GRID = T.TRANSFORMER_GRIDS["wan"]  # (4, 8, 8)


@pytest.fixture(scope="module")
def wan():
    model = T.build_tiny_transformer("wan")
    return model, T.tiny_transformer_inputs("wan", model)


def _run(model, inputs):
    with torch.no_grad():
        model(**inputs)


# ------------------------------------------------------------------ ran_on_grid since reset_stats
def test_ran_on_grid_describes_the_calls_since_reset_stats(wan):
    """Before: after a warm-up call on grid (2, 4, 4), ``reset_stats()`` and a run on (4, 8, 8), the summary counted
    the run's 2 calls alone but its ``ran_on_grid`` still listed '2x4x4' (with the kernel (2, 4, 4) clamped there),
    so a generate/eval record said the method ran on a grid the run never had. Now it lists the grids of the calls
    it counts, as the other keys do; a call like the last one (its context reused) is listed again too."""
    model, inputs = wan
    method = dit_accel.GNA(kernel_size=(3, 5, 5), fit=True)
    with pytest.warns(dit_accel.DitAccelWarning, match="clamped"), dit_accel.apply(model, method) as handle:
        _run(model, inputs)
        _run(model, T.tiny_transformer_inputs("wan", model, grid=(2, 4, 4)))
        assert sorted(handle.summary()["ran_on_grid"]) == ["2x4x4", "4x8x8"]
        handle.reset_stats()
        assert handle.summary()["ran_on_grid"] == {}
        _run(model, inputs)
        summary = handle.summary()
        assert summary["sparse_calls"] == 2
        assert summary["ran_on_grid"] == {"4x8x8": method.ran_dict()}
        handle.reset_stats()
        _run(model, inputs)  # (same key as the last call: its context is reused)
        assert handle.summary()["ran_on_grid"] == {"4x8x8": method.ran_dict()}
        with handle.bypassed():  # uncounted calls are not listed either
            _run(model, T.tiny_transformer_inputs("wan", model, grid=(2, 4, 4)))
        assert sorted(handle.summary()["ran_on_grid"]) == ["4x8x8"]


# ------------------------------------------------------------------ ring context parallelism
def _ring2():
    """A Diffusers ring-2 config as rank 0 of a launch resolves it (no process group: this process alone)."""
    from diffusers import ContextParallelConfig, ParallelConfig

    cp = ContextParallelConfig(ring_degree=2)
    cp._ulysses_local_rank = cp._ring_local_rank = 0
    cp._ulysses_mesh = cp._ring_mesh = types.SimpleNamespace(get_group=lambda: None)
    return ParallelConfig(context_parallel_config=cp)


def test_ran_on_grid_records_the_config_each_ring_rank_ran():
    """Under ring context parallelism a GNA without a tile runs ``for_shares``'s tile for one rank's slab, and a
    ``fit=True`` kernel (2, 5, 12) is clamped to (2, 5, 8) on grid (4, 8, 8). Before: ``ran_on_grid`` said tile=None
    and kernel (2, 5, 12) there (the record of the config as given), so re-running the record on one GPU picked
    another tile, and the kernel said did not run; ``handle.plan(method, grid)`` gave the plan of the config as
    given, not the one the calls ran. Now both say what the ranks ran. (One process: the plans are built and the
    grid recorded before the first attention call, which then needs the second rank.)"""
    model = T.build_tiny_transformer("wan")
    method = dit_accel.GNA(kernel_size=(2, 5, 12), fit=True)
    shared = method.for_shares(GRID, 2)
    assert shared.tile is not None
    with pytest.warns(dit_accel.DitAccelWarning), dit_accel.apply(model, method, backend="torch") as handle:
        for layer in handle._layers:
            layer.parallel = _ring2()
        with pytest.raises(ValueError, match="context parallelism"):
            _run(model, T.tiny_transformer_inputs("wan", model))
        ran = handle.summary()["ran_on_grid"]
        plan = handle.plan(shared, GRID)
        # handle.plan(method, grid) is the plan the calls ran (before: the config's own, another tile's layout)
        assert handle.plan(method, GRID) is plan
    assert ran == {"4x8x8": {**method.ran_dict(), "kernel_size": (2, 5, 8), "tile": shared.tile}}
    again = dit_accel.GNA(**{k: v for k, v in ran["4x8x8"].items() if k != "method"}).plan(GRID)
    assert again.perm.tile == plan.perm.tile and again.density == plan.density


# ------------------------------------------------------------------ a strategy file's record
def _write_strategy(path, window, layers: int = 2, heads: int = 2) -> None:
    path.write_text(json.dumps({f"0_{layer}_{head}": list(window) for layer in range(layers)
                                for head in range(heads)}))


def test_a_strategy_record_names_the_windows_it_read(tmp_path):
    """A TileStrategy reads its file when built and runs those windows. Before: its record (``ran_dict``: the
    generate sidecar's ``method``, ``summary()["config"]``) held the path and tile alone, so after the file was
    rewritten (a new search written to the same name) the record described windows that never ran, and two runs
    with different windows recorded the same config. Now the record carries a hash of the windows read."""
    path = tmp_path / "strategy.json"
    _write_strategy(path, (1, 1, 1))
    first = dit_accel.Tile.from_strategy(path, tile=(1, 4, 4))
    _write_strategy(path, (1, 3, 3))
    second = dit_accel.Tile.from_strategy(path, tile=(1, 4, 4))
    assert first.ran_dict() != second.ran_dict()
    assert first.ran_dict()["windows_sha256"] != second.ran_dict()["windows_sha256"]
    _write_strategy(path, (1, 1, 1))  # the same windows again, written anew: the same record
    assert dit_accel.Tile.from_strategy(path, tile=(1, 4, 4)).ran_dict() == first.ran_dict()
    assert {k: v for k, v in first.ran_dict().items() if k != "windows_sha256"} == first.to_dict()


# ------------------------------------------------------------------ per-head configs under context parallelism
TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))


def _per_head():
    from dit_accel.plans.per_head import PerHead

    return PerHead((TILE, dit_accel.Dense()))  # tiny Wan's 2 heads: one tiled, one dense




_PER_HEAD_SAID = (r"a per-head method config \(PerHead, or a calibrated plan's per-head entries\) runs every head of "
                  r"a layer in one process, so it does not run under context parallelism, neither ring nor Ulysses")


def test_enable_parallelism_refuses_a_per_head_config_up_front():
    """Before: ``enable_parallelism(ulysses_degree=2)`` after ``apply(model, PerHead(...))`` was taken; the run failed
    at its first attention call, and under ring the refusal advised running "with Ulysses off", which is refused as
    well. Now enable_parallelism itself refuses, saying that neither runs, and the model is left without the
    config."""
    from diffusers import ContextParallelConfig

    model = T.build_tiny_transformer("wan")
    handle = dit_accel.apply(model, _per_head(), backend="torch")
    resolved_here(model)
    for config in (ContextParallelConfig(ulysses_degree=2), ContextParallelConfig(ring_degree=2)):
        with pytest.raises(ValueError, match=_PER_HEAD_SAID):
            model.enable_parallelism(config=config)
        assert model._parallel_config is None and not any(layer.parallel for layer in handle._layers)
    with pytest.raises(ValueError, match=_PER_HEAD_SAID):  # (the plan's own refusal says the same)
        handle.plan(_per_head(), GRID).check_part((0, 128))
    handle.remove()


def test_apply_refuses_a_plan_with_per_head_entries_in_a_later_phase_under_context_parallelism():
    """Before: a calibrated plan whose per-head entries start at step 2 was applied to a model under Ring (or
    Ulysses) context parallelism, ran steps 0 and 1, and failed at step 2, part way through the generation. Now
    apply() refuses before the model changes."""
    from diffusers import ContextParallelConfig

    from dit_accel.plans.sparse_plan import Phase, SparsePlan

    plan = SparsePlan([Phase(0, 2, default=TILE), Phase(2, 4, layers={1: _per_head()}, default=TILE)])
    model = T.build_tiny_transformer("wan")
    resolved_here(model)
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
    before = {name: id(p) for name, p in model.attn_processors.items()}
    with pytest.raises(ValueError, match=_PER_HEAD_SAID):
        dit_accel.apply(model, plan)
    assert {name: id(p) for name, p in model.attn_processors.items()} == before


# ------------------------------------------------------------------ VSA gates of a two-expert pipeline folder
def _gated_folder(folder, seed: int):
    """The tiny Wan transformer saved to ``folder`` with random to_gate_compress gates (FastVideo's key layout)."""
    from safetensors.torch import load_file, save_file

    model = T.build_tiny_transformer("wan", seed=seed)
    model.save_pretrained(folder)
    path = next(folder.glob("*.safetensors"))
    state = load_file(str(path))
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(seed + 10)
    for block in (0, 1):
        state[f"blocks.{block}.to_gate_compress.weight"] = torch.randn(dim, dim, generator=g) * 0.3
    save_file(state, str(path), metadata={"format": "pt"})
    return model


def test_vsa_weights_of_a_pipeline_folder_give_each_expert_its_own_gates(tmp_path):
    """``apply(pipe, VSA(...), weights=<pipeline folder>)`` on Wan 2.2's two experts (``transformer/`` and
    ``transformer_2/``, each with its gates). Before: both experts read ``transformer/``'s gates, so the low-noise
    expert ran the high-noise expert's gates, in silence (its output 0.73 off the one of its own gates). Now each
    reads its own subfolder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    high, low = _gated_folder(tmp_path / "transformer", 0), _gated_folder(tmp_path / "transformer_2", 1)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=high, transformer_2=low)
    inputs = T.tiny_transformer_inputs("wan", low)
    method = dit_accel.VSA(topk=1)
    with pytest.warns(dit_accel.DitAccelWarning, match="gates loaded for 4 of 4"):
        with dit_accel.apply(pipe, method, backend="torch", weights=tmp_path) as handle, torch.no_grad():
            got = low(**inputs)[0]
            assert handle.vsa_gates == {**{f"blocks.{i}.attn1": str(tmp_path / "transformer") for i in (0, 1)},
                                        **{f"transformer_2.blocks.{i}.attn1": str(tmp_path / "transformer_2")
                                           for i in (0, 1)}}
    with pytest.warns(dit_accel.DitAccelWarning, match="gates loaded for 2 of 2"):
        with dit_accel.apply(low, method, backend="torch", weights=tmp_path / "transformer_2"), torch.no_grad():
            want = low(**inputs)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
