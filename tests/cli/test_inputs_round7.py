"""The CLI's inputs checked at the boundary, round 7: each test makes the user's call that used to run on, fail late
with a traceback, or overwrite the user's files."""

from __future__ import annotations

import json
import math

import pytest

from dit_accel.cli.main import main


@pytest.fixture
def no_model_load(monkeypatch):
    """A check that is meant to come before the model: loading one fails the test."""
    from dit_accel.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red square moving left\n")
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ finetune
@pytest.mark.parametrize("field, flag", [("alpha", "--alpha"), ("sla_lr_scale", "--sla-lr-scale")])
def test_finetune_refuses_an_infinite_alpha_or_sla_lr_scale(field, flag, tmp_path, prompts):
    """Before: inf passed "> 0", and the run diverged after loading, its message blaming --lr."""
    from dit_accel import SLA
    from dit_accel.training import FinetuneConfig, validate_config

    config = FinetuneConfig(model="tiny-wan", method=SLA(topk=0.5), output=str(tmp_path / "o"), prompts=str(prompts),
                            **{field: math.inf})
    with pytest.raises(ValueError, match=f"{flag} inf must be a finite positive number"):
        validate_config(config)


def test_finetune_refuses_a_negative_dense_layers_count(tmp_path, prompts, capsys):
    """Before: --dense-layers -1 became range(-1), no dense layer, and the run trained as if it were not given."""
    out = tmp_path / "o"
    assert main(["finetune", "--model", "tiny-shapes", "--method", "sla", "--prompts", str(prompts), "--output",
                 str(out), "--steps", "1", "--eval-batches", "0", "--dense-layers", "-1", "--quiet"]) == 2
    assert "--dense-layers -1 is invalid: give a count >= 0" in _one_line(capsys)
    assert not out.exists()


# ------------------------------------------------------------------ calibrate
def test_calibrate_refuses_to_write_the_plan_over_its_prompts(tmp_path, prompts, capsys, no_model_load):
    """Before: --out naming the --prompts file replaced the user's prompts with the plan."""
    assert main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "20",
                 "--out", str(tmp_path / "." / "prompts.txt")]) == 2
    assert "is the --prompts file" in _one_line(capsys)
    assert prompts.read_text() == "a red square moving left\n"


def test_calibrate_refuses_a_capture_folder_of_another_run(tmp_path, prompts, capsys, no_model_load):
    """Before: calibrate wrote its samples over another run's captures (eval refused the same folder), and
    --capture '' wrote them into the current folder."""
    held = tmp_path / "cap"
    held.mkdir()
    (held / "layer000_step000.pt").write_bytes(b"another run")
    for capture, said in ((str(held), "already holds 1 capture file (layer000_step000.pt)"),
                          ("", "is not a usable folder path")):
        assert main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "20",
                     "--out", str(tmp_path / "plan.json"), "--capture", capture]) == 2
        assert said in _one_line(capsys)
    assert (held / "layer000_step000.pt").read_bytes() == b"another run"
    assert not (tmp_path / "plan.json").exists()


# ------------------------------------------------------------------ eval
@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_eval_refuses_an_output_folder_that_is_a_file(flag, tmp_path, prompts, capsys, no_model_load):
    """Before: `dit-accel eval: [Errno 17] File exists: 'prompts.txt'`, naming no flag."""
    argv = {"--out": ["--out", str(prompts)], "--cache-dir": ["--out", str(tmp_path / "o"), "--cache-dir", str(prompts)]}
    assert main(["eval", "--model", "tiny-shapes", "--methods", "dense", *argv[flag]]) == 2
    assert f"{flag} {prompts} is a file; pass a folder path" in _one_line(capsys)
    assert prompts.read_text() == "a red square moving left\n"


