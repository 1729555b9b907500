"""Round 16, ``dit-accel generate``'s outputs: what the sidecar says ran, and what the written files hold."""

from __future__ import annotations

import json

from dit_accel.cli.main import main

_SMALL = ["--steps", "2", "--frames", "5", "--height", "16", "--width", "16", "--quiet"]


def _sidecar(out) -> dict:
    return json.loads(out.with_name(out.name + ".json").read_text())


# ----------------------------------------------------------------------------- audio of audio-video pipelines
def test_the_audio_an_audio_video_pipeline_made_is_noted_as_not_written(tmp_path, capsys):
    """Before: MiniMax-H3 (and LTX-2, Kandinsky 6) return audio beside the frames; generate wrote the frames only,
    with no word in the sidecar or on the terminal that the audio was left out."""
    out = tmp_path / "h3.mp4"
    assert main(["generate", "--model", "tiny-minimax-h3", *_SMALL, "--out", str(out)]) == 0
    record = _sidecar(out)
    assert record["audio"]["written"] is False and len(record["audio"]["shape"]) == 4
    assert any("also made audio" in note for note in record["output_notes"])
    assert "also made audio" in capsys.readouterr().out


def test_a_video_pipeline_without_audio_gets_no_audio_note(tmp_path):
    out = tmp_path / "wan.mp4"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, "--out", str(out)]) == 0
    record = _sidecar(out)
    assert "audio" not in record and not any("audio" in note for note in record["output_notes"])


# ----------------------------------------------------------------------------- what a cache ran with
def test_the_sidecar_records_the_pab_skip_range_the_run_set(tmp_path):
    """Before: ``--cache pab`` ran with spatial_attention_block_skip_range=2 (Diffusers' default, None, skips
    nothing), but the sidecar's cache and provenance said only ``{"cache": "pab"}``: a run rebuilt from the record
    with Diffusers' PyramidAttentionBroadcastConfig would skip nothing."""
    out = tmp_path / "pab.mp4"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, "--cache", "pab", "--out", str(out)]) == 0
    record = _sidecar(out)
    assert record["cache"]["filled_in"] == {"spatial_attention_block_skip_range": 2}
    assert record["provenance"]["run"]["cache"] == {"cache": "pab", "spatial_attention_block_skip_range": 2}


def test_an_option_given_is_recorded_as_given_not_as_filled_in(tmp_path):
    out = tmp_path / "pab3.mp4"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, "--cache", "pab:spatial_attention_block_skip_range=3",
                 "--out", str(out)]) == 0
    record = _sidecar(out)
    assert "filled_in" not in record["cache"]
    assert record["provenance"]["run"]["cache"] == {"cache": "pab", "spatial_attention_block_skip_range": 3}


# ----------------------------------------------------------------------------- a negative prompt guidance ignores
def test_a_negative_prompt_with_guidance_off_is_refused_not_ignored(tmp_path, capsys):
    """Before: WanPipeline encodes the negative prompt only for classifier-free guidance (guidance_scale > 1); at
    --guidance-scale 1 the frames with and without --negative-prompt were identical, and the sidecar recorded the
    negative prompt as given."""
    out = tmp_path / "neg.mp4"
    argv = ["generate", "--model", "tiny-wan", *_SMALL, "--guidance-scale", "1", "--negative-prompt", "blurry"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--negative-prompt" in err and "--guidance-scale 1" in err and "above 1" in err
    assert not out.exists()


def test_a_negative_prompt_with_guidance_on_runs(tmp_path):
    out = tmp_path / "neg.mp4"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, "--guidance-scale", "2", "--negative-prompt", "blurry",
                 "--out", str(out)]) == 0
    assert _sidecar(out)["settings"]["negative_prompt"] == "blurry"


