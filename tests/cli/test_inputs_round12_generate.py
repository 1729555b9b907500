"""Round 12, ``dit-accel generate``'s step caches and output files: the faults found, each with the test that failed
before (a silent wrong answer, or a traceback where one line belongs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dit_accel.cli.main import main
from dit_accel.io import load_video
from dit_accel.pipelines.caches import CacheSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line(capsys, command: str = "generate") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith(f"dit-accel {command}: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny_wan():
    from dit_accel.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hooks(model) -> int:
    return sum(len(m._diffusers_hook.hooks) for m in model.modules() if hasattr(m, "_diffusers_hook"))


def _call(pipe, steps=2):
    import torch

    return pipe("a cat", num_frames=5, height=32, width=32, max_sequence_length=16, num_inference_steps=steps,
                output_type="np", generator=torch.Generator().manual_seed(0)).frames


# ----------------------------------------------------------------------------- PAB's timestep ranges
def test_one_number_for_a_timestep_range_is_one_line_before_loading(tmp_path, capsys):
    """Before: ``pab:spatial_attention_timestep_skip_range=900`` passed the check and failed at the first cached
    step with a raw ``TypeError: 'int' object is not subscriptable`` from Diffusers' hook."""
    assert main(["generate", "--model", "tiny-wan", "--method", "tile", "--cache",
                 "pab:spatial_attention_timestep_skip_range=900", "--out", str(tmp_path / "x.mp4")]) == 2
    line = _one_line(capsys)
    assert "pab:spatial_attention_timestep_skip_range=900: spatial_attention_timestep_skip_range must be 2 numbers " \
           "separated by /" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value, problem", [("1/2/3", "must be 2 numbers"), ("800/100", "with LOW < HIGH"),
                                            ("500/500", "with LOW < HIGH")])
def test_a_timestep_range_that_skips_nothing_is_refused(value, problem):
    """Before: ``800/100`` (the bounds swapped) and ``500/500`` are empty ranges (Diffusers skips where
    LOW < t < HIGH): PAB ran every call, in silence; ``1/2/3`` ran as 1/2, its third number dropped."""
    with pytest.raises(ValueError, match=problem):
        CacheSpec.parse(f"pab:cross_attention_timestep_skip_range={value}")


def test_a_timestep_range_in_order_is_taken():
    assert CacheSpec.parse("pab:spatial_attention_timestep_skip_range=-1/900.5").options == {
        "spatial_attention_timestep_skip_range": (-1, 900.5)}


# ----------------------------------------------------------------------------- module patterns that match nothing
@pytest.mark.parametrize("cache, matcher", [("taylorseer:cache_identifiers=transformer_blocks.*attn1", "re.fullmatch"),
                                            ("pab:spatial_attention_block_identifiers=attn_1", "re.search")])
def test_module_patterns_that_match_no_module_are_refused_and_change_nothing(tiny_wan, cache, matcher):
    """Before: a pattern that matches none of the model's module names (FLUX's ``transformer_blocks`` on Wan) hooked nothing:
    the whole run was uncached and its report said "skipped 0 of 16" as if the cache had found nothing to skip."""
    from dit_accel.pipelines.caches import enable_cache

    before = _call(tiny_wan)
    with pytest.raises(ValueError) as err:
        with enable_cache(tiny_wan, CacheSpec.parse(cache), 2):
            pass
    text = str(err.value)
    assert f"--cache {cache}: " in text and "hooked no module of WanTransformer3DModel" in text
    assert matcher in text and "blocks.0.attn1" in text
    assert not tiny_wan.transformer.is_cache_enabled and _hooks(tiny_wan.transformer) == 0
    import numpy as np

    np.testing.assert_array_equal(_call(tiny_wan), before)  # the model as it was


@pytest.mark.parametrize("cache", ["taylorseer:cache_identifiers=blocks.0.attn1",
                                   "pab:spatial_attention_block_identifiers=blocks.1"])
def test_module_patterns_that_match_are_hooked(tiny_wan, cache):
    from dit_accel.pipelines.caches import enable_cache

    with enable_cache(tiny_wan, CacheSpec.parse(cache), 2):
        assert _hooks(tiny_wan.transformer) == 1
    assert _hooks(tiny_wan.transformer) == 0