def test_eval_refuses_a_repeated_seed(tmp_path, capsys, no_model_load):
    """Before: --seeds 0,0 ran every video twice and the paired statistics counted both as evidence."""
    assert main(["eval", "--model", "tiny-shapes", "--methods", "dense", "--seeds", "0,1,0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--seeds repeats a seed (0,1,0): each seed once" in _one_line(capsys)


@pytest.mark.parametrize("options, said", [
    ({"dense_steps": -1}, "dense_steps=-1 is invalid: expected an int >= 0"),
    ({"dense_layers": "x"}, "dense_layers='x' is invalid"),
    ({"backend": "cuda"}, "backend='cuda' is invalid: choose one of auto"),
], ids=["dense-steps", "dense-layers", "backend"])
def test_eval_method_config_apply_options_are_checked_before_the_model_loads(options, said, tmp_path, capsys,
                                                                           no_model_load):
    """Before: the row failed only after the model loaded and the dense rows ran."""
    config = tmp_path / "methods.json"
    config.write_text(json.dumps({"tile": options}))
    assert main(["eval", "--model", "tiny-shapes", "--methods", "tile", "--method-config", str(config),
                 "--out", str(tmp_path / "o")]) == 2
    err = _one_line(capsys)
    assert f"--method-config {config}: tile: {said}" in err



def test_eval_method_config_refuses_an_empty_list_of_configs(tmp_path, capsys, no_model_load):
    """Before: {"tile": []} gave tile no row at all (or its defaults, when --methods named it), without a word."""
    config = tmp_path / "methods.json"
    config.write_text(json.dumps({"tile": []}))
    assert main(["eval", "--model", "tiny-shapes", "--method-config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert f"--method-config {config}: tile: an empty list of configs" in _one_line(capsys)

# ------------------------------------------------------------------ bench
@pytest.mark.parametrize("argv", [
    ["kernels", "--modelled", "--shapes", "FLUX 1024", "--densities", "0.1"],
    ["kernels", "--device", "cpu", "--quick", "--no-sla", "--no-vsa", "--no-flex-compiled"],
], ids=["modelled", "timed"])
def test_bench_kernels_checks_its_output_file_before_the_run(argv, tmp_path, monkeypatch, capsys):
    """Before: --modelled --out FOLDER (or in a folder under a file) was an IsADirectoryError traceback; the timed
    benchmark ran to the end before the same traceback."""
    from dit_accel.eval import bench

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output path was checked")

    monkeypatch.setattr(bench, "bench_kernels", refuse)
    monkeypatch.setattr(bench, "model_kernels", refuse)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out, said in ((tmp_path, "is a folder; give a file path"),
                      (blocker / "bench.json", f"lies under {blocker}, which is a file")):
        assert main(["bench", *argv, "--out", str(out)]) == 2
        assert f"--out {out} {said}" in _one_line(capsys)


def test_bench_kernels_modelled_refuses_the_timed_runs_flags(capsys):
    """Before: --modelled silently ignored --plot (no plot written), --repeats 0, --threads and the rest."""
    assert main(["bench", "kernels", "--modelled", "--plot", "m.png", "--repeats", "0"]) == 2
    assert _one_line(capsys).endswith("--plot, --repeats apply to the timed benchmark, not --modelled: drop them, "
                                      "or leave out --modelled")



@pytest.mark.parametrize("argv", [["fidelity", "--capture", "nowhere", "--methods", " , "],
                                  ["layouts", "--methods", ""], ["layouts", "--grids", ","]],
                         ids=["fidelity-methods", "layouts-methods", "layouts-grids"])
def test_bench_refuses_a_list_flag_given_empty(argv, capsys):
    """Before: an empty --methods gave fidelity an empty table and layouts every method (as if it were not given)."""
    assert main(["bench", *argv]) == 2
    assert argv[-2] in _one_line(capsys)

# ------------------------------------------------------------------ convert
def test_convert_refuses_an_empty_out(tmp_path, monkeypatch, capsys):
    """Before: --out '' named the current folder, and with --overwrite the weights were written into it."""
    import torch

    monkeypatch.chdir(tmp_path)
    prefix = "blocks.0.self_attn.attn.proj_l"
    torch.save({f"{prefix}.weight": torch.zeros(4, 4), f"{prefix}.bias": torch.zeros(4)}, tmp_path / "ck.pth")
    assert main(["convert", "ck.pth", "--out", "", "--overwrite"]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]


def test_convert_says_a_file_at_out_is_a_file(tmp_path, capsys):
    """Before: --out naming a file said to pass --overwrite, which refused it too."""
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    ckpt = tmp_path / "ck.pth"
    ckpt.write_bytes(b"")
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(ckpt), "--out", str(target), *extra]) == 2
        assert f"--out {str(target)!r} is a file; give a folder path" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_calibrate_refuses_a_tile_of_another_rank_before_the_model_loads(tmp_path, prompts, capsys, no_model_load):
    """Before: --tile 1,2 on a video model was refused after the dense run (minutes on a real model), without
    naming --tile."""
    assert main(["calibrate", "--model", "tiny-shapes", "--prompts", str(prompts), "--min-psnr", "20",
                 "--out", str(tmp_path / "plan.json"), "--tile", "1,2"]) == 2
    assert "--tile 1,2 has 2 sizes, but the token grid of tiny-shapes has 3 dimensions: give 3 sizes, T,H,W" in \
        _one_line(capsys)


# ------------------------------------------------------------------ info
def test_info_says_a_refused_class_is_refused(capsys):
    """Before: `info --model` of a refused class printed a settings heading over an empty table."""
    assert main(["info", "--model", "Efficient-Large-Model/SANA-WM_bidirectional-diffusers"]) == 0
    out = capsys.readouterr().out
    assert ("settings for Efficient-Large-Model/SANA-WM_bidirectional-diffusers (SanaWMTransformer3DModel): none, "
            "dit_accel refuses this class: its self-attention (blocks.*.attn) is no softmax attention") in out, out[-600:]
