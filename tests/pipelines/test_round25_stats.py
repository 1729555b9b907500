"""``handle.stats()`` / ``handle.summary()`` and what ``dit-accel generate`` prints from them, each figure against a
count made here from the plans' own block layouts over the calls the run made (round 25, trust).

Audited and found exact (kept as tests below that fail when a count is perturbed): per-layer calls and visited
density, the call-weighted mean and ``sparsity = 1 - mean`` over ``dense_steps``, ``dense_last_steps``,
``dense_layers``, CFG (two transformer calls per step), two resolutions in one session and after
``reset_stats()``; a ``SparsePlan`` whose phases mix PerHead, GNA, Tile and Dense per layer; a ``PerHead`` layer
(its layout's mean over heads); a re-applied handle (fresh counts); generate's density line (dense calls counted
as 1) and its "self-attention X vs dense Y (Z x)" (dense / method, not inverted).

Found wrong, fixed here (each test names what was wrong before):
- a layer whose sparse calls mixed patterns that know their token density (GNA, Tile) with ones that do not
  (PerHead, SLA) reported the known calls' mean as ``token_density`` beside every call's visited ``density``
  (0.195 beside 0.5625 on tiny Wan): a partial-block cost that no call had;
- ``timing=True`` shared one timer per layer between threads: a Timer holds one open start, so two threads'
  overlapping calls lost the overlap (0.40 s of calls read as 0.30 s); and a layer's timer took the device of its
  first call, so calls on CUDA after one on the CPU were timed by wall clock around asynchronous launches.
"""

import threading
import time

import pytest
import torch

import dit_accel
from dit_accel import PerHead, Phase, SparsePlan
from dit_accel.cli.generate_report import _comparison, _record, _summary_lines
from dit_accel.models import tiny as T
from dit_accel.pipelines.stats import Stats

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

TILE = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
GNA = dit_accel.GNA(kernel_size=(2, 5, 5))


def _visited(method, grid) -> float:
    """Visited block fraction of ``method`` on ``grid``, counted from its layout's block matrices (every head)."""
    plan = method.plan(grid)
    if plan.is_dense:
        return 1.0
    layouts = [g[1].layout for g in plan.groups] if hasattr(plan, "groups") else [plan.layout]
    visited = [layout.block_masks()[0] for layout in layouts]
    heads = [len(g[0]) for g in plan.groups] if hasattr(plan, "groups") else [1]
    # (a group's layout has one matrix per head, or one shared by its heads)
    return sum(v.sum().item() / v.numel() * h for v, h in zip(visited, heads)) / sum(heads)


def _mean(values):
    return sum(values) / len(values)


# ----------------------------------------------------------------- a SparsePlan mixing patterns per layer and phase
def test_token_density_of_a_layer_is_over_the_same_calls_as_its_density():
    """Before: layer 0 ran PerHead(Tile, GNA) at steps 1-2 (no token density) and GNA at steps 3-4; stats gave
    ``density`` 0.5625 (all four calls) beside ``token_density`` 0.195 (the two GNA calls only). Now a layer whose
    sparse calls do not all know it says None; one whose calls all do keeps their mean."""
    model = T.build_tiny_transformer("wan")
    grid = T.TRANSFORMER_GRIDS["wan"]
    kwargs = T.tiny_transformer_inputs("wan", model, grid=grid)
    per_head = PerHead((TILE, GNA))
    plan = SparsePlan((Phase(0, 1), Phase(1, 3, {0: per_head, 1: TILE}), Phase(3, None, {0: GNA, 1: dit_accel.Dense()})),
                      num_layers=2, num_heads=2)
    handle = dit_accel.apply(model, plan, backend="torch")
    try:
        with torch.no_grad():
            for step in range(5):
                handle.set_step(step, 5)
                model(**kwargs)
        rows, summary = handle.stats(), handle.summary()
    finally:
        handle.remove()
    ran = {0: [per_head, per_head, GNA, GNA], 1: [TILE, TILE]}  # the sparse calls of steps 1..4
    for row in rows:
        calls = ran[row["index"]]
        assert (row["sparse_calls"], row["dense_calls"]) == (len(calls), 5 - len(calls))
        assert row["density"] == pytest.approx(_mean([_visited(m, grid) for m in calls]), abs=1e-9)
    assert rows[0]["density"] == pytest.approx((2 * 0.625 + 2 * 0.5) / 4)  # (PerHead in one token order: see plan)
    assert rows[0]["token_density"] is None  # (before: 0.1953, GNA's alone)
    assert rows[1]["token_density"] == pytest.approx(TILE.plan(grid).token_density)
    weighted = _mean([_visited(m, grid) for calls in ran.values() for m in calls])
    assert summary["mean_density"] == pytest.approx(weighted, abs=1e-9)
    assert summary["sparsity"] == pytest.approx(1 - weighted, abs=1e-9)
    assert (summary["sparse_calls"], summary["dense_calls"]) == (6, 4)


