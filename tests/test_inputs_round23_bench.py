"""Round 23 ("trust") of `dit-accel bench` as a user drives it: numbers and records that were silently wrong, and
flags that were silently dropped.

- ``bench_overhead``: a ``--method-config`` row labelled ``unwrapped`` or ``Dense()`` replaced that baseline, and
  every ratio divided by the wrong time;
- ``bench kernels --modelled``: the recorded command dropped ``--arch``, ``--tile`` and ``--kernels``; a ``--tile``
  that fits no kept grid gave no tile row and exit 0;
- a density target no Tile layout comes near (0.0001) ran at 0.026 without a word;
- ``--shapes`` (kernels, gpu) and ``--grids`` (layouts) entries that match nothing were dropped without a word;
- a density, thread count, method or pattern given twice ran twice;
- ``--backends triton`` on the CPU timed Triton's interpreter as the kernel;
- ``bench_cpu --patterns sla-1e-3``: a raw ValueError;
- ``bench fidelity``: a damaged capture's message says what to do, an empty one says it is empty.
"""
import json
import re

import pytest
import torch

from dit_accel.cli.main import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------ bench_overhead's baselines
@pytest.mark.parametrize("label", ["unwrapped", "Dense()"])
def test_overhead_refuses_a_row_labelled_as_a_baseline(label):
    """Before: the row replaced the baseline of that name: 'unwrapped' was a wrapped model, 1.000x itself."""
    import dit_accel
    from dit_accel.eval import bench_overhead

    with pytest.raises(ValueError, match=re.escape(f"labelled '{label}', the name of a baseline") + ".*another label"):
        bench_overhead.run(methods={label: dit_accel.Tile()}, rounds=1)


