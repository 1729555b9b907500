"""The prepared GPU run on the CPU (issue 72, items 6-8): docs/scripts/wan_step_gpu.py's dry run at a tiny size, and
docs/scripts/gpu_offline_run.sh's plan of steps (DRY_RUN=1), which must fit one device command."""

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "docs" / "scripts"

pytestmark = pytest.mark.usefixtures("one_thread")


def _wan_step():
    spec = importlib.util.spec_from_file_location("wan_step_gpu", SCRIPTS / "wan_step_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wan_step_script_runs_dense_tile_and_vsa_at_a_tiny_size(tmp_path, capsys):
    wan = _wan_step()
    assert wan.WAN_1P3B["num_layers"] == 30 and wan.WAN_1P3B["num_attention_heads"] == 12
    assert (wan.LATENT_480P[0], wan.LATENT_480P[1] // 2, wan.LATENT_480P[2] // 2) == (21, 30, 52)
    sidecar = tmp_path / "gen.json"
    sidecar.write_text(json.dumps({"compare_dense": {"transformer_speedup": 1.3, "end_to_end_speedup": 1.1,
                                                     "psnr_db": 40.0}}))
    out = tmp_path / "wan_step.json"
    assert wan.main(["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--out", str(out),
                     "--sidecar", str(sidecar)]) == 0
    report = json.loads(out.read_text())
    settings = [r["setting"].split(" ")[0] for r in report["rows"]]
    assert settings == ["dense", "tile", "vsa", "tile", "vsa"], report["rows"]
    labels = [r["setting"] for r in report["rows"]]
    assert labels[3].startswith("tile at 10% ") and labels[4].startswith("vsa at 10% "), labels
    assert all(r["step_s"] > 0 and "error" not in r for r in report["rows"])
    assert all(r["rel_error_vs_dense"] < 0.1 for r in report["rows"][1:])  # the same model, sparse attention
    assert report["main_job"] == [{"sidecar": str(sidecar), "transformer_speedup": 1.3, "end_to_end_speedup": 1.1,
                                   "psnr_db": 40.0, "not_slower_than_dense": True}]
    assert "main job" in capsys.readouterr().out
    if not __import__("torch").cuda.is_available():
        assert wan.main(["--out", str(out)]) == 2  # the GPU run without a GPU: one line, no traceback


def test_the_offline_run_plans_its_steps_inside_one_device_command(tmp_path):
    run = subprocess.run(["bash", str(SCRIPTS / "gpu_offline_run.sh")], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path)}, timeout=60)
    assert run.returncode == 0, run.stderr
    steps = re.findall(r"^(\w+) \(limit (\d+)s\): (.*)$", run.stdout, re.M)
    names = [s[0] for s in steps]
    assert names == ["install", "selftest", "generate", "wan_step", "host_profile", "bench_gpu", "pytest_gpu",
                     "sla_parts", "info"], names  # (the probes and the vendor steps when named)
    named = subprocess.run(["bash", str(SCRIPTS / "gpu_offline_run.sh")], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path),
                                "STEPS": "ws_probe gather_probe bwd_probe"}, timeout=60)
    assert re.findall(r"^(\w+) \(limit", named.stdout, re.M) == ["gather_probe", "bwd_probe", "ws_probe"]  # (in order)
    cmd = dict((name, (int(limit), line)) for name, limit, line in steps)
    budget = int(re.search(r"--budget (\d+)", cmd["selftest"][1]).group(1))
    assert budget < cmd["selftest"][0]  # selftest ends itself, with its JSON, before the step's limit
    assert "--sidecar" in cmd["wan_step"][1] and "gen_fp32.json" in cmd["wan_step"][1]
    assert "720p" in cmd["bench_gpu"][1]
    # The whole run stays inside one device command (at most 600 s): each step gets at most what is left.
    default = int(re.search(r"BUDGET:-(\d+)", (SCRIPTS / "gpu_offline_run.sh").read_text()).group(1))
    assert default <= 560


