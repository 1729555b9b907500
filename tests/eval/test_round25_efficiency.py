"""Round 25 (trust): every efficiency the benchmarks print or record is speed-up x the TRUE density (visited real
query-key pairs / N^2, issue 72), padded work (the visited blocks' area / the true pairs) its own column. Each figure
here is counted again from its definition, brute force on a dense mask of a tiny layout, with synthetic timings:

- ``bench_cpu``'s sla-TOPK rows printed the top-k in their "true density" column and no share of the ideal (at
  N = 130 in 64-token blocks the top-k 0.2 visits 0.49 or 0.015 of the pairs, whichever block it picks);
- ``docs/scripts/gather_probe.py`` multiplied its speed-up by the layout's block share (GNA (7, 16, 16) fitted at
  Wan 480p: 0.0935 against a true 0.0547, a 1.71x too high efficiency);
- ``bench_layouts``' constructor timings called the block share "density", the key ``bench layouts --json`` gives
  the true density under; ``bench gpu``'s markdown column "density" did not say it is the true one, and its rows
  lacked the ``true_density`` key bench kernels' rows give it under (there "density" is the block share).
"""

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dit_accel.eval import bench, bench_cpu, bench_gpu, bench_gpu_cases, bench_layouts
from dit_accel.eval.report import percent_down
from dit_accel.kernels.geometry import block_figures, efficiency

SCRIPTS = Path(__file__).resolve().parents[2] / "docs" / "scripts"


def _mask_of_blocks(visited: torch.Tensor, n_q: int, n_k: int, block_q: int, block_k: int) -> torch.Tensor:
    """Token mask ``[..., n_q, n_k]`` of a block matrix ``[..., nQ, nK]`` (a ragged last block holds what is left)."""
    qb, kb = torch.arange(n_q) // block_q, torch.arange(n_k) // block_k
    return visited[..., qb, :][..., kb]