def test_overhead_command_names_the_row_of_the_method_config(tmp_path, capsys):
    from dit_accel.eval import bench_overhead

    config = tmp_path / "methods.json"
    config.write_text(json.dumps([{"method": "tile", "label": "unwrapped"}]))
    with pytest.raises(SystemExit) as exit_:
        bench_overhead.main(["--method-config", str(config), "--rounds", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "labelled 'unwrapped'" in err and "label: in --method-config" in err


# ------------------------------------------------------------------ bench kernels --modelled
def test_modelled_record_names_the_arch_tile_and_kernels_it_ran(tmp_path, capsys):
    """Before: an h200 run with --tile 16,8 recorded `dit-accel bench kernels ... --modelled`, an h100 command."""
    out = tmp_path / "m.json"
    assert main(["bench", "kernels", "--modelled", "--arch", "h200", "--tile", "16,8", "--kernels", "current",
                 "--densities", "0.1", "--shapes", "FLUX 1024", "--no-sla", "--out", str(out)]) == 0
    command = json.loads(out.read_text())["command"]
    assert "--arch h200" in command and "--tile 16,8" in command and "--kernels current" in command
    assert command.endswith("--modelled") and command.count("--modelled") == 1


@pytest.mark.parametrize("tile, shapes", [("1,2", "Wan"), ("1,2,3,4", None)], ids=["2-D-at-video", "4-D"])
def test_modelled_tile_that_fits_no_grid_is_refused(tile, shapes, capsys):
    """Before: every density's tile layout failed, a note each, no tile row, exit 0."""
    argv = ["bench", "kernels", "--modelled", "--tile", tile] + (["--shapes", shapes] if shapes else [])
    assert main(argv) == 2
    err = _err(capsys)
    assert f"--tile {tile} has {len(tile.split(','))} value(s)" in err and "one per grid dimension" in err


def test_a_density_no_tile_layout_reaches_is_noted():
    """Before: --densities 0.0001 gave tile rows at 0.016 (FLUX 1024px) and no word of the target."""
    from dit_accel.eval import bench

    shape = bench.ModelShape("tiny", (16, 16), heads=1)
    notes = bench.model_kernels([shape], [0.0001, 0.25], kernels=["current"], sla=False)["notes"]
    missed = [n for n in notes if "no Tile layout on grid" in n]
    assert len(missed) == 1 and "tiny density 0.0001" in missed[0] and "the nearest visits" in missed[0]


# ------------------------------------------------------------------ entries that match nothing, or twice
@pytest.mark.parametrize("command", [["kernels", "--device", "cpu", "--quick"], ["kernels", "--modelled"],
                                     ["gpu", "--out", "GPU_OUT"]], ids=["kernels", "modelled", "gpu"])
def test_a_shapes_entry_that_matches_nothing_is_refused(command, tmp_path, capsys):
    """Before: `--shapes 480p,FLUXX` timed 480p alone, the typo dropped without a word."""
    argv = ["bench"] + [str(tmp_path / "g") if a == "GPU_OUT" else a for a in command] + ["--shapes", "480p,FLUXX"]
    assert main(argv) == 2
    err = _err(capsys)
    assert "--shapes '480p,FLUXX': 'FLUXX' matches none of the" in err and "give parts of those names" in err


def test_a_layouts_grid_entry_that_matches_nothing_is_refused(capsys):
    assert main(["bench", "layouts", "--grids", "480p,FastWann", "--methods", "sla"]) == 2
    err = _err(capsys)
    assert "--grids takes substrings of" in err and "'480p,FastWann'" in err


@pytest.mark.parametrize("argv, flag, value", [
    (["kernels", "--device", "cpu", "--quick", "--threads", "1,1"], "--threads", "1"),
    (["kernels", "--device", "cpu", "--quick", "--densities", "0.1,0.10"], "--densities", "0.1"),
    (["kernels", "--modelled", "--densities", "0.2,.2"], "--densities", "0.2"),
    (["kernels", "--modelled", "--kernels", "current,ws,current"], "--kernels", "current"),
    (["gpu", "--out", "GPU_OUT", "--methods", "tile,TILE"], "--methods", "tile"),
    (["gpu", "--out", "GPU_OUT", "--densities", "0.1,0.1"], "--densities", "0.1"),
], ids=["kernels-threads", "kernels-densities", "modelled-densities", "modelled-kernels", "gpu-methods",
        "gpu-densities"])
def test_a_setting_given_twice_is_refused(argv, flag, value, tmp_path, capsys):
    """Before: each ran twice (two rows of one setting; bench gpu spent its --budget on it)."""
    argv = ["bench"] + [str(tmp_path / "g") if a == "GPU_OUT" else a for a in argv]
    assert main(argv) == 2
    assert f"{flag} names {value} more than once; name each once" in _err(capsys)


@pytest.mark.parametrize("argv, flag, value", [(["--arch", "90,90"], "--arch", "90"),
                                               (["--arch", "90", "--kernel", "fwd,fwd"], "--kernel", "fwd")],
                         ids=["arch", "kernel"])
def test_sass_refuses_a_filter_given_twice(argv, flag, value, capsys):
    """Before: --arch 90,90 compiled and printed every configuration twice."""
    assert main(["bench", "sass"] + argv) == 2
    assert f"{flag} names {value} more than once; name each once" in _err(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's refusal")
def test_backends_triton_on_the_cpu_is_refused(capsys):
    """Before: a row at 0.01x, 11 s: Triton's interpreter timed as the kernel."""
    assert main(["bench", "kernels", "--device", "cpu", "--quick", "--backends", "torch,triton"]) == 2
    err = _err(capsys)
    assert "--backends triton on --device cpu" in err and "interpreter" in err and "drop triton" in err


# ------------------------------------------------------------------ python -m dit_accel.eval.bench_cpu
def test_bench_cpu_takes_an_sla_topk_in_exponent_notation(capsys):
    """Before: sla-1e-3 passed the check and raised ValueError: could not convert string to float: '1e'."""
    from dit_accel.eval import bench_cpu

    assert bench_cpu.main(["--patterns", "sla-1e-3", "--n", "64", "--block", "16", "--d", "8", "--heads", "1",
                           "--threads", "1", "--rounds", "1", "--no-flex"]) == 0
    assert "| sla-1e-3 | 0.250 | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--patterns", "band,band"], "--patterns names band more than once"),
    (["--patterns", "band", "--threads", "1,01"], "--threads names 1 more than once"),
], ids=["patterns", "threads"])
def test_bench_cpu_refuses_a_setting_given_twice(argv, message, capsys):
    from dit_accel.eval import bench_cpu

    with pytest.raises(SystemExit) as exit_:
        bench_cpu.main(argv + ["--n", "64", "--block", "16", "--no-flex"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------ bench fidelity's damaged captures
def _capture(folder, step):
    t = torch.randn(1, 1, 16, 8)
    torch.save({"q": t, "k": t, "v": t, "grid": (4, 4), "layer": 0, "step": step}, folder / f"layer000_step{step:03d}.pt")


@pytest.mark.parametrize("damage, said", [("empty", "is empty (0 bytes: a capture cut short)"),
                                          ("truncated", "cannot be read (")])
def test_fidelity_says_what_to_do_with_a_damaged_capture(damage, said, tmp_path, capsys):
    _capture(tmp_path, 0)
    _capture(tmp_path, 1)
    bad = tmp_path / "layer000_step001.pt"
    bad.write_bytes(b"" if damage == "empty" else bad.read_bytes()[:300])
    assert main(["bench", "fidelity", "--capture", str(tmp_path), "--methods", "tile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "layer000_step001.pt" in err and said in err and "capture it again, or move it out of the --capture" in err


@pytest.mark.parametrize("target", ["config", "capture"])
def test_fidelity_out_never_names_one_of_its_inputs(target, tmp_path, capsys):
    """Before: --out replaced the --method-config file, or a capture file, with the results' JSON."""
    captures = tmp_path / "cap"
    captures.mkdir()
    _capture(captures, 0)
    config = tmp_path / "methods.json"
    config.write_text(json.dumps({"tile": {}}))
    out = config if target == "config" else captures / "layer000_step000.pt"
    before = out.read_bytes()
    assert main(["bench", "fidelity", "--capture", str(captures), "--methods", "tile", "--method-config", str(config),
                 "--out", str(out)]) == 2
    err = _err(capsys)
    assert f"--out {out}" in err and ("is the --method-config file" if target == "config" else
                                      "names a capture file of the --capture folder") in err
    assert out.read_bytes() == before
