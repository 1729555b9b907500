"""Round 22: the CLI's late and wrong checks: ``eval --quiet``, ``calibrate --frames``, ``finetune --rank``,
``generate --cache``/``--guidance-scale``/``--offload``."""

from __future__ import annotations

import pytest

from dit_accel.cli.main import main


def _no_load(monkeypatch):
    """Loading fails loudly: a check that should refuse before the model loads must not reach it."""
    import dit_accel.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def test_eval_quiet_leaves_the_dense_cache_line_off_the_terminal(tmp_path, capsys):
    """Before: ``dit-accel eval --quiet`` still printed ``dense: 1 generated, 0 from cache (...)``, a progress line;
    without --quiet it is printed, and the counts stay in report.md either way."""
    argv = ["eval", "--model", "tiny-wan", "--methods", "dense", "--steps", "1", "--warmup", "0", "--no-lpips",
            "--floor-backend", "none", "--prompt", "a red circle", "--frames", "5", "--height", "32", "--width", "32",
            "--out", str(tmp_path / "q")]
    assert main(argv + ["--quiet"]) == 0
    captured = capsys.readouterr()
    assert "from cache" not in captured.out + captured.err
    assert "- dense baseline: 1 generated, 0 from cache" in (tmp_path / "q" / "report.md").read_text()
    assert main(argv) == 0  # (the second run takes the sample from the cache, and says so)
    assert "dense: 0 generated, 1 from cache" in capsys.readouterr().out


def _calibrate(model, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n", encoding="utf-8")
    return main(["calibrate", "--model", model, "--prompts", str(prompts), "--out", str(tmp_path / "plan.json"),
                 "--min-psnr", "20", "--steps", "1", "--no-progress", *extra])


def test_calibrate_frames_on_an_embedded_image_model_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """Before: ``dit-accel calibrate --model tiny-flux --frames 5`` loaded the model, then was told "FluxPipeline
    takes no num_frames"."""
    _no_load(monkeypatch)
    assert _calibrate("tiny-flux", tmp_path, "--frames", "5") == 2
    err = capsys.readouterr().err
    assert "--frames 5: tiny-flux takes no num_frames (it makes images); drop it" in err
    assert not (tmp_path / "plan.json").exists()


def test_calibrate_frames_on_an_image_pipeline_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """A folder whose model_index.json names FluxPipeline: its call is known to take no num_frames before loading."""
    _no_load(monkeypatch)
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}', encoding="utf-8")
    assert _calibrate(str(folder), tmp_path, "--frames", "9") == 2
    assert "--frames 9: FluxPipeline takes no num_frames (it makes images); drop it" in capsys.readouterr().err


def test_calibrate_frames_one_on_an_image_model_is_not_refused(tmp_path, capsys, monkeypatch):
    """``--frames 1`` is what an image model makes: it passes the early check (and reaches the load)."""
    _no_load(monkeypatch)
    with pytest.raises(AssertionError, match="the model was loaded"):
        _calibrate("tiny-flux", tmp_path, "--frames", "1")


def _finetune(tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\n", encoding="utf-8")
    return main(["finetune", "--model", "tiny-shapes", "--method", "sla", "--prompts", str(prompts), "--output",
                 str(tmp_path / "lora"), "--steps", "1", "--eval-batches", "0", "--quiet", *extra])


def test_finetune_rank_past_the_models_width_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """Before: ``--rank 100000`` on tiny-shapes (4 heads x 32 = 128 features) loaded the model, then was refused by
    the width of blocks.0.attn1.to_q; its folder's transformer/config.json says so before loading."""
    _no_load(monkeypatch)
    assert _finetune(tmp_path, "--rank", "100000") == 2
    err = capsys.readouterr().err
    assert "--rank 100000 is past the width of the attention layers of tiny-shapes (4 heads x 32 = 128 " in err
    assert "Pass --rank 128 or less." in err and not (tmp_path / "lora").exists()


@pytest.mark.parametrize("rank", ["128", "16"])
def test_finetune_rank_within_the_models_width_reaches_the_load(tmp_path, monkeypatch, rank):
    """The widest rank the layers take (128) and the default-sized ones pass the early check."""
    _no_load(monkeypatch)
    with pytest.raises(AssertionError, match="the model was loaded"):
        _finetune(tmp_path, "--rank", rank)


def test_finetune_rank_is_checked_early_only_for_attention_targets(tmp_path, monkeypatch):
    """``--target-modules ff.net.0.proj`` (a layer whose width the config does not give): left to the check after
    loading, which names the layer."""
    _no_load(monkeypatch)
    with pytest.raises(AssertionError, match="the model was loaded"):
        _finetune(tmp_path, "--rank", "100000", "--target-modules", "ff.net.0.proj")


@pytest.mark.parametrize("rank", ["0", "-3"])
def test_finetune_rank_below_one_is_refused_before_loading(tmp_path, capsys, monkeypatch, rank):
    """(Already refused before loading by FinetuneConfig; kept here as the boundary of the check above.)"""
    _no_load(monkeypatch)
    assert _finetune(tmp_path, "--rank", rank) == 2
    assert f"--rank {rank} is invalid: must be a positive integer." in capsys.readouterr().err


def _without_cache_dit(monkeypatch):
    import importlib.util
    import sys

    monkeypatch.delitem(sys.modules, "cache_dit", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a))