def test_module_patterns_that_match_nothing_from_the_command_line(tmp_path, capsys):
    assert main(["generate", "--model", "tiny-wan", "--method", "tile", "--steps", "2", "--quiet", "--cache",
                 "taylorseer:cache_identifiers=nomatch", "--out", str(tmp_path / "x.mp4")]) == 2
    assert "TaylorSeerCacheConfig hooked no module of WanTransformer3DModel" in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- MagCache's step count
def test_magcache_steps_other_than_the_runs_are_refused(tiny_wan):
    """Before: ``magcache:num_inference_steps=8`` on a 4-step run spread the ratios over 8 steps and read the first
    4 of them (the cache's retention steps too), in silence."""
    from dit_accel.pipelines.caches import enable_cache

    with pytest.raises(ValueError, match=r"num_inference_steps=8 but the run makes 4 steps; .* or give 4"):
        with enable_cache(tiny_wan, CacheSpec.parse("magcache:mag_ratios=flux,num_inference_steps=8"), 4):
            pass
    assert not tiny_wan.transformer.is_cache_enabled


def test_magcache_steps_equal_to_the_runs_are_taken(tiny_wan):
    from dit_accel.pipelines.caches import enable_cache

    with enable_cache(tiny_wan, CacheSpec.parse("magcache:mag_ratios=flux,num_inference_steps=4"), 4):
        assert tiny_wan.transformer.is_cache_enabled


# ----------------------------------------------------------------------------- --plan beside --weights
def _no_loading(monkeypatch):
    import dit_accel.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def test_another_plan_beside_a_plan_trained_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """Before: tiny-shapes-63's LoRA (trained under its plan) with ``--plan`` tiny-shapes' plan loaded the model,
    then apply() refused in a line that pointed a command-line user to ``dit_accel.apply(pipe,
    dit_accel.load_method(...))``."""
    from dit_accel.models.tiny_shapes import SHAPES_MODELS

    _no_loading(monkeypatch)
    weights = SHAPES_MODELS["tiny-shapes-63"].plan_weights
    assert main(["generate", "--model", "tiny-shapes-63", "--weights", str(weights), "--plan",
                 str(SHAPES_MODELS["tiny-shapes"].plan), "--out", str(tmp_path / "x.mp4")]) == 2
    line = _one_line(capsys)
    assert f"--plan {SHAPES_MODELS['tiny-shapes'].plan} disagrees with --weights {weights}, which was trained under " \
           "the calibrated plan " in line and "drop --plan" in line and "dit_accel.apply" not in line
    assert list(tmp_path.iterdir()) == []


def test_a_plan_beside_a_method_trained_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """A folder trained for one method (here SLA; its record is what is read) with a ``--plan``: the same."""
    import json

    from dit_accel.checkpoints.finetuned import METHOD_FILE
    from dit_accel.methods import SLA
    from dit_accel.models.tiny_shapes import SHAPES_MODELS

    _no_loading(monkeypatch)
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / METHOD_FILE).write_text(json.dumps({"format": 1, "method": SLA(topk=0.5).to_dict(),
                                                  "model": "tiny-shapes"}))
    assert main(["generate", "--model", "tiny-shapes", "--weights", str(folder), "--plan",
                 str(SHAPES_MODELS["tiny-shapes"].plan), "--out", str(tmp_path / "x.mp4")]) == 2
    assert f"disagrees with --weights {folder}, which was trained for SLA(topk=0.5" in _one_line(capsys)


def test_the_folders_own_plan_beside_it_is_taken(monkeypatch):
    """``--plan`` repeating the plan the folder was trained under runs (checked here up to the model's loading)."""
    from dit_accel.cli.generate_args import _check_plan_with_weights
    from dit_accel.checkpoints.finetuned import load_method
    from dit_accel.models.tiny_shapes import SHAPES_MODELS
    from dit_accel.plans.sparse_plan import SparsePlan

    shapes = SHAPES_MODELS["tiny-shapes-63"]
    _check_plan_with_weights(None, SparsePlan.load(shapes.plan), load_method(shapes.plan_weights))


# ----------------------------------------------------------------------------- an interrupted --side-by-side
#: --out forms: a file, a PNG sequence beside ``x.png``, a frame folder; the comparison beside each (as
#: load_video takes it) and its first file.
FORMS = {"mp4": ("x.mp4", "x-vs-dense.mp4", "x-vs-dense.mp4"),
         "png-sequence": ("x.png", "x-vs-dense.png", "x-vs-dense_00000.png"),
         "frame-folder": ("x", "x-vs-dense", "x-vs-dense/frame_00000.png")}