def _dry_run(script: str, tmp_path) -> list:
    """The rows of ``docs/scripts/<script> --dry-run`` through the interpreter, run as the GPU script runs it (from
    docs/scripts), which must exit 0."""
    out = tmp_path / "rows.json"
    run = subprocess.run([sys.executable, str(SCRIPTS / script), "--dry-run", "--out", str(out)], cwd=SCRIPTS,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return json.loads(out.read_text())


def test_the_host_profile_runs_both_parts_on_the_cpu(tmp_path):
    """docs/scripts/host_profile.py's dry run (tiny-wan under Dense and Tile, VSA's fine branch at a small grid): each
    row has its host time per call and a profile whose groups add up to at most that time's order."""
    rows = _dry_run("host_profile.py", tmp_path)
    assert [(r["part"], r.get("method")) for r in rows] == [("main_job", "dense"), ("main_job", "tile"),
                                                          ("vsa_fine", None)], rows
    for r in rows:
        assert "error" not in r and r["host_us_per_call"] > 0 and len(r["top"]) == 25, r
        assert set(r["self_us_per_call"]) >= {"builtin", "dit_accel"}, r
    assert rows[0]["attention_calls"] == rows[1]["attention_calls"] > 0  # the same calls, dense and sparse
    assert rows[1]["self_us_per_call"]["dit_accel"] > rows[0]["self_us_per_call"]["dit_accel"]  # the plan's path


def test_the_lengths_probe_runs_both_paths_against_fp32_on_the_cpu(tmp_path):
    """docs/scripts/lengths_probe.py's dry run through the interpreter: a fitted Tile layout and a VSA fine layout
    with length tiles, each run by count and by bit mask, both within fp32's error of attention over its mask."""
    rows = _dry_run("lengths_probe.py", tmp_path)
    assert [r["layout"] for r in rows] == ["tile-fit", "vsa"]
    assert all(r["pass"] and r["length_share"] > 0 and r["ran_lengths"] and r["len_vs_fp32"] < 1e-4 for r in rows), rows


def test_the_gather_probe_runs_both_paths_against_fp32_on_the_cpu(tmp_path):
    """docs/scripts/gather_probe.py's dry run through the interpreter: a fitted and a padded Tile plan, a fitted
    GNA one, VSA with partial cubes and a fitted Tile training call, each call through the gathering path and with
    the kernels reading raster order (the gathered launch configuration ran), bit for bit alike and within fp32's
    error of attention over the plan's raster mask; and VSA's gated training call both ways, the same selection and
    within fp32 rounding (its means summed in two orders), and reading raster order with the gated term's backward in
    operators, within fp32 rounding of its launch."""
    rows = _dry_run("gather_probe.py", tmp_path)
    assert [r["layout"] for r in rows] == ["tile-fit", "tile", "gna-fit", "vsa", "tile-fit-train", "vsa-train"]
    assert rows[1]["tiled"] > rows[1]["tokens"]
    assert all(r["pass"] and r["gathered_vs_gathering"] == 0 and r["gathered_vs_fp32"] < 1e-4
               and any(c.endswith("-gather") for c in r["ran"]) for r in rows[:3]), rows
    assert rows[3]["pass"] and rows[3]["gathered_vs_gathering"] == 0 and rows[3]["gathered_vs_fp32"] < 1e-4, rows
    assert rows[4]["pass"] and rows[4]["gathered_vs_gathering"] == 0, rows  # a training call's o and gradients
    assert rows[5]["pass"] and rows[5]["selection_rows_differing"] == 0 and rows[5]["gathered_vs_gathering"] < 1e-5
    assert rows[5]["gate_launch_vs_operators"] < 1e-5, rows[5]


def test_the_gather_probe_times_a_training_row_both_ways_and_sdpa(monkeypatch):
    """What the gather probe's training rows run only on a GPU (do_bench stood in for by one call of each): the two
    paths' steps, SDPA's forward and backward, and the ratio from their milliseconds."""
    import torch
    import triton

    monkeypatch.syspath_prepend(str(SCRIPTS))  # (the script imports its sibling lengths_probe)
    gather_probe = importlib.import_module("gather_probe")

    times = iter([4.0, 2.0, 1.0])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: fn() or next(times))
    ran = []
    q, k, v, do = (torch.randn(1, 2, 16, 8) for _ in range(4))
    row = {}
    gather_probe._time_training(row, lambda gather: ran.append(gather), q, k, v, do)
    assert ran == [False, True] and row == {"ms_gathering": 4.0, "ms_gathered": 2.0, "ms_sdpa": 1.0,
                                           "gathering_over_gathered": 2.0}


