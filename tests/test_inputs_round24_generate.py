"""Round 24, ``dit-accel generate`` with bad inputs: an output over its own input image, an empty prompt, an input
image the pipeline refuses, and the frame folders a failed run made."""

from __future__ import annotations

import inspect
import types

import pytest

from dit_accel.cli import generate as gen
from dit_accel.cli.generate_args import InputImage, flag_call_error
from dit_accel.cli.main import main

_SMALL = ["--steps", "1", "--frames", "5", "--height", "16", "--width", "16", "--quiet"]


def _png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    return path.read_bytes()


# ----------------------------------------------------------------------------- --out over an --image
@pytest.mark.parametrize("image, out, extra", [
    ("in.png", "in.png", []),                                # the image itself (an edit pipeline's one frame)
    ("seq_00003.png", "seq.png", []),                        # a frame of the PNG sequence seq.png writes
    ("frames/frame_00007.png", "frames", []),                # a frame (or a stale one it removes) of a folder
    ("x-vs-dense.png", "x.png", ["--side-by-side", "--method", "tile"]),  # the comparison written beside it
], ids=["same-file", "png-sequence", "frame-folder", "side-by-side"])
def test_an_output_over_the_input_image_is_refused_before_loading(tmp_path, capsys, image, out, extra):
    """Before: ``--image in.png --out in.png`` ran and replaced the user's input image with the output (and a frame
    folder's earlier frames, the input among them, were overwritten or removed as stale)."""
    data = _png(tmp_path / image)
    assert main(["generate", "--model", "tiny-flux2", *_SMALL[:2], "--quiet", "--image", str(tmp_path / image),
                 "--out", str(tmp_path / out), *extra]) == 2
    err = capsys.readouterr().err
    assert f"would overwrite --image {tmp_path / image}, the input this run reads; choose another --out" in err
    assert (tmp_path / image).read_bytes() == data  # the input as it was


def test_an_output_beside_the_input_image_is_not_refused():
    from pathlib import Path

    from dit_accel.cli.generate_args import _writes_over

    assert not _writes_over(Path("/x/in_other.png"), Path("/x/in.png"))
    assert not _writes_over(Path("/x/seq.png"), Path("/x/seq_0003.png"))  # (not a 5-digit frame name)
    assert not _writes_over(Path("/x/frames"), Path("/x/frame_00001.png"))  # (beside the folder, not in it)
    assert _writes_over(Path("/x/v.mp4"), Path("/x/v.mp4.json"))  # (its sidecar)


# ----------------------------------------------------------------------------- an empty --prompt
@pytest.mark.parametrize("prompt", ["", "   ", "\ufeff"], ids=["empty", "spaces", "byte-order-mark"])
def test_an_empty_prompt_is_refused(tmp_path, capsys, prompt):
    """Before: ``--prompt ""`` (a ``--prompt "$(cat prompt.txt)"`` of an empty file) ran an unconditioned sample
    with no word, its sidecar recording the empty prompt as the one asked for."""
    out = tmp_path / "v.mp4"
    assert main(["generate", "--model", "tiny-wan", *_SMALL, "--prompt", prompt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and "is empty: give the text to generate from" in err
    assert "leave --prompt out for the model's default prompt" in err
    assert not out.exists() and not out.with_name("v.mp4.json").exists()


# ----------------------------------------------------------------------------- the pipeline's own image check
class _Flux2Like:
    """A stand-in pipeline whose image processor checks its input as FLUX.2's does."""

    class image_processor:  # noqa: N801
        @staticmethod
        def check_image_input(image, min_side_length=64):
            if min(image.size) < min_side_length:
                raise ValueError(f"Image too small: {image.size[0]}×{image.size[1]}. Both dimensions must be at least "
                                 f"{min_side_length}px")
            return image

    def __call__(self, prompt=None, image=None, height=None, width=None, num_inference_steps=28):
        pass


def _args(*images):
    return types.SimpleNamespace(frames=None, negative_prompt=None, height=None, width=None, steps=None,
                                 guidance=None, max_sequence_length=None, _images=list(images))


def test_an_input_image_the_pipeline_refuses_is_refused_by_name_before_the_run():
    """Before: FLUX.2 (tiny-flux2) given a 16x16 ``--image`` failed with the pipeline's bare "Image too small:
    16×16. Both dimensions must be at least 64px", naming no flag or file, and only once the denoising began (after
    the dense comparison run)."""
    from PIL import Image

    pipe = _Flux2Like()
    accepts = set(inspect.signature(pipe.__call__).parameters)
    small = InputImage("small.png", Image.new("RGB", (16, 16)), "0" * 64)
    large = InputImage("large.png", Image.new("RGB", (64, 64)), "1" * 64)
    problem = flag_call_error(_args(small), pipe, accepts)
    assert problem.startswith("--image small.png: _Flux2Like refuses it: Image too small: 16×16. Both dimensions "
                              "must be at least 64px; give an image that meets this")
    assert flag_call_error(_args(large), pipe, accepts) is None
    assert flag_call_error(_args(large), types.SimpleNamespace(__call__=pipe.__call__), accepts) is None  # no check


# ----------------------------------------------------------------------------- what a failed run leaves
@pytest.mark.parametrize("side_by_side", [False, True], ids=["frames", "frames-and-comparison"])
def test_a_failed_run_removes_the_frame_folders_it_made(tmp_path, monkeypatch, side_by_side):
    """Before: a run into a new frame folder (``--out new/z``) interrupted while it wrote the frames left the empty
    folders ``new/z`` (and ``new/z-vs-dense`` with ``--side-by-side``) behind: the folder the frames go in is made by
    the writer, and only the output's parent folders were removed."""
    from dit_accel.methods import Dense

    def interrupted(args, pipe, call, method, schedule, source, quiet, is_video, out, *rest):
        out.mkdir()  # (as save_video makes a frame folder, and the comparison's beside it)
        if args.side_by_side:
            gen._side_by_side_path(out).mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "_prepare", lambda args, tiny: (None, None, None, None))
    monkeypatch.setattr(gen, "_load", lambda args, dtype, cp: (types.SimpleNamespace(), 0.0))
    monkeypatch.setattr(gen, "_method_and_schedule", lambda args, pipe, saved, parser: (Dense(), {}, "test"))
    monkeypatch.setattr(gen, "_progress", lambda *a: None)
    monkeypatch.setattr(gen, "_pipeline_call", lambda args, pipe, tiny: {"prompt": "p", "num_frames": 5})
    monkeypatch.setattr(gen, "_denoise_and_write", interrupted)
    (tmp_path / "kept").mkdir()  # a folder that was there before stays
    args = types.SimpleNamespace(model="tiny-wan", out=str(tmp_path / "new" / "z"), side_by_side=side_by_side,
                                 quiet=True, method="tile", compare_dense=None, _plan_model_note=None, _images=[])
    with pytest.raises(KeyboardInterrupt):
        gen.generate(args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