def _files_of(folder: Path) -> dict:
    """Every file under ``folder`` but the lock files: {relative path: bytes}."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def _side_by_side_args(out: Path, frames: int = 5) -> list:
    return ["generate", "--model", "tiny-wan", "--method", "tile", "--frames", str(frames), "--height", "32",
            "--width", "32", "--steps", "2", "--quiet", "--side-by-side", "--out", str(out)]


@pytest.mark.parametrize("form", sorted(FORMS))
def test_an_interrupted_side_by_side_leaves_the_earlier_runs_files_as_they_were(tmp_path, monkeypatch, form):
    """Before: a second ``--side-by-side`` run into the same --out, interrupted (Ctrl-C) while writing its
    comparison, left the new x.mp4 beside the first run's x-vs-dense.mp4 (dense against the first run's frames),
    and no sidecar to say whose it was. Then (round 12): the new video alone, no comparison, no sidecar. Round 15:
    one set for a file output; PNG frames kept the old order. Now the video, its comparison and the sidecar are
    one set in every form, and the first run's files stay as they were, byte for byte."""
    import dit_accel.videos as videos
    from dit_accel.atomic_files import is_temp_name

    name, comparison, first = FORMS[form]
    out, sidecar = tmp_path / name, tmp_path / f"{name}.json"
    assert main(_side_by_side_args(out, frames=9)) == 0 and (tmp_path / first).is_file()
    before = _files_of(tmp_path)
    writer = "_write_mp4" if form == "mp4" else "_write_png"
    write = getattr(videos, writer)

    def interrupted(frames, path, *rest):
        if "-vs-dense" in str(path):
            raise KeyboardInterrupt
        return write(frames, path, *rest)

    monkeypatch.setattr(videos, writer, interrupted)
    assert main(_side_by_side_args(out) + ["--seed", "1"]) == 130  # (5 frames: fewer than the first run's 9)
    assert _files_of(tmp_path) == before
    monkeypatch.setattr(videos, writer, write)
    assert main(_side_by_side_args(out) + ["--seed", "1"]) == 0  # and a run that finishes replaces them all
    assert json.loads(sidecar.read_text())["settings"]["seed"] == 1
    assert load_video(out).shape[0] == load_video(tmp_path / comparison).shape[0] == 5  # none of the first run's 9
    after = _files_of(tmp_path)
    assert not [k for k in after if "commit" in k or is_temp_name(k)], sorted(after)
    assert after[first] != before[first]


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("reader", [False, True], ids=["next-run", "load_video-first"])
def test_a_side_by_side_set_killed_after_its_commit_point_is_finished_by_the_next_run(tmp_path, monkeypatch, reader,
                                                                                       form):
    """A run killed between the set's commit point (its journal) and the renames: the next run at that --out, or
    ``load_video`` of the video, puts the committed set in place before anything reads it, so no run's video
    stays beside another's record."""
    import dit_accel.atomic_files as atomic_files
    from dit_accel.atomic_files import commit_journal

    name, _, first = FORMS[form]
    out, sidecar, comparison = tmp_path / name, tmp_path / f"{name}.json", tmp_path / first
    args = _side_by_side_args(out)
    finish = atomic_files.finish_commit

    def killed_after_the_journal(journal):
        if Path(journal).exists():
            raise KeyboardInterrupt  # (what a kill leaves: the journal and the staged files)
        return finish(journal)

    monkeypatch.setattr(atomic_files, "finish_commit", killed_after_the_journal)
    assert main(args) == 130
    assert commit_journal(out).exists() and not comparison.exists() and not sidecar.exists()
    monkeypatch.setattr(atomic_files, "finish_commit", finish)
    if reader:  # a reader of the video finishes the set too
        assert load_video(out).shape[0] == 5
        assert comparison.is_file() and json.loads(sidecar.read_text())["settings"]["seed"] == 0
        assert not commit_journal(out).exists()
    args_plain = [a for a in args if a != "--side-by-side"]
    assert main(args_plain + ["--seed", "1"]) == 0
    record = json.loads(sidecar.read_text())
    assert record["settings"]["seed"] == 1 and not (record.get("compare_dense") or {}).get("side_by_side")
    assert not commit_journal(out).exists() and not comparison.exists()  # the committed comparison: removed as earlier


