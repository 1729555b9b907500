"""Round 11, ``dit-accel generate`` with step caches, context parallelism and its output files: the faults found,
each with the test that failed before (a silent wrong answer, or a traceback where one line belongs)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from dit_accel.cli.main import main
from dit_accel.io import load_video
from dit_accel.pipelines.caches import CacheSpec


def _one_line(capsys, command: str = "generate") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"dit-accel {command}: "), err
    return lines[0]


# ----------------------------------------------------------------------------- cache-dit under --cp
class _NoCacheDitImport:
    """A meta path finder that fails the test on any attempt to import cache_dit."""

    def find_spec(self, name, path=None, target=None):
        assert name.partition(".")[0] != "cache_dit", "cache_dit was imported before the --cp refusal"


@pytest.mark.parametrize("cache", ["dbcache", "cachedit-taylorseer:max_warmup_steps=2"])
def test_cache_dit_caches_are_refused_under_cp_before_any_import(cache, tmp_path, capsys, monkeypatch):
    """Before: not refused; under torchrun every rank loaded the model, then failed at the first step (without
    cache-dit: "not installed"; with it, untested, like fbcache's tensor-size traceback). Refused by name before
    the ranks start, without importing cache_dit."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delitem(sys.modules, "cache_dit", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoCacheDitImport(), *sys.meta_path])
    assert main(["generate", "--model", "tiny-shapes", "--method", "tile", "--cp", "ulysses=2", "--cache", cache,
                 "--out", str(tmp_path / "x.mp4")]) == 2
    line = _one_line(capsys)
    name = cache.partition(":")[0]
    assert f"--cache {name} does not run under --cp: cache-dit's DBCache" in line and "taylorseer or pab" in line
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- cache options of other types
def test_a_callable_cache_option_is_one_line(tmp_path, capsys):
    """Before: ``pab:current_timestep_callback=3`` raised a raw ``TypeError: unhashable type: 'list'`` from the
    option check."""
    assert main(["generate", "--model", "tiny-flux", "--cache", "pab:current_timestep_callback=3", "--out",
                 str(tmp_path / "x.png")]) == 2
    line = _one_line(capsys)
    assert "pab:current_timestep_callback=3: current_timestep_callback takes a Python function" in line
    assert list(tmp_path.iterdir()) == []


def test_a_dtype_cache_option_is_read_as_the_torch_dtype():
    """Before: ``taylorseer:taylor_factors_dtype=float16`` reached ``tensor.to("float16")``: a raw RuntimeError
    ("Invalid device string") at the first predicted step, after the model had loaded and run."""
    import torch

    config = CacheSpec.parse("taylorseer:taylor_factors_dtype=float16").config(None)
    assert config.taylor_factors_dtype is torch.float16
    assert CacheSpec.parse("taylorseer:taylor_factors_dtype=none").config(None).taylor_factors_dtype is None
    with pytest.raises(ValueError, match="taylor_factors_dtype must be one of float32, float16, bfloat16 or none"):
        CacheSpec.parse("taylorseer:taylor_factors_dtype=half")


def test_taylorseer_float16_factors_run_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--model", "tiny-flux", "--steps", "4", "--quiet", "--out", str(out), "--cache",
                 "taylorseer:taylor_factors_dtype=float16,disable_cache_before_step=1,cache_interval=2"]) == 0
    assert json.loads((tmp_path / "x.png.json").read_text())["cache"]["attention_calls_skipped"] > 0


def test_one_module_pattern_is_a_list_of_one():
    """Before: ``cache_identifiers=blocks.0.attn1`` reached Diffusers as a string, iterated by character: each
    letter a pattern that matched no module, so the cache did nothing, in silence."""
    config = CacheSpec.parse("taylorseer:cache_identifiers=blocks.0.attn1").config(None)
    assert config.cache_identifiers == ["blocks.0.attn1"]
    config = CacheSpec.parse("taylorseer:skip_predict_identifiers=a/b").config(None)
    assert config.skip_predict_identifiers == ["a", "b"]


