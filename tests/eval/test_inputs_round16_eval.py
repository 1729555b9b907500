"""Round 16 of the eval inputs: each number checked against its published definition, computed here.

- the frozen check takes the median of the consecutive changes as the statistic is defined (the mean of the two
  middle values of an even count), not torch's lower middle value;
- CLIP sees a frame as its image processor shows it (shorter side resized, centre square), not squashed square;
- the paired summary drops NaN of any float type, and refuses cluster labels that do not match the values;
- ``--clip-model`` / ``$DIT_ACCEL_CLIP_MODEL`` that cannot be a model is refused before the model loads;
- ``bench_fidelity``'s ``max_files`` and ``match_density`` are checked as ``bench fidelity``'s flags are.
"""
import math

import numpy as np
import pytest
import torch

from dit_accel.cli.main import main
from tests.eval.offline_models import tiny_clip
from tests.eval.test_metrics import _reference_clip


# ------------------------------------------------------------------ temporal: the median of the changes
@pytest.mark.parametrize("steps, frozen", [
    ([0.0, 0.5], False),  # still, then a large move: median 0.25
    ([0.0, 0.0, 0.3, 0.3], False),  # median 0.15
    ([0.0, 0.0, 0.0, 0.3], True),  # median 0
    ([0.0, 1e-3], True),  # median 0.5e-3 < half a grey level
], ids=["still-then-move", "half-still", "mostly-still", "tiny-move"])
def test_a_video_is_frozen_when_the_true_median_of_its_changes_is_below_half_a_grey_level(steps, frozen):
    """Before: torch.median of an even count is the lower middle value, so a 3-frame video that moves by half
    the range in its second step read as frozen (its report row: frozen 1.0)."""
    from dit_accel.eval.temporal import FROZEN_LEVEL, is_frozen, motion

    levels = np.concatenate([[0.0], np.cumsum(steps)])
    video = torch.tensor(levels, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 8, 8)
    changes = np.abs(np.diff(levels))
    assert motion(video).numpy() == pytest.approx(changes, abs=1e-6)
    assert (float(np.median(changes)) < FROZEN_LEVEL) == frozen  # the definition, computed here
    assert is_frozen(video) == frozen


# ------------------------------------------------------------------ CLIP: centre square, not squashed
@pytest.mark.parametrize("shape, crop", [((32, 64), (slice(None), slice(16, 48))),
                                         ((48, 32), (slice(8, 40), slice(None)))], ids=["wide", "tall"])
def test_clip_scores_a_non_square_frame_on_its_centre_square_as_clips_processor_does(shape, crop):
    """CLIP's image processor (and torchmetrics' CLIPScore through it) resizes the shorter side to the model's
    size and keeps the centre square. Before, frames were squashed to a square: a 480x832 video was scored on
    shapes 1.7x narrower than drawn, and the side bands weighed in as much as the centre."""
    from dit_accel.eval.clip import ClipScorer

    model, tokenizer = tiny_clip()
    scorer = ClipScorer(model, tokenizer)
    g = torch.Generator().manual_seed(5)
    frames = 0.3 * torch.rand(3, 3, *shape, generator=g)  # dark frames: this random CLIP scores them above 0
    frames[(..., *crop)] = 0.1 * torch.rand(3, 3, 32, 32, generator=g)
    centre = frames[(..., *crop)]
    for prompt in ("a red cat", "video"):
        want = _reference_clip(model, tokenizer, centre, prompt)
        assert want.min() > 10  # (a score clamped to 0 would tell nothing)
        assert torch.allclose(scorer.per_frame(frames, prompt), want, atol=1e-4)
    band = (..., slice(0, 8), slice(None)) if shape[0] > shape[1] else (..., slice(None), slice(0, 16))
    other = frames.clone()  # what lies outside the centre square does not count
    other[band] = 0.3 * torch.rand(other[band].shape, generator=g)
    assert torch.allclose(scorer.per_frame(other, "a red cat"), scorer.per_frame(frames, "a red cat"), atol=1e-6)


# ------------------------------------------------------------------ stats: NaN of any float type
@pytest.mark.parametrize("kind", ["numpy-float32", "tensor"])
def test_summarize_drops_a_nan_of_any_float_type(kind):
    """Before: only a Python float NaN was dropped; a numpy float32 array's NaN gave mean nan, ci (nan, nan)
    over n = 6 pairs, 'meaningful': True."""
    from dit_accel.eval.stats import summarize

    raw = [0.1, 0.3, math.nan, 0.4, 0.0, 0.2]
    values = np.array(raw, dtype=np.float32) if kind == "numpy-float32" else torch.tensor(raw)
    got = summarize(values)
    kept = np.array([v for v in raw if not math.isnan(v)], dtype=np.float32).astype(np.float64)
    assert got["n"] == 5 and got["meaningful"]
    assert got["mean"] == pytest.approx(kept.mean(), abs=1e-7)
    assert got["sd"] == pytest.approx(kept.std(ddof=1), abs=1e-7)
    half = 2.7764451051977987 * kept.std(ddof=1) / math.sqrt(5)  # t_{0.975, 4}
    assert got["ci"] == pytest.approx((kept.mean() - half, kept.mean() + half), abs=1e-6)