# ----------------------------------------------------------------------------- --image with an EXIF turn
def test_an_image_with_an_exif_turn_is_read_upright(tmp_path):
    """Before: a phone's portrait photo (stored sideways, EXIF orientation 6: turn 90 degrees clockwise to show)
    reached the image-to-video pipeline sideways; viewers and Diffusers' ``load_image`` show it upright."""
    import numpy as np
    from PIL import Image

    from dit_accel.cli.generate_args import _read_image

    upright = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 2  # 4 rows x 6 columns, each pixel its own
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # a quarter turn anticlockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored image turned 90 degrees clockwise is the picture
    stored.save(tmp_path / "photo.png", exif=exif)
    read = _read_image(str(tmp_path / "photo.png"))
    np.testing.assert_array_equal(np.asarray(read.image), upright)
    assert read.image.size == (6, 4)


def test_an_image_without_exif_is_read_as_stored(tmp_path):
    import numpy as np
    from PIL import Image

    from dit_accel.cli.generate_args import _read_image

    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    np.testing.assert_array_equal(np.asarray(_read_image(str(tmp_path / "plain.png")).image), pixels)


# ----------------------------------------------------------------------------- --side-by-side as PNG frames
def test_side_by_side_png_frames_are_named_as_written(tmp_path, capsys):
    """Before: ``--out g.png --side-by-side`` on a video printed "side by side (left dense, right tile):
    g-vs-dense.png", a file that is not there: the frames are g-vs-dense_00000.png ..."""
    out = tmp_path / "g.png"
    assert main(["generate", "--model", "tiny-wan", "--method", "tile", "--frames", "5", "--height", "32", "--width",
                 "32", "--steps", "1", "--quiet", "--side-by-side", "--out", str(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("side by side"))
    first, last = tmp_path / "g-vs-dense_00000.png", tmp_path / "g-vs-dense_00004.png"
    assert line.endswith(f": 5 frames {first} .. {last.name}") and first.is_file() and last.is_file()
    assert not (tmp_path / "g-vs-dense.png").exists()


# ----------------------------------------------------------------------------- an output named like a comparison
def test_a_later_runs_video_at_the_comparisons_path_is_not_removed(tmp_path):
    """Before: ``--out a.mp4 --side-by-side``, then ``--out a-vs-dense.mp4`` (another run's video, with its sidecar),
    then ``--out a.mp4`` again: the third run removed a-vs-dense.mp4, the second run's video, because the first
    run's record named that path as its comparison; its sidecar stayed, naming a video that was gone."""
    import json

    from dit_accel.cli.generate_report import _remove_earlier_side_by_side

    out, other = tmp_path / "a.mp4", tmp_path / "a-vs-dense.mp4"
    earlier = json.dumps({"output_shape": [5, 32, 32, 3], "compare_dense": {"side_by_side": str(other)}}).encode()
    other.write_bytes(b"the second run's video")
    (tmp_path / "a-vs-dense.mp4.json").write_text("{}")
    _remove_earlier_side_by_side(earlier, out)
    assert other.read_bytes() == b"the second run's video"
    (tmp_path / "a-vs-dense.mp4.json").unlink()  # the comparison the first run wrote, with no sidecar: removed
    _remove_earlier_side_by_side(earlier, out)
    assert not other.exists()


# ----------------------------------------------------------------------------- PAB under classifier-free guidance
def test_pab_reuses_each_guidance_branchs_own_attention(tiny_wan):
    """Before: Diffusers' PAB keeps one state per attention module, and WanPipeline calls the transformer once per
    guidance branch (cond, then uncond): every unconditional call inside the skip range returned the conditional
    call's attention output of the same step (the guidance difference at that layer gone), counted as a skip.
    PAB's definition, written out here: each branch recomputes every ``block_skip_range`` of its own calls and
    reuses its own last output in between."""
    import torch

    from dit_accel.pipelines.caches import enable_cache

    outputs = []
    hook = tiny_wan.transformer.blocks[1].attn1.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        with enable_cache(tiny_wan, CacheSpec.parse("pab:spatial_attention_timestep_skip_range=-1/2000"), 4):
            tiny_wan("a cat", num_frames=5, height=32, width=32, max_sequence_length=16, num_inference_steps=4,
                     guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(outputs) == 8  # 4 steps x (cond, uncond)
    reused = {(i, j) for i in range(8) for j in range(i) if outputs[i] is outputs[j]}
    # branch b's call at step s is call 2s+b; steps 1 and 3 of each branch reuse its own step 0 and 2
    assert reused == {(2, 0), (3, 1), (6, 4), (7, 5)}
    assert not any(torch.equal(outputs[2 * s], outputs[2 * s + 1]) for s in (0, 2))  # the branches differ