def test_one_module_pattern_caches_as_the_same_pattern_given_as_a_list(tmp_path):
    """The reference: the pattern given twice (``a/a``, always read as a list) names the same modules."""
    common = ["generate", "--model", "tiny-flux", "--steps", "4", "--quiet"]
    options = "disable_cache_before_step=1,cache_interval=2"
    pattern = "transformer_blocks.0.attn"
    for name, identifiers in (("one", pattern), ("two", f"{pattern}/{pattern}")):
        assert main([*common, "--out", str(tmp_path / f"{name}.png"), "--cache",
                     f"taylorseer:cache_identifiers={identifiers},{options}"]) == 0
    one, two = (json.loads((tmp_path / f"{name}.png.json").read_text())["cache"] for name in ("one", "two"))
    assert one["attention_calls_skipped"] == two["attention_calls_skipped"] > 0
    np.testing.assert_array_equal(load_video(tmp_path / "one.png"), load_video(tmp_path / "two.png"))


def test_magcache_without_steps_counts_the_steps_the_call_makes():
    """Before: with no steps given (``generate`` on a hub model without --steps), MagCache took its own default of
    28 steps while WanPipeline's call makes 50: its schedule started over at step 28, in silence. The reference:
    the same call with the steps named."""
    import torch

    from dit_accel.models.tiny import build_tiny_pipeline
    from dit_accel.pipelines.caches import enable_cache

    pipe = build_tiny_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    spec = CacheSpec.parse("magcache:mag_ratios=flux")
    frames = []
    for steps in (None, 50):  # 50: WanPipeline's default num_inference_steps, which the call below uses
        with enable_cache(pipe, spec, steps):
            frames.append(pipe("a cat", num_frames=5, height=32, width=32, max_sequence_length=16, output_type="np",
                               generator=torch.Generator().manual_seed(0)).frames)
    np.testing.assert_array_equal(frames[0], frames[1])


# ----------------------------------------------------------------------------- the sidecar's path
def test_a_folder_in_the_sidecars_place_is_refused_before_the_run(tmp_path, capsys):
    """Before: the whole generation ran, then removing the earlier sidecar raised ``IsADirectoryError: [Errno 21]
    Is a directory: 'x.png.json'`` (a traceback), the run's time lost."""
    (tmp_path / "x.png.json").mkdir()
    assert main(["generate", "--model", "tiny-flux", "--quiet", "--out", str(tmp_path / "x.png")]) == 2
    line = _one_line(capsys)
    assert f"--out: the sidecar {tmp_path / 'x.png.json'} this run writes beside {tmp_path / 'x.png'} is a folder" \
        in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png.json"]


def test_a_folder_in_the_default_sidecars_place_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "tiny-flux-dense.png.json").mkdir(parents=True)
    assert main(["generate", "--model", "tiny-flux", "--quiet"]) == 2
    line = _one_line(capsys)
    assert line.startswith("dit-accel generate: error: the default output (pass --out PATH): the sidecar ")
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["tiny-flux-dense.png.json"]


# ----------------------------------------------------------------------------- --max-sequence-length
def test_a_text_length_beyond_the_tokenizer_is_one_line(tmp_path, capsys):
    """Before: ``--max-sequence-length 100000`` on tiny-shapes (WanPipeline, a 512-token tokenizer) padded the
    prompt to 100000 tokens and failed in the text encoder with a raw traceback: "DefaultCPUAllocator: can't
    allocate memory: you tried to allocate 80000000000 bytes"."""
    assert main(["generate", "--model", "tiny-shapes", "--method", "tile", "--max-sequence-length", "100000",
                 "--quiet", "--out", str(tmp_path / "x.mp4")]) == 2
    line = _one_line(capsys)
    assert "--max-sequence-length 100000: the tokenizer of WanPipeline takes at most 512 tokens" in line
    assert list(tmp_path.iterdir()) == []