def _sla_truth(q, k, params):
    """(true density, work vs dense) of one SLA call's sparse branch, counted on its token mask."""
    from dit_accel.kernels.sla import sla_classify

    crit = sla_classify(q, k, params).critical
    b, h, n_qb, _ = crit.shape
    n_kb = -(-k.shape[-2] // params.block_k)
    visited = torch.zeros(b, h, n_qb, n_kb, dtype=torch.bool).scatter_(-1, crit.long(), True)
    mask = _mask_of_blocks(visited, q.shape[-2], k.shape[-2], params.block_q, params.block_k)
    tiles = int(visited.sum())
    return float(mask.double().mean()), tiles * params.block_q * params.block_k / (b * h * q.shape[-2] * k.shape[-2])


# ------------------------------------------------------------------ bench_cpu's sla rows (fault 1)
def test_bench_cpu_sla_rows_print_the_true_density_and_the_share_of_its_ideal(capsys, monkeypatch):
    """N = 130 in 64-token blocks (a 2-token last key block), batch 2, 2 heads; speed-ups pinned at 2.0."""
    from dit_accel.kernels.sla.common import SLAParams

    monkeypatch.setattr(bench_cpu, "median_ratio", lambda times, base, other: 2.0)
    assert bench_cpu.main(["--patterns", "sla-0.2", "--n", "130", "--block", "64", "--d", "8", "--heads", "2",
                           "--batch", "2", "--threads", "1", "--rounds", "1", "--no-flex", "--backward"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sla-0.2")]
    torch.manual_seed(0)  # (main's inputs, drawn again)
    q, k, _ = (torch.randn(2, 2, 130, 8) for _ in range(3))
    true, _ = _sla_truth(q, k, SLAParams(topk=0.2, block_q=64, block_k=64))
    assert true != pytest.approx(0.2, abs=0.05)  # the top-k is not the density here
    rows = {line.split(" | ")[0]: [c.strip() for c in line.split("|")[1:-1]] for line in lines}
    assert set(rows) == {"| sla-0.2", "| sla-0.2 fwd+bwd"}, lines
    for cells in rows.values():  # pattern, true density, threads, SDPA ms, dit ms, flex ms, vs SDPA, % of ideal
        assert cells[1] == f"{true:.3f}" and cells[6] == "2.00x", cells
        assert cells[7] == percent_down(2.0 * true), cells


def test_bench_cpu_block_rows_use_the_pairs_of_a_ragged_layout():
    """band at N = 130 (a 2-token last block): the density the efficiency takes is the allowed real pairs / N^2."""
    args = SimpleNamespace(n=130, block=64, density=0.5, flex=False)
    q = torch.randn(1, 1, 130, 8)
    calls, density = bench_cpu.contenders("band", q, q, q, args)
    layout = bench_cpu.band_layout(130, 64, 0.5)
    assert density == pytest.approx(float(layout.to_dense_mask().double().mean()), rel=1e-12)


# ------------------------------------------------------------------ gather_probe's efficiency (fault 2)
@pytest.fixture
def gather_probe(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))  # (the script imports its sibling lengths_probe)
    return importlib.import_module("gather_probe")


@pytest.mark.parametrize("name, grid, amount", [("gna-fit", (3, 9, 14), (3, 5, 5)), ("tile", (3, 7, 10), 0.4)],
                         ids=["gna-fit-partial-blocks", "tile-padded"])
def test_the_gather_probe_multiplies_its_speed_up_by_the_true_density(gather_probe, name, grid, amount):
    plan = gather_probe.plan_of(name, grid, amount)
    real = plan.perm.order >= 0
    mask = plan.layout.to_dense_mask()  # [Hl, Np, Np] over the tiled positions
    true = float(mask[:, real][:, :, real].double().mean())
    row = gather_probe.plan_densities(plan)
    assert row["density"] == round(true, 4) and row["block_density"] == round(plan.layout.density(), 4)
    if name == "gna-fit":  # partial blocks: the block share (0.556) is not the density (0.198)
        assert row["block_density"] > 2 * row["density"]


# ------------------------------------------------------------------ bench_layouts' constructor timings (fault 3)
def test_the_layout_constructor_timings_call_the_block_share_block_density(monkeypatch, capsys):
    from dit_accel.patterns import tile_layout

    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["-c", "tile_layout tile=(6,8,8) window=(3,3,3)", "18,24,40", "64"])
    try:
        exec(compile(bench_layouts._CHILD, "<bench_layouts child>", "exec"), {"__name__": "__main__"})
    finally:
        torch.set_num_threads(threads)
    out = json.loads(capsys.readouterr().out)
    layout = tile_layout((18, 24, 40), (6, 8, 8), (3, 3, 3), block_q=64, block_k=64)[1]
    assert "density" not in out and out["block_density"] == round(layout.density(), 4)


# ------------------------------------------------------------------ bench gpu: rows and markdown (fault 4)
class _Timer:
    """Every call of the current function costs ``cost[0]`` seconds of device time."""

    def __init__(self):
        self.cost = [1e-3]

    def sync(self):
        pass

    def span(self, fn, calls):
        for _ in range(calls):
            fn()
        return self.cost[0] * calls, 1e-6 * calls

    def graph(self, fn, calls):
        return self.cost[0] * calls


def _gpu_shape(timer):
    s = bench_gpu_cases._Shape.__new__(bench_gpu_cases._Shape)
    s.shape = bench.ModelShape("t", (4, 8), 2, head_dim=8, batch=2)
    s.timer, s.calls, s.repeats, s.left, s.rows, s.base = timer, 2, 1, lambda: 1.0, [], {}
    s.cuda, s.flops = False, 4.0 * 2 * 2 * 32 * 32 * 8
    return s


def test_bench_gpu_rows_take_the_true_density_forward_and_backward_and_say_so():
    """Synthetic timings: SDPA 8 ms, the sparse call 2 ms (4x), at a true density 0.15 with padded work 1.6: the
    efficiency is 0.6 in both passes, the dense row's 1.0; the markdown names the true density."""
    timer = _Timer()
    s = _gpu_shape(timer)
    ok = lambda: {}  # noqa: E731
    rows = []
    for pass_ in ("forward", "forward+backward"):
        timer.cost[0] = 8e-3
        rows.append(s.measure("dense SDPA", lambda: None, ok, 1.0, 1.0, pass_))
        timer.cost[0] = 2e-3
        rows.append(s.measure("tile [auto, autotune off]", lambda: None, ok, 0.15, 0.15 * 1.6, pass_))
    for r in rows:
        assert r["status"] == "ok" and r["true_density"] == r["density"], r
        dense = r["kernel"] == "dense SDPA"
        assert r["speedup"] == pytest.approx(1.0 if dense else 4.0)
        assert r["fraction_of_ideal"] == pytest.approx(1.0 if dense else efficiency(4.0, 0.15))
        assert r["padded_work"] == pytest.approx(1.0 if dense else 1.6)
    report = {"machine": {"device": "cpu", "date": "d", "cpu": "c", "python": "3", "versions": {}, "commit": "x"},
              "dtype": "fp32", "rows": rows, "budget_s": 1.0}
    md = bench_gpu.gpu_markdown(report)
    assert "| true density |" in md and "| 60.0% |" in md and "| 1.60 |" in md, md


# ------------------------------------------------------------------ bench kernels against brute force
def test_bench_kernels_rows_match_the_pairs_counted_on_their_masks():
    """A padded Tile grid (5, 6, 10) in (4, 4, 4)-cube tiles, SLA on 300 tokens (ragged last blocks) and VSA with
    partial cubes, batch 2, 2 heads; synthetic rounds (SDPA 6 ms, each sparse call 2 ms): each row's true density,
    padded work, ideal and efficiency counted again on the token masks."""
    from dit_accel.kernels.sla.common import SLAParams
    from dit_accel.kernels.vsa import vsa_attention
    from dit_accel.methods import SLA
    from dit_accel.kernels.vsa.naive import cubes_of
    from dit_accel.patterns.tile import tile_mask

    shape = bench.ModelShape("t", (5, 6, 10), 2, head_dim=8, batch=2)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 300, 8, generator=gen) for _ in range(3))
    calls, meta = bench._sparse_contenders(shape, 0.3, q, k, v, gen, torch.device("cpu"), torch.float32, ["torch"],
                                           True, False, [], vsa=True)
    rows = {name: bench._shape_row(shape, None, name, [2e-3] * 3, [6e-3] * 3, **meta[name]) for name in calls}
    truth = {}
    # Tile: the pattern's mask, and its layout's visited blocks in full.
    method, perm, layout = bench._tile_case(shape.grid, 0.3)
    truth["block-sparse tile [torch]"] = (float(tile_mask(shape.grid, method.tile, method.window).double().mean()),
                                          float(layout.kv_counts.sum()) * 64 * 64 / 300 ** 2)
    # SLA: the call's own top-k (its sparse branch; the linear branch is not in the density).
    truth["SLA (sparse+linear)"] = _sla_truth(q, k, SLAParams.of(SLA(topk=0.3)))
    # VSA: the selected cubes' real tokens, every selected cube worked in full.
    cubes = cubes_of(shape.grid, (4, 4, 4))
    topk = meta["VSA (cubes, no gate)"]["topk"]
    sel = vsa_attention(q, k, v, shape.grid, topk=topk, tile=(4, 4, 4), return_selection=True)[1]
    visited = torch.zeros(2, 2, cubes.count, cubes.count, dtype=torch.bool).scatter_(-1, sel.long(), True)
    real = cubes.real.flatten()
    mask = _mask_of_blocks(visited, real.numel(), real.numel(), cubes.volume, cubes.volume)[..., real, :][..., real]
    truth["VSA (cubes, no gate)"] = (float(mask.double().mean()), int(visited.sum()) * cubes.volume ** 2 / (4 * 300 ** 2))
    assert set(truth) <= set(rows), rows.keys()
    for name, (true, work) in truth.items():
        r = rows[name]
        assert r["true_density"] == pytest.approx(true, rel=1e-6), name
        assert r["speedup"] == pytest.approx(3.0) and r["ideal_speedup"] == pytest.approx(1 / true, rel=1e-6), name
        assert r["fraction_of_ideal"] == pytest.approx(3.0 * true, rel=1e-6), name
        assert r["padded_work"] == pytest.approx(work / true, rel=1e-6), name
    dense = bench._shape_row(shape, None, "dense SDPA", [6e-3] * 3, [6e-3] * 3, 1.0)
    assert (dense["fraction_of_ideal"], dense["padded_work"], dense["true_density"]) == (1.0, 1.0, 1.0)