@pytest.mark.parametrize("cache", ["dbcache", "cachedit-taylorseer"])
def test_generate_a_cache_dit_cache_without_cache_dit_is_refused_before_loading(tmp_path, capsys, monkeypatch, cache):
    """Before: ``dit-accel generate --cache dbcache`` without cache-dit loaded the model and encoded the prompt, then
    enable_cache said "cache-dit is not installed"."""
    _no_load(monkeypatch)
    _without_cache_dit(monkeypatch)
    assert main(["generate", "--model", "tiny-flux", "--cache", cache, "--out", str(tmp_path / "a.png"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--cache {cache}: cache-dit is not installed; `pip install cache-dit` to use DBCache" in err
    assert list(tmp_path.iterdir()) == []


def test_eval_a_cache_dit_stack_without_cache_dit_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """Before: ``dit-accel eval --stacks sla+dbcache`` ran the dense rows, then the stack's row failed so."""
    _no_load(monkeypatch)
    _without_cache_dit(monkeypatch)
    assert main(["eval", "--model", "tiny-flux", "--stacks", "sla+dbcache", "--out", str(tmp_path / "e")]) == 2
    assert "--stacks 'sla+dbcache': cache-dit is not installed" in capsys.readouterr().err  # (the flag given)
    assert not (tmp_path / "e").exists()


def test_generate_a_cache_dit_cache_with_cache_dit_reaches_the_load(tmp_path, monkeypatch):
    """With cache-dit there (a stand-in module: only its presence is asked before loading), the run goes on."""
    import importlib.machinery
    import sys
    import types

    _no_load(monkeypatch)
    module = types.ModuleType("cache_dit")
    module.__spec__ = importlib.machinery.ModuleSpec("cache_dit", None)
    monkeypatch.setitem(sys.modules, "cache_dit", module)
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["generate", "--model", "tiny-flux", "--cache", "dbcache", "--out", str(tmp_path / "a.png"), "--quiet"])


@pytest.mark.parametrize("scale", ["1e308", "101", "1e6"])
def test_generate_an_absurd_guidance_scale_is_refused_before_loading(tmp_path, capsys, monkeypatch, scale):
    """Before: ``--guidance-scale 1e308`` was taken; on tiny-wan the guided noise prediction overflowed and the run
    ended in "the frames hold ... non-finite values ... check its weights", after the whole run."""
    _no_load(monkeypatch)
    assert main(["generate", "--model", "tiny-wan", "--guidance-scale", scale, "--out", str(tmp_path / "a.mp4"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--guidance-scale {float(scale):g} is past any model's range: give a scale from 0 to 100" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scale", ["inf", "nan", "-1"])
def test_generate_a_non_finite_or_negative_guidance_scale_is_still_refused(tmp_path, capsys, monkeypatch, scale):
    _no_load(monkeypatch)
    assert main(["generate", "--model", "tiny-wan", "--guidance-scale", scale, "--out", str(tmp_path / "a.mp4"),
                 "--quiet"]) == 2
    assert "--guidance-scale must be" in capsys.readouterr().err


def test_generate_the_largest_guidance_scale_reaches_the_load(tmp_path, monkeypatch):
    _no_load(monkeypatch)
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["generate", "--model", "tiny-wan", "--guidance-scale", "100", "--out", str(tmp_path / "a.mp4"),
              "--quiet"])


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_eval_and_calibrate_refuse_an_absurd_guidance_scale_before_loading(tmp_path, capsys, monkeypatch, command):
    """The same range for eval's and calibrate's --guidance-scale (before: 1e308 ran to NaN frames there too)."""
    _no_load(monkeypatch)
    if command == "eval":
        code = main(["eval", "--model", "tiny-wan", "--methods", "dense", "--guidance-scale", "1e308", "--out",
                     str(tmp_path / "e")])
    else:
        code = _calibrate("tiny-wan", tmp_path, "--guidance-scale", "1e308")
    assert code == 2
    assert "--guidance-scale 1e+308 is past any model's range" in capsys.readouterr().err


def test_generate_offload_on_the_cpu_is_recorded_as_not_done(tmp_path, capsys):
    """Before: ``--offload --device cpu`` (where the loader leaves the weights as they are) wrote
    ``"offload": true`` into the sidecar of a run that offloaded nothing; then the terminal said nothing of it."""
    import json

    out = tmp_path / "a.png"
    assert main(["generate", "--model", "tiny-flux", "--device", "cpu", "--offload", "--steps", "1", "--height", "16",
                 "--width", "16", "--out", str(out), "--quiet"]) == 0
    settings = json.loads((tmp_path / "a.png.json").read_text())["settings"]
    assert settings["offload"] is False
    assert settings["offload_note"].startswith("--offload was given, but the pipeline ran on cpu")
    assert "dit-accel generate: note: --offload was given, but the pipeline ran on cpu" in capsys.readouterr().err


def test_the_offload_record_reads_the_pipelines_hooks():
    """Where Diffusers' model offload hooks are on the pipeline (as --offload sets them on a GPU), it says so."""
    import argparse

    from dit_accel.cli.generate_report import _offload_record
    from dit_accel.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-flux")
    assert _offload_record(argparse.Namespace(offload=False, device="cpu"), pipe) == {"offload": False}
    pipe.enable_model_cpu_offload(device="cpu")
    assert _offload_record(argparse.Namespace(offload=True, device="cpu"), pipe) == {"offload": True}