def test_summarize_refuses_cluster_labels_that_do_not_match_the_values():
    """Before: zip kept the first two of six values for two labels and summarised n = 2 without a word."""
    from dit_accel.eval.stats import summarize

    with pytest.raises(ValueError, match="clusters: 2 labels for 6 values"):
        summarize([0.1, 0.3, 0.2, 0.4, 0.0, 0.2], ["a", "b"])
    assert summarize([0.1, 0.3, 0.2, 0.4], ["a", "a", "b", "b"])["n"] == 4


# ------------------------------------------------------------------ --clip-model refused before the model
@pytest.fixture
def no_model_load(monkeypatch):
    from dit_accel.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    for name in ("DIT_ACCEL_FID_WEIGHTS", "DIT_ACCEL_CLIP_MODEL"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("value, said", [
    ("{tmp}/no/such/clip", "--clip-model {tmp}/no/such/clip: no such folder (and not a hub id)"),
    ("{tmp}/empty", "--clip-model {tmp}/empty: a folder without config.json"),
    ("{tmp}/file.bin", "--clip-model {tmp}/file.bin: is a file, not a folder"),
    ("", "--clip-model is empty"),
], ids=["missing", "no-config", "a-file", "empty"])
def test_a_clip_model_that_cannot_be_a_model_is_refused_before_the_model_loads(value, said, tmp_path, capsys,
                                                                                no_model_load):
    """Before: the eval ran every row, then printed 'CLIP score skipped' (nothing at all with --quiet, and no
    warning in results.json) and the CLIP column was '-'."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.bin").write_bytes(b"x")
    out = tmp_path / "out"
    assert main(["eval", "--model", "tiny-shapes", "--methods", "tile", "--clip-model", value.format(tmp=tmp_path),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said.format(tmp=tmp_path) in err, err
    assert not out.exists()


def test_clip_model_from_python_or_the_variable_is_checked_and_a_hub_id_or_model_folder_passes(
        tmp_path, monkeypatch, no_model_load):
    from dit_accel.eval.clip import CLIP_ENV, clip_inputs_error
    from dit_accel.eval.runner import EvalSettings, run_eval

    settings = EvalSettings(model="tiny-shapes", prompts=["a red circle moving left"], steps=1)
    with pytest.raises(ValueError, match="--clip-model .*: no such folder"):
        run_eval(settings, [], tmp_path / "out", clip_model=str(tmp_path / "gone" / "clip"))
    monkeypatch.setenv(CLIP_ENV, str(tmp_path / "gone" / "clip"))
    assert clip_inputs_error(None).startswith(f"{CLIP_ENV} {tmp_path / 'gone' / 'clip'}: no such folder")
    monkeypatch.delenv(CLIP_ENV)
    assert clip_inputs_error(None) is None and clip_inputs_error("openai/clip-vit-base-patch32") is None
    model, tokenizer = tiny_clip()
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    assert clip_inputs_error(str(tmp_path / "clip")) is None


# ------------------------------------------------------------------ bench_fidelity's numbers
def _capture(folder, count=2):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for step in range(count):
        q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
        torch.save({"q": q, "k": k, "v": v, "grid": (1, 4, 4), "layer": 0, "step": step, "layer_name": "x"},
                   folder / f"layer000_step{step:03d}.pt")
    return folder


@pytest.mark.parametrize("kwargs, said", [
    ({"max_files": -1}, "max_files=-1 is invalid: expected an integer >= 1"),
    ({"max_files": 0}, "max_files=0 is invalid"),
    ({"max_files": 1.5}, "max_files=1.5 is invalid"),
    ({"match_density": 0}, "match_density=0 is invalid: expected a density in (0, 1]"),
    ({"match_density": 1.5}, "match_density=1.5 is invalid"),
    ({"match_density": float("nan")}, "match_density=nan is invalid"),
], ids=["files-negative", "files-zero", "files-fraction", "density-zero", "density-above-one", "density-nan"])
def test_bench_fidelity_refuses_numbers_its_flags_refuse(kwargs, said, tmp_path):
    """Before: max_files=-1 silently dropped the last capture, 0 returned a result of no rows, and
    match_density=0 compared each method at its own density while recording 0."""
    import dit_accel
    from dit_accel.eval.fidelity import bench_fidelity

    folder = _capture(tmp_path / "cap")
    with pytest.raises(ValueError) as err:
        bench_fidelity(folder, {"dense": dit_accel.Dense()}, log=lambda _: None, **kwargs)
    assert said in str(err.value)
    done = bench_fidelity(folder, {"dense": dit_accel.Dense()}, max_files=2, log=lambda _: None)
    assert [r["step"] for r in done["rows"]] == [0, 1]


def test_a_clip_model_asked_for_that_does_not_load_is_a_warning_not_only_a_skip_line(monkeypatch):
    """A hub id passes the early check, and may still not load (offline, not cached): that must reach
    results.json's warnings, as an asked-for FID does; before it was only a skip line (silent with --quiet)."""
    from dit_accel.eval import clip
    from dit_accel.eval.runner import EvalSettings, _Scorers

    monkeypatch.delenv(clip.CLIP_ENV, raising=False)
    monkeypatch.delenv("DIT_ACCEL_FID_WEIGHTS", raising=False)
    monkeypatch.setattr(clip, "create_clip_scorer", lambda spec, device="cpu": (
        None, "CLIP score skipped: could not load it" if spec else "CLIP score skipped: no CLIP model configured"))
    settings = EvalSettings(model="tiny-shapes", prompts=["a red circle moving left"])
    kwargs = dict(lpips=False, clip_scorer=None, fid_weights=None, fid_feature=None, real_dir=None, frame_size=(8, 8))
    asked = _Scorers(settings, clip_model="org/clip-not-cached", **kwargs)
    assert asked.warnings == ["CLIP score skipped: could not load it"]
    assert _Scorers(settings, clip_model=None, **kwargs).warnings == []  # not asked: a skip line only


# ------------------------------------------------------------------ empty videos, FID batch size
@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (0, 8, 8, 3), (2, 3, 0, 8), (2, 8, 0, 3)],
                         ids=["no-frames", "no-frames-hwc", "no-rows", "no-columns-hwc"])
