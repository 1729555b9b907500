"""GPU benchmark logic on the CPU: call timings with a fake timer, `bench kernels --modelled` and `bench gpu`
(argument parsing, failures recorded, time budget, JSON and markdown) with fake timers and a fake pytest."""

import json

import pytest
import torch

from dit_accel.cli.main import main
from dit_accel.eval import bench_gpu
from dit_accel.eval.bench import ModelShape, kernels_table, model_kernels
from dit_accel.eval.timing import CallTimer, CpuCallTimer, measure_call


class FakeTimer(CallTimer):
    """Each call costs 2 ms of device time and 0.1 ms of host time; a lone call 3 ms (idle-GPU latency)."""

    def __init__(self, graph_ok=True):
        self.graph_ok = graph_ok
        self.synced = 0

    def sync(self):
        self.synced += 1

    def span(self, fn, calls):
        for _ in range(calls):
            fn()
        return (3e-3 if calls == 1 else 2e-3 * calls), 1e-4 * calls

    def graph(self, fn, calls):
        if not self.graph_ok:
            raise RuntimeError("operation not permitted when stream is capturing")
        return 1.5e-3 * calls


def test_measure_call_reports_latency_throughput_graph_and_host():
    count = []
    t = measure_call(lambda: count.append(1), FakeTimer(), calls=4, repeats=3)
    assert (t.latency_s, t.throughput_s, t.graph_s, t.host_s) == pytest.approx((3e-3, 2e-3, 1.5e-3, 1e-4))
    assert len(count) == 3 + 3 * 4 and t.notes == []
    t = measure_call(lambda: None, FakeTimer(graph_ok=False), calls=2, repeats=1)
    assert t.graph_s is None and "no CUDA graph" in t.notes[0]
    t = measure_call(lambda: None, CpuCallTimer(), calls=2, repeats=1, graph=True)
    assert t.graph_s is None and t.throughput_s > 0


def test_modelled_rows_fit_section_10_flux_1024():
    """The modelled table reproduces BENCHMARKS.md section 10's FLUX 1024 px rows (H100) within the fit's error."""
    shape = ModelShape("FLUX 1024px", (64, 64), 24)
    result = model_kernels([shape], (0.05, 0.1, 0.2, 0.5), kernels=["current"], sla=False)
    measured = {0.05: 0.65, 0.1: 0.57, 0.2: 0.76, 0.5: 0.89}
    rows = [r for r in result["rows"] if "tile" in r["kernel"]]
    assert len(rows) == 4 and all(r["modelled"] for r in result["rows"])
    for r in rows:
        assert r["time_ms"] == pytest.approx(measured[r["target_density"]], rel=0.135)
        assert "[modelled: current]" in r["kernel"]
    sdpa = next(r for r in result["rows"] if r["kernel"].startswith("dense SDPA"))
    assert sdpa["time_ms"] == pytest.approx(0.34, rel=0.06)
    table = kernels_table(result)
    assert table.startswith("**MODELLED, not measured**") and "section 10" in table