def test_a_text_length_the_tokenizer_takes_runs(tmp_path):
    assert main(["generate", "--model", "tiny-flux", "--max-sequence-length", "512", "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "x.png")]) == 0
    assert json.loads((tmp_path / "x.png.json").read_text())["settings"]["max_sequence_length"] == 512


# ----------------------------------------------------------------------------- Wan 2.2's two experts
def _two_experts(boundary_ratio=0.875):
    """A tiny Wan 2.2-style pipeline: tiny-wan's parts with a second transformer (other weights) as transformer_2,
    which runs the steps below the boundary."""
    from diffusers import WanPipeline

    from dit_accel.models.tiny import build_tiny_pipeline

    base = build_tiny_pipeline("tiny-wan")
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                       scheduler=base.scheduler, transformer=base.transformer,
                       transformer_2=build_tiny_pipeline("tiny-wan", seed=1).transformer, boundary_ratio=boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_cache_also_caches_the_low_noise_expert():
    """Before: ``--cache`` was enabled on ``transformer`` only; Wan 2.2's ``transformer_2`` ran every block of the
    later steps uncached, in silence."""
    import torch

    from dit_accel.pipelines.caches import enable_cache

    pipe = _two_experts()
    calls, block_calls = [0], [0]
    hooks = [pipe.transformer_2.register_forward_pre_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)),
             pipe.transformer_2.blocks[1].attn1.register_forward_pre_hook(
                 lambda *a: block_calls.__setitem__(0, block_calls[0] + 1))]
    with enable_cache(pipe, CacheSpec.parse("fbcache:threshold=1e9")):
        assert pipe.transformer.is_cache_enabled and pipe.transformer_2.is_cache_enabled
        pipe("a cat", num_frames=5, height=32, width=32, max_sequence_length=16, num_inference_steps=8,
             output_type="np", generator=torch.Generator().manual_seed(0))
    for hook in hooks:
        hook.remove()
    assert not pipe.transformer.is_cache_enabled and not pipe.transformer_2.is_cache_enabled
    assert calls[0] > 2 and block_calls[0] < calls[0]  # the expert's second block skipped on some of its calls


def test_magcache_on_two_experts_is_refused_and_changes_nothing():
    from dit_accel.pipelines.caches import enable_cache

    pipe = _two_experts()
    with pytest.raises(ValueError, match=r"WanPipeline's two transformers \(transformer, transformer_2\) split "):
        with enable_cache(pipe, CacheSpec.parse("magcache:mag_ratios=flux")):
            pass
    assert not pipe.transformer.is_cache_enabled and not pipe.transformer_2.is_cache_enabled


def test_the_cache_report_counts_each_experts_layers_once_per_call(tmp_path):
    """Before: expected calls were all layers of both experts times all transformer calls: 32 for a call that
    runs 16 (4 steps x 2 guidance branches x 2 layers of the one expert each call runs), and the report said
    "skipped 20 of 32 (62%)" where 4 of 16 were skipped."""
    _two_experts(boundary_ratio=0.5).save_pretrained(tmp_path / "wan22")
    out = tmp_path / "w.mp4"
    assert main(["generate", "--model", str(tmp_path / "wan22"), "--method", "dense", "--steps", "4", "--frames", "5",
                 "--height", "32", "--width", "32", "--max-sequence-length", "16", "--quiet", "--cache",
                 "fbcache:threshold=0.2", "--out", str(out)]) == 0
    record = json.loads((tmp_path / "w.mp4.json").read_text())
    assert record["timing"]["transformer_calls"] == 8
    cache = record["cache"]
    assert cache["attention_calls_expected"] == 16
    assert cache["attention_calls_ran"] + cache["attention_calls_skipped"] == 16


# ----------------------------------------------------------------------------- prompts that are not UTF-8
@pytest.mark.parametrize("flag", ["--prompt", "--negative-prompt"])
def test_a_prompt_that_is_not_utf8_is_one_line_before_loading(flag, tmp_path, capsys):
    """``--prompt "$(cat latin1.txt)"``: Python decodes the argument's byte 0xe9 as the lone surrogate U+DCE9.
    Before: the model loaded, then a raw traceback (tiny-wan: "UnicodeEncodeError: 'utf-8' codec can't encode
    character '\\udce9'", tiny-flux's tokenizer: "TypeError: TextEncodeInput must be Union[...]"); a negative prompt
    ran, the byte handed to the tokenizer unsaid."""
    text = b"a caf\xe9".decode("utf-8", "surrogateescape")  # as sys.argv holds it
    assert main(["generate", "--model", "tiny-wan", flag, text, "--quiet", "--out", str(tmp_path / "x.mp4")]) == 2
    assert f"{flag}: byte b'\\xe9' at position 5 is not UTF-8 text" in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_utf8_prompt_runs_and_is_recorded(tmp_path):
    assert main(["generate", "--model", "tiny-flux", "--prompt", "a café ☕", "--steps", "1", "--quiet", "--out",
                 str(tmp_path / "x.png")]) == 0
    assert json.loads((tmp_path / "x.png.json").read_text(encoding="utf-8"))["settings"]["prompt"] == "a café ☕"