def test_a_negative_prompt_with_guidance_off_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """The tiny-shapes folder names WanPipeline in its model_index.json: the refusal comes before the load (minutes
    on a real Wan folder)."""
    from dit_accel.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    assert main(["generate", "--model", "tiny-shapes", "--guidance-scale", "0", "--negative-prompt", "blurry",
                 "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert "WanPipeline uses a negative prompt only with classifier-free guidance" in err, err


# ----------------------------------------------------------------------------- the dense comparison beside a cache
def test_side_by_side_with_a_cache_names_the_cache_on_the_right(tmp_path, capsys):
    """Before: with --cache the right side of OUT-vs-dense was labelled with the method alone ("tile"), and the
    sidecar's comparison note said nothing of the dense run having no cache, though its speedups and PSNR are
    those of the method and the cache together."""
    from dit_accel.cli.generate_report import _label_strip, _strip_height
    from dit_accel.videos import load_video

    out = tmp_path / "sbs"
    assert main(["generate", "--model", "tiny-wan", "--steps", "2", "--frames", "1", "--height", "16", "--width",
                 "48", "--quiet", "--method", "tile", "--cache", "fbcache", "--side-by-side", "--out", str(out)]) == 0
    assert "right tile+fbcache" in capsys.readouterr().out
    both = load_video(f"{out}-vs-dense")
    strip = both[0, :_strip_height(48), 48 + 2:]
    assert (strip == _label_strip("tile+fbcache", 48)).all()
    assert "--cache fbcache" in _sidecar(out)["compare_dense"]["note"]


# ----------------------------------------------------------------------------- a one-frame GIF
def test_a_one_frame_gif_gets_no_frame_rate_note(tmp_path, capsys):
    """Before: a one-frame GIF (an image model, or --frames 1) got "plays at 16.7 frames per second for --fps 16",
    a note about a rate that a still image does not have."""
    out = tmp_path / "still.gif"
    assert main(["generate", "--model", "tiny-wan", "--steps", "2", "--frames", "1", "--height", "16", "--width", "16",
                 "--quiet", "--out", str(out)]) == 0
    assert "frames per second" not in capsys.readouterr().out
    assert _sidecar(out)["output_notes"] == []


# ----------------------------------------------------------------------------- a prompt cut at max_sequence_length
def test_a_prompt_longer_than_the_encoded_text_is_noted(tmp_path, capsys):
    """Before: WanPipeline's tokenizer cut the prompt at max_sequence_length tokens without a word: two prompts that
    differ only past the cut made identical frames (measured), and the sidecar recorded the whole prompt as used."""
    out = tmp_path / "long.png"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, "--max-sequence-length", "8", "--prompt",
                 "a red panda climbing a bamboo stalk", "--out", str(out)]) == 0
    notes = _sidecar(out)["output_notes"]
    assert len(notes) == 1 and notes[0].startswith("--prompt is 35 tokens and WanPipeline encodes 7 of them")
    assert f"note: {notes[0]}" in capsys.readouterr().out


def test_a_prompt_that_fits_gets_no_note(tmp_path):
    out = tmp_path / "short.png"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, "--max-sequence-length", "8", "--prompt", "a cat",
                 "--out", str(out)]) == 0
    assert _sidecar(out)["output_notes"] == []


def test_eval_records_the_cache_settings_a_stack_ran_with(tmp_path):
    """As generate's sidecar: ``eval --stacks dense+pab`` ran PAB with skip range 2 (Diffusers' default skips
    nothing), and its results.json row said only ``{"cache": "pab"}``."""
    out = tmp_path / "e"
    assert main(["eval", "--model", "tiny-wan", "--stacks", "dense+pab", "--prompt", "a cat", "--steps", "2",
                 "--frames", "5", "--height", "16", "--width", "16", "--warmup", "0", "--no-lpips", "--out", str(out),
                 "--quiet"]) == 0
    row = next(r for r in json.loads((out / "results.json").read_text())["rows"] if r["label"] == "dense+pab")
    assert row["config"]["cache"] == {"cache": "pab", "spatial_attention_block_skip_range": 2}