def test_the_backward_probe_runs_both_backwards_against_fp32_on_the_cpu(tmp_path):
    """docs/scripts/bwd_probe.py's dry run through the interpreter: the one-pass backward in each tile it times (put
    in place before the first backward, so the launch runs it) and the two-pass one, on a fitted Tile and a VSA
    layout, both within fp32's error of attention over the layout's mask."""
    rows = _dry_run("bwd_probe.py", tmp_path)
    assert [(r["layout"], r["one_pass_tile"]) for r in rows] == [
        (layout, tile) for layout in ("tile-fit", "vsa") for tile in ([32, 64, 4, 1], [32, 64, 8, 2])]
    assert all(r["pass"] and r["ran"] == ["m{}n{}-w{}s{}".format(*r["one_pass_tile"])] and r["one_vs_fp32"] < 1e-4
               for r in rows), rows


def test_the_ws_probe_compiles_each_variant_for_sm90(tmp_path):
    """docs/scripts/ws_probe.py's dry run on the CPU: each warp-specialized variant it would run on a GPU compiles
    for sm_90 (a fresh process: the code generator does not run beside the interpreter)."""
    out = tmp_path / "ws.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPTS / "ws_probe.py"), "--dry-run", "--out", str(out)], cwd=ROOT,
                         capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    package = [r for r in rows if "design" not in r]
    assert [r["variant"] for r in package] == [[128, 64, 4, 3], [128, 64, 4, 2], [64, 64, 4, 3], [64, 64, 4, 2]]
    assert all(r.get("compiled") for r in rows), rows
    assert package[0]["warps"] == 12  # a producer and consumer warp groups: the kernel did warp-specialize
    designs = {(r["design"], tuple(r["variant"])): r for r in rows if "design" in r}
    assert {d for d, _ in designs} == {"pipelined", "grid", "grid-preload", "pipelined-preload"}
    assert all(r["warp_specialized"] and r["setmaxnreg"] and r["warps"] == 12 for r in designs.values()), designs
    # The package's item loop is not pipelined since 27c7009: the shared memory of the one-item-per-program design,
    # where the pipelined one kept Q tiles in flight across items (64 KB more at 3 stages).
    pipelined, grid = designs[("pipelined", (128, 64, 4, 3))], designs[("grid", (128, 64, 4, 3))]
    assert pipelined["shared"] - package[0]["shared"] >= 60_000 and abs(package[0]["shared"] - grid["shared"]) < 1024


def test_the_ws_designs_match_fp32_attention_in_the_interpreter(monkeypatch):
    """Each design of docs/scripts/ws_designs.py (persistent or one item per program, the item loop pipelined or
    not, the tile indices read in the loop or before it) on a dense and a sparse layout of 128-token blocks, fp32
    in the interpreter (which runs the loops as written: what a GPU would compute when the compiler is right)."""
    from dit_accel.kernels.backends import triton_reason

    if triton_reason("cpu") is not None:
        pytest.skip("needs the Triton interpreter")
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location("ws_probe", SCRIPTS / "ws_probe.py")
        probe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(probe)
        designs = importlib.import_module("ws_designs").DESIGNS  # (a script beside ws_probe.py, not a package)

        for design in designs:
            for variant in ((128, 64, 4, 3), (64, 64, 4, 2)):
                for kind in probe.LAYOUTS:
                    row = probe._run_design(design, variant, kind, 512, 2, device="cpu")
                    assert row["ran"] and row["first_bad_row"] is None and row["nonfinite_rows"] == 0, row
                    assert max(row["max_err_rows_0_63"], row["max_err_rows_64_127"]) < 1e-5, row
        from dit_accel.kernels.block_sparse import configs

        monkeypatch.setattr(configs, "WS_TUNED", dict(configs.WS_TUNED))  # (the probe sets the variant in it)
        control = probe._run_dense_ws((128, 64, 4, 3), 512, 2, device="cpu")  # (no ws on a CPU: its path runs)
        assert control["ran"] and control["ws"] is False and control["first_bad_row"] is None, control
    finally:
        sys.path.remove(str(SCRIPTS))