def test_a_video_without_pixels_is_refused_not_scored_nan(shape):
    """Before: paired_metrics of a video of no frames gave PSNR/SSIM nan (dropped from the row's means without a
    word) and temporal_report of 0-pixel frames motion nan; a 0-row frame reached torch's own padding error."""
    from dit_accel.eval.metrics import paired_metrics
    from dit_accel.eval.temporal import temporal_report

    video = np.zeros(shape, dtype=np.uint8)
    for score in (lambda: paired_metrics(video, video), lambda: temporal_report(video, video)):
        with pytest.raises(ValueError, match="has no pixels to score"):
            score()


@pytest.mark.parametrize("batch_size", [0, -1, 2.5])
def test_fid_refuses_a_batch_size_below_one(batch_size):
    """Before: 0 raised range()'s 'arg 3 must not be zero'; -1 fed no image and blamed the sets ('More than one
    sample is required')."""
    from dit_accel.eval.fid import frechet_distance
    from tests.eval.offline_models import TinyFeatures

    frames = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=f"batch_size={batch_size!r} is invalid: expected an integer >= 1"):
        frechet_distance(frames, frames, TinyFeatures(), batch_size=batch_size)
    assert frechet_distance(frames, frames, TinyFeatures(), batch_size=3) == pytest.approx(0.0, abs=1e-3)


# ------------------------------------------------------------------ --real with a file that is not an image
def test_a_real_folder_with_a_file_that_is_not_an_image_is_refused_before_the_model_loads(tmp_path, capsys,
                                                                                         no_model_load):
    """Before: only the suffixes were checked; after every row had run, FID vs real was skipped for the whole
    folder ('cannot identify image file')."""
    from PIL import Image

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(real / "good.png")
    (real / "sub" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    assert main(["eval", "--model", "tiny-shapes", "--methods", "tile", "--real", str(real), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{real / 'sub' / 'broken.jpg'} is not a readable image" in err, err
    assert not out.exists()
    (real / "sub" / "broken.jpg").unlink()
    from dit_accel.eval.fid import fid_inputs_error

    assert fid_inputs_error(None, str(real)) is None


# ------------------------------------------------------------------ grey frames in FID and LPIPS
def test_grey_frames_are_scored_as_rgb_by_fid_and_lpips():
    """to_frames takes grey frames [F, H, W, 1]; FID and LPIPS networks take 3 channels. Before, a grey set
    reached the feature network's first convolution ('expected input ... to have 3 channels, but got 1')."""
    from torch import nn

    from dit_accel.eval.fid import frechet_distance
    from dit_accel.eval.metrics import LPIPSScorer
    from tests.eval.offline_models import TinyFeatures

    g = torch.Generator().manual_seed(1)
    grey = (torch.rand(6, 16, 16, 1, generator=g) * 255).to(torch.uint8)
    rgb = grey.expand(-1, -1, -1, 3)
    other = torch.rand(6, 3, 16, 16, generator=g)
    assert frechet_distance(grey, other, TinyFeatures()) == pytest.approx(frechet_distance(rgb, other, TinyFeatures()),
                                                                          rel=1e-5)

    class ThreeChannelDistance(nn.Module):  # stands in for torchmetrics' LPIPS: refuses what it refuses
        def reset(self):
            pass

        def forward(self, a, b):
            assert a.shape[1] == 3 and b.shape[1] == 3
            return (a - b).abs().mean()

    lpips = LPIPSScorer(ThreeChannelDistance())
    noisy = (grey.int() + 20).clamp(0, 255).to(torch.uint8)
    assert torch.allclose(lpips(grey, noisy), lpips(rgb, noisy.expand(-1, -1, -1, 3)))