# ----------------------------------------------------------------- timing across threads and devices
def test_overlapping_calls_of_two_threads_are_each_timed_in_full():
    """Before: thread B's call began while thread A's was open; A's end was measured from B's start, so 0.4 s of
    calls (0.2 s each) read about 0.3 s. Now each thread has its own timer and the layer's time is their sum."""
    stats = Stats(["a"], timing=True)
    cpu = torch.device("cpu")
    a_open, b_open = threading.Event(), threading.Event()

    def a():
        with stats.timed(0, cpu):
            a_open.set()
            b_open.wait(5)
            time.sleep(0.1)

    def b():
        a_open.wait(5)
        time.sleep(0.1)
        with stats.timed(0, cpu):
            b_open.set()
            time.sleep(0.2)

    threads = [threading.Thread(target=f) for f in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 395 <= stats.rows(["x"])[0]["time_ms"] < 520  # (before: about 300)
    assert Stats.summarize(stats.rows(["x"]))["time_ms"] == pytest.approx(stats.rows(["x"])[0]["time_ms"])


def test_a_layer_called_on_another_device_gets_a_timer_of_that_device():
    """Before: the layer's one timer was made for the device of its first call: a CPU timer timed a later CUDA
    call by wall clock around its asynchronous launches. (Nothing is recorded on CUDA here: the timer is made,
    not entered.)"""
    stats = Stats(["a"], timing=True)
    cpu_timer = stats.timed(0, torch.device("cpu"))
    with cpu_timer:
        pass
    cuda_timer = stats.timed(0, torch.device("cuda", 0))
    assert cuda_timer is not cpu_timer and cuda_timer.cuda and not cpu_timer.cuda
    assert stats.timed(0, torch.device("cpu")) is cpu_timer  # (one per thread and device, reused)
    stats.reset()
    assert stats.rows(["x"])[0]["time_ms"] is None


# ----------------------------------------------------------------- a pipeline run: CFG, schedules, two grids
def _generate(pipe, frames: int, steps: int):
    return pipe("a cat", num_frames=frames, height=128, width=128, num_inference_steps=steps, guidance_scale=5.0,
                max_sequence_length=8, output_type="pt", generator=torch.Generator().manual_seed(0)).frames


def test_pipeline_counts_and_densities_over_cfg_schedules_two_grids_and_reset():
    """tiny Wan with CFG (two transformer calls a step), ``dense_steps=1``, ``dense_last_steps=1`` and
    ``dense_layers=[1]``, timed: every count and density equals the one made here from the schedule and each grid's
    layout; a second resolution adds its calls at its own density (the mean is call-weighted); ``reset_stats()``
    then a run counts that run alone; a handle applied again starts from nothing."""
    pipe = T.build_tiny_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    method = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
    big, small = (3, 8, 8), (2, 8, 8)  # 9 and 5 frames at 128x128
    d_big, d_small = _visited(method, big), _visited(method, small)
    assert d_big != d_small and d_big < 1 and d_small < 1
    handle = dit_accel.apply(pipe, method, backend="torch", dense_steps=1, dense_last_steps=1, dense_layers=[1],
                             timing=True)
    try:
        _generate(pipe, 9, 4)  # steps 1, 2 sparse on layer 0: 2 steps x 2 CFG calls
        _generate(pipe, 5, 3)  # step 1 sparse: 1 step x 2 calls
        rows, summary = handle.stats(), handle.summary()
        assert [(r["sparse_calls"], r["dense_calls"]) for r in rows] == [(6, 8), (0, 14)]
        assert rows[0]["density"] == pytest.approx((4 * d_big + 2 * d_small) / 6, abs=1e-9)
        assert rows[0]["token_density"] == pytest.approx(
            (4 * method.plan(big).token_density + 2 * method.plan(small).token_density) / 6, abs=1e-7)
        assert rows[1]["density"] is None and rows[1]["method"] == "dense"
        assert summary["mean_density"] == pytest.approx(rows[0]["density"], abs=1e-12)
        assert summary["sparsity"] == pytest.approx(1 - rows[0]["density"], abs=1e-12)
        assert all(r["time_ms"] > 0 for r in rows)  # (the dense layer's calls are timed too)
        assert summary["time_ms"] == pytest.approx(sum(r["time_ms"] for r in rows))
        assert sorted(summary["ran_on_grid"]) == ["2x8x8", "3x8x8"]

        handle.reset_stats()
        _generate(pipe, 5, 3)
        rows = handle.stats()
        assert [(r["sparse_calls"], r["dense_calls"]) for r in rows] == [(2, 4), (0, 6)]
        assert rows[0]["density"] == pytest.approx(d_small, abs=1e-9)
        assert list(handle.summary()["ran_on_grid"]) == ["2x8x8"]
    finally:
        handle.remove()
    handle = dit_accel.apply(pipe, method, backend="torch")
    try:
        assert handle.summary()["sparse_calls"] == handle.summary()["dense_calls"] == 0
        assert handle.summary()["time_ms"] is None and handle.summary()["mean_density"] is None
    finally:
        handle.remove()


# ----------------------------------------------------------------- what generate prints from them
def _report(summary: dict, times: dict, dense_times: dict) -> list:
    """generate's summary lines for a run of these stats and stage times, compared (``_comparison``) with a dense
    run of ``dense_times``."""
    import numpy as np

    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    compare = _comparison(times, {"times": dense_times, "frames": frames + 1}, frames, None)
    timing = {"attention_s": times["attention"], "transformer_s": times["transformer"]}
    record = {"method": {"method": "tile", "tile": [1, 4, 4], "window": [1, 3, 3]}, "method_choice": "--method",
              "density": {"mean": summary["mean_density"]}, "summary": summary, "timing": timing,
              "settings": {"device": "cpu"}, "backends_used": ["torch"], "output_shape": [2, 8, 8, 3],
              "compare_dense": compare}
    return _summary_lines(record)


def test_generate_prints_the_density_and_the_speedup_the_stats_give():
    """The density line says the summary's call-weighted mean over sparse calls and, with the dense calls counted as
    visiting every block, (sparse x mean + dense) / calls; the time line says dense / method (2.00x for a method
    twice as fast), not method / dense."""
    summary = {"mean_density": 0.25, "sparse_calls": 6, "dense_calls": 2}
    lines = _report(summary, {"attention": 0.1, "transformer": 0.4, "total": 1.0},
                    {"attention": 0.2, "transformer": 0.5, "total": 1.2})
    density = next(line for line in lines if "visited density" in line)
    assert "visited density 0.250 " in density
    assert f"; {(6 * 0.25 + 2) / 8:.3f} with its 2 dense calls counted as 1" in density  # 0.438
    timing = next(line for line in lines if line.startswith("self-attention"))
    assert timing.startswith("self-attention 100 ms vs dense 200 ms (2.00x); transformer 400 ms vs dense 500 ms "
                             "(1.25x)")


def test_the_sidecar_says_what_each_per_layer_density_counts():
    """Before: the sidecar's density note said the per-layer density was None "for layers/steps that ran dense" (a
    dense step leaves no None: its calls are outside the mean) and did not say what ``token_density`` beside it
    counts. Now it says both."""
    from types import SimpleNamespace

    args = SimpleNamespace(model="tiny-wan", negative_prompt=None, seed=0, device="cpu", dtype="float32",
                           offload=False, fps=8, cp=None, method_choice="--method")
    pipe = SimpleNamespace(vae_scale_factor_temporal=4, __call__=lambda prompt, num_frames=17: None)
    record = _record(args, pipe, dit_accel.Tile(), {}, None, {"prompt": "a cat"}, torch.zeros(1, 8, 8, 3),
                     ["x.mp4"], {"transformer": 1.0, "total": 2.0, "vae_decode": 0.1}, 4, [], {}, {})
    note = record["density"]["note"]
    assert "steps that ran dense" not in note
    assert "dense calls" in note and "token_density" in note and "token pairs" in note


def test_wan22_two_experts_count_each_transformers_calls_at_its_steps():
    """Wan 2.2's ``transformer`` runs the steps at or above its boundary timestep and ``transformer_2`` the rest:
    each expert's layers count the calls of its own steps (two a step under CFG), ``dense_steps`` and
    ``dense_last_steps`` fall on the expert that ran those steps, and the summary totals both."""
    import copy

    pipe = T.build_tiny_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    pipe.register_modules(transformer_2=copy.deepcopy(pipe.transformer))
    pipe.register_to_config(boundary_ratio=0.9)
    method = dit_accel.Tile(tile=(1, 4, 4), window=(1, 3, 3))
    handle = dit_accel.apply(pipe, method, backend="torch", dense_steps=1, dense_last_steps=1)
    try:
        _generate(pipe, 9, 5)
        rows, summary = handle.stats(), handle.summary()
    finally:
        handle.remove()
    timesteps = pipe.scheduler.timesteps.tolist()
    boundary = 0.9 * pipe.scheduler.config.num_train_timesteps
    first = [i for i, t in enumerate(timesteps) if t >= boundary]  # transformer's steps, the rest transformer_2's
    second = [i for i in range(len(timesteps)) if i not in first]
    assert len(first) > 1 and len(second) > 1  # (each expert runs a sparse step: 1, and 2 and 3)
    dense = {0, len(timesteps) - 1}
    for row in rows:
        steps = second if row["layer"].startswith("transformer_2.") else first
        assert (row["sparse_calls"], row["dense_calls"]) == (2 * len(set(steps) - dense), 2 * len(set(steps) & dense))
        assert row["density"] == pytest.approx(_visited(method, (3, 8, 8)), abs=1e-9)
    assert len(rows) == 4 and summary["layers"] == 4
    assert summary["sparse_calls"] + summary["dense_calls"] == 2 * 2 * len(timesteps)
    assert summary["dense_calls"] == 2 * 2 * len(dense)