def test_bench_kernels_modelled_cli(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["bench", "kernels", "--modelled", "--shapes", "FLUX 1024", "--densities", "0.05",
                 "--kernels", "current,ws", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["modelled"] and res["device_name"] == "MODELLED h100"
    kernels = {r["kernel"] for r in res["rows"]}
    assert "block-sparse tile [triton] [modelled: current]" in kernels
    assert not any("ws" in k for k in kernels) and any("no 'ws' rows" in n for n in res["notes"])  # 64-row blocks
    assert all(c["source"] for c in res["constants"].values())
    printed = capsys.readouterr().out
    assert "MODELLED h100 (a model, not a measurement)" in printed
    assert main(["bench", "kernels", "--modelled", "--kernels", "magic"]) == 2
    assert main(["bench", "kernels", "--modelled", "--arch", "b200"]) == 2


def test_kernels_table_shows_call_timings_when_present():
    row = {"shape": "s", "tokens": 8, "heads": 1, "kernel": "k", "density": 0.5, "time_ms": 1.0,
           "tflops_dense_equiv": 1.0, "tflops_visited": 0.5, "speedup": 2.0, "ideal_speedup": 2.0,
           "fraction_of_ideal": 1.0, "latency_ms": 1.5, "throughput_ms": 0.9, "graph_ms": None, "host_us": 40.0}
    table = kernels_table({"rows": [row]})
    assert "latency ms" in table and "| 1.50 | 0.90 | - | 40 |" in table


TINY = (ModelShape("tiny video", (4, 8, 8), 2, head_dim=16), ModelShape("tiny image", (16, 16), 2, head_dim=16))


def _fake_pytest(timeout):
    return {"returncode": 0, "summary": "3 passed in 1.00s", "timeout": timeout}


def test_bench_gpu_writes_json_and_markdown_with_failures_recorded(tmp_path, monkeypatch):
    real = bench_gpu._method

    def method(name, grid, density):
        if name == "gna" and density == 0.5:
            raise ValueError("no GNA config for this grid")
        return real(name, grid, density)

    monkeypatch.setattr(bench_gpu, "_method", method)
    report = bench_gpu.bench_gpu(tmp_path, device="cpu", shapes=TINY, densities=(0.25, 0.5), timer=FakeTimer(),
                                 calls=2, repeats=1, run_pytest=_fake_pytest, log=lambda m: None)
    saved = json.loads((tmp_path / "gpu_report.json").read_text())
    assert saved["machine"]["commit"] and saved["machine"]["versions"]["torch"] == torch.__version__
    assert saved["pytest"]["summary"] == "3 passed in 1.00s" and saved["pytest"]["timeout"] > 0
    rows = report["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {"forward", "forward+backward"} <= {r["pass"] for r in ok}
    assert {"tile [auto]", "gna [auto]", "sla [auto]", "dense SDPA"} <= {r["kernel"] for r in ok}
    assert not any(r["kernel"] == "radial [auto]" and r["shape"] == "tiny image" for r in rows)  # video only
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all("no GNA config" in r["error"] for r in failed)
    for r in ok:
        assert r["time_ms"] == pytest.approx(2.0) and r["host_us"] == pytest.approx(100.0)
        if r["pass"] == "forward":
            assert r["latency_ms"] == pytest.approx(3.0) and r["graph_ms"] is None  # CPU: no graphs
        assert r["speedup"] == pytest.approx(1.0) and r["fraction_of_ideal"] == pytest.approx(r["work_vs_dense"])
    md = (tmp_path / "gpu_report.md").read_text()
    assert "**forward**" in md and "**forward+backward**" in md and "failed ValueError: no GNA config" in md
    assert "`pytest -m gpu`: 3 passed" in md and "Commit" in md


def test_bench_gpu_stops_at_its_time_budget(tmp_path):
    ticks = iter(range(0, 10_000, 100))  # every clock read advances 100 s
    report = bench_gpu.bench_gpu(tmp_path, device="cpu", shapes=TINY, densities=(0.25,), timer=FakeTimer(),
                                 budget_s=450, calls=1, repeats=1, run_pytest=_fake_pytest,
                                 clock=lambda: next(ticks), log=lambda m: None)
    skipped = [r for r in report["rows"] if r["status"] == "skipped"]
    assert skipped and all(r["error"] == "time budget" for r in skipped)
    assert report["pytest"]["timeout"] >= 30


def test_bench_gpu_cli_parsing(tmp_path, capsys):
    from dit_accel.cli import bench as cli_bench

    parser_args = ["bench", "gpu", "--out", str(tmp_path), "--device", "cpu"]
    assert main(parser_args) == 2  # a GPU report of the CPU: one line saying so
    assert "bench gpu times GPU kernels" in capsys.readouterr().out
    assert main(parser_args + ["--methods", "tile,magic"]) == 2
    assert main(parser_args + ["--densities", "0,2"]) == 2
    assert main(parser_args + ["--shapes", "nothing"]) == 2

    import argparse

    args = argparse.Namespace(out=str(tmp_path), device="cpu", budget=60.0, shapes="FLUX 1024", densities="0.25",
                              methods="tile", no_backward=True, no_pytest=False)
    seen = {}

    def fake_bench(out, **kw):
        seen.update(kw)
        return {"rows": [], "pytest": {"summary": "fake"}}

    import dit_accel.eval.bench_gpu as module

    original = module.bench_gpu
    module.bench_gpu = fake_bench
    try:
        assert cli_bench._run_gpu(args, timer=FakeTimer()) == 0
    finally:
        module.bench_gpu = original
    assert [s.name for s in seen["shapes"]] == ["FLUX 1024px"] and seen["densities"] == [0.25]
    assert seen["methods"] == ["tile"] and seen["backward"] is False and seen["pytest_gpu"] is True


def test_bench_kernels_rows_carry_call_timings_with_a_timer():
    """The GPU columns of bench kernels (latency, back-to-back, graph, host, TFLOP/s on visited tiles), from a fake
    timer on the CPU's quick shape."""
    from dit_accel.eval.bench import CPU_QUICK_SHAPES, bench_kernels

    res = bench_kernels(CPU_QUICK_SHAPES, (0.25,), device="cpu", sla=False, flex_compiled=False, repeats=1, warmup=0,
                        call_timer=FakeTimer(), progress=False)
    assert len(res["rows"]) == 2
    for r in res["rows"]:
        assert (r["latency_ms"], r["throughput_ms"], r["graph_ms"], r["host_us"]) == pytest.approx((3, 2, 1.5, 100))
        assert r["tflops_visited_throughput"] * 2e-3 * 1e12 == pytest.approx(
            4 * r["heads"] * r["tokens"] ** 2 * r["head_dim"] * r["work_vs_dense"])
    assert "back-to-back ms" in kernels_table(res)


def test_modelled_rows_with_a_128_token_tile_name_the_cuda_query_block():
    """--tile: a (1, 16, 8) tile runs 128-row query blocks on CUDA (ws where ws_pays), a 64-token tile 64."""
    shape = ModelShape("small video", (4, 32, 32), 12)
    wide = model_kernels([shape], (0.2,), kernels=["ring3", "ws"], sla=False, tile=(1, 16, 8))
    rows = [r for r in wide["rows"] if "tile" in r["kernel"]]
    assert {r["cuda_block_q"] for r in rows} == {128} and all(r["tile"] == [1, 16, 8] for r in rows)
    assert rows[0]["kernel"].startswith("block-sparse tile (1, 16, 8) q128")
    ws = next(r for r in rows if r["kernel"].endswith("[modelled: ws]"))
    resume = next(r for r in rows if r["kernel"].endswith("[modelled: ws+resume]"))
    assert ws["ws_pays"] is True and resume["time_ms"] >= ws["time_ms"]  # the resume pass adds per-CTA terms
    narrow = model_kernels([shape], (0.2,), kernels=["ring3", "ws"], sla=False, tile=(1, 8, 8))
    rows = [r for r in narrow["rows"] if "tile" in r["kernel"]]
    assert {r["cuda_block_q"] for r in rows} == {64} and {r["ws_pays"] for r in rows} == {None}
    assert [r["kernel"].endswith("[modelled: ring3]") for r in rows] == [True]  # 64-row blocks cannot run ws
    assert main(["bench", "kernels", "--modelled", "--tile", "1,x,8"]) == 2
    assert main(["bench", "kernels", "--tile", "1,16,8"]) == 2  # --modelled only