def test_the_ws_probe_times_only_the_variants_correct_on_both_layouts(tmp_path, monkeypatch):
    """``--time``: the variants (and designs) whose rows were right on the dense and the sparse layout go to the
    timing, in their order (the first H200 run, triton 3.6.0: only 64 x 64 at 2 stages was); the others are not."""
    spec = importlib.util.spec_from_file_location("ws_probe", SCRIPTS / "ws_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    good = {(64, 64, 4, 2), (128, 64, 4, 2)}
    monkeypatch.setattr(probe.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(probe, "_run", lambda variant, kind, n, heads: {
        "variant": list(variant), "layout": kind, "ran": True,
        "first_bad_row": None if variant in good and (kind == "dense" or variant[0] == 64) else 64})
    monkeypatch.setattr(probe, "_run_design", lambda design, variant, kind, n, heads: {
        "design": design, "variant": list(variant), "layout": kind, "ran": True,
        "first_bad_row": None if design.startswith("grid") and variant[2:] == (4, 3) else 0})
    monkeypatch.setattr(probe, "_run_dense_ws", lambda variant, n, heads: {
        "design": "dense-ws", "variant": list(variant), "layout": "dense", "ran": True, "first_bad_row": None})
    timed = []
    monkeypatch.setattr(probe, "_time", lambda variants, n, heads, designs: timed.append((variants, n, heads, designs))
                        or [{"ms": 1}])
    out = tmp_path / "ws.json"
    assert probe.main(["--time", "--time-tokens", "4096", "--out", str(out)]) == 0
    assert timed == [([(64, 64, 4, 2)], 4096, 12, [("grid", (128, 64, 4, 3)), ("grid-preload", (128, 64, 4, 3))])]
    assert json.loads(out.read_text())["timings"] == [{"ms": 1}]
    with pytest.raises(SystemExit):
        probe.main(["--time-tokens", "100", "--out", str(out)])


def _tiny_wheel(folder: Path, name: str, size: int) -> Path:
    """A pure-Python wheel of ``name`` with ``size`` bytes of incompressible payload (so a pack has several parts)."""
    import base64
    import hashlib
    import zipfile

    files = {f"{name}/__init__.py": b"PROBE = 1\n", f"{name}/blob.bin": os.urandom(size),
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                           b"Tag: py3-none-any\n"}
    record = "".join(f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
                     f"{len(d)}\n" for p, d in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for p, d in {**files, f"{name}-1.0.dist-info/RECORD": record.encode()}.items():
            z.writestr(p, d)
    return path


def test_the_vendor_wheels_travel_in_parts_and_install_whole_or_not_at_all(tmp_path):
    """docs/scripts/gpu_vendor.sh on the CPU: ``pack`` cuts the wheels into parts of PART_MIB (one a device call),
    each with the pack's checksum; ``install`` joins them, checks the checksum and installs the wheels (into a
    target folder here); a missing part or no parts is refused with the reason, installing nothing."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _tiny_wheel(wheels, "vendor_probe_a", 1_500_000)
    _tiny_wheel(wheels, "vendor_probe_b", 800_000)
    parts, site = tmp_path / "parts", tmp_path / "site"
    env = {**os.environ, "WHEELS_FROM": str(wheels), "VENDOR_DIR": str(parts), "PART_MIB": "1",
           "PIP_ARGS": f"--target {site}"}
    script = str(SCRIPTS / "gpu_vendor.sh")
    run = subprocess.run(["bash", script, "pack"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    dirs = sorted(p.name for p in parts.iterdir())
    assert dirs == ["1", "2", "3"] and f'carry ["{parts}/3"]' in run.stdout, (dirs, run.stdout)
    assert all((parts / d / "vendor.sha256").read_text() == (parts / "1" / "vendor.sha256").read_text() for d in dirs)
    assert all(f.stat().st_size <= 1 << 20 for f in parts.glob("*/part-*"))
    (parts / "2" / "part-01").rename(tmp_path / "held")  # a part not carried yet
    run = subprocess.run(["bash", script, "install"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3 and "a part is missing" in run.stderr and not site.exists(), run.stderr
    (tmp_path / "held").rename(parts / "2" / "part-01")
    run = subprocess.run(["bash", script, "install"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (site / "vendor_probe_a" / "blob.bin").stat().st_size == 1_500_000 and (site / "vendor_probe_b").is_dir()
    assert "vendor_probe_a-1.0-py3-none-any.whl" in run.stdout and "cudnn:" in run.stdout
    run = subprocess.run(["bash", script, "install"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**env, "VENDOR_DIR": str(tmp_path / "none")})
    assert run.returncode == 2 and "no parts" in run.stderr


def test_the_glue_script_times_both_packages_at_a_tiny_size(tmp_path, capsys):
    """docs/scripts/glue_gpu.py's dry run: every case timed with this checkout's package and, in a subprocess, with
    the package of ``--baseline`` (here this checkout again), each column saying which package it imported."""
    spec = importlib.util.spec_from_file_location("glue_gpu", SCRIPTS / "glue_gpu.py")
    glue = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(glue)
    out = tmp_path / "glue.json"
    assert glue.main(["--tiny", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--out", str(out),
                      "--baseline", str(ROOT)]) == 0
    report = json.loads(out.read_text())
    for column in (report, report["baseline"]):
        assert set(column["ms"]) == set(glue.CASES) and all(isinstance(ms, float) for ms in column["ms"].values())
        assert column["package"] == str(ROOT / "dit_accel")
    assert "tile_train" in capsys.readouterr().out
    if not __import__("torch").cuda.is_available():
        assert glue.main(["--out", str(out)]) == 2  # the GPU run without a GPU: one line, no traceback


def test_sla_parts_runs_every_part_on_the_cpu(tmp_path):
    """docs/scripts/sla_gpu_parts.py's dry run through the interpreter (tiny, fp16, timing nothing): accuracy against
    the fp32 reference, the forwards, forward + backward with the backward's glue forced each way (their gradients
    alike), and the launch candidates of the forward and the linear dK/dV kernel (reported, each run or its error)."""
    run = subprocess.run([sys.executable, str(SCRIPTS / "sla_gpu_parts.py"), "dry", "--dry-run", "--configs",
                          "--bwd-configs", "--profile"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "OUT": str(tmp_path),
                              "DIT_ACCEL_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    res = json.loads((tmp_path / "sla_dry.json").read_text())
    assert set(res["accuracy_rel_maxerr"]) == {"float16/softmax", "float16/elu"}
    assert all(err < 2e-2 for row in res["accuracy_rel_maxerr"].values() for err in row.values()), res
    assert set(res["fwd_130"]) == {"sdpa", "0.05/none", "0.05/zero", "0.05/rand", "0.2/none", "0.2/zero", "0.2/rand"}
    both = res["fwdbwd_130"]
    assert both["glue_runs"] is False and both["0.05/rand/operators"] == both["0.05/rand/glue"] == 0.0, both
    assert both["glue_vs_operators"] < 1e-2, both
    assert res["backward_configs"] and all(r.get("diff") == 0.0 for r in res["backward_configs"].values()), res
    assert len(res["forward_configs"]) == 8 and "profile" not in res


def test_the_gather_probe_times_vsa_training_with_the_gated_term_both_ways(monkeypatch):
    """The VSA training row's GPU-only timings (do_bench stood in for by one call of each): cube order, raster order,
    SDPA, and raster order with the gated term's backward in operators against its launch."""
    import torch
    import triton

    monkeypatch.syspath_prepend(str(SCRIPTS))
    gather_probe = importlib.import_module("gather_probe")
    times = iter([4.0, 2.0, 1.0, 3.0])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn: (fn(), next(times))[1])
    row = gather_probe.run_vsa_train_case((5, 6, 7), 0.5, heads=1, head_dim=16, dtype=torch.float32, device="cpu",
                                          timed=True)
    assert row["pass"] and row["ms_gathered"] == 2.0 and row["ms_gathered_gate_operators"] == 3.0
    assert row["gate_operators_over_launch"] == 1.5 and row["gate_launch_vs_operators"] < 1e-5, row