# ------------------------------------------------------------------ the counts behind every figure
def test_block_figures_count_per_head_padded_and_ragged_layouts_exactly():
    """Per-head windows on a padded grid (density averaged over heads) and a band with a 2-token last block."""
    from dit_accel.patterns import tile_layout
    from dit_accel.patterns.tile import tile_mask

    grid, tile, windows = (5, 6, 10), (4, 4, 4), ((1, 3, 3), (3, 1, 1))
    perm, layout = tile_layout(grid, tile, windows, block_q=64, block_k=64)
    real = perm.order >= 0
    fig = block_figures(layout, real, real)
    pairs = tile_mask(grid, tile, windows).sum().item()  # [2, N, N]
    assert fig.density == pytest.approx(pairs / (2 * 300 ** 2), rel=1e-12)
    assert fig.padded_work == pytest.approx(int(layout.kv_counts.sum()) * 64 * 64 / pairs, rel=1e-12)
    band = bench_cpu.band_layout(130, 64, 0.5)
    fig = block_figures(band)
    mask = band.to_dense_mask()
    assert fig.density == pytest.approx(float(mask.double().mean()), rel=1e-12)
    assert fig.padded_work == pytest.approx(int(band.kv_counts.sum()) * 64 * 64 / int(mask.sum()), rel=1e-12)
    assert efficiency(3.0, fig.density) == pytest.approx(3.0 * float(mask.double().mean()))
    for bad in ((0.0, 0.5), (2.0, 0.0), (2.0, 1.5), (float("nan"), 0.5)):
        with pytest.raises(ValueError, match="positive speedup and a density in"):
            efficiency(*bad)



def test_bench_layouts_prints_its_density_column_as_the_true_density(capsys):
    from dit_accel.cli.main import main

    assert main(["bench", "layouts", "--grids", "FastWan", "--methods", "sla"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[2:4] == ["true", "density"] and rows, header
