"""``dit-accel generate --image``: the input image of image-to-video and edit pipelines.

The pipeline is a tiny ``WanImageToVideoPipeline`` in the Wan 2.2 TI2V layout (``expand_timesteps``: the image's
latent is the first latent frame; no CLIP image encoder), built from tiny-wan's components and saved to a folder
that ``--model`` loads: offline, a second per run.
"""

from __future__ import annotations

import hashlib
import inspect
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dit_accel.cli.main import main

CALL = ["--frames", "5", "--height", "64", "--width", "64", "--steps", "2", "--max-sequence-length", "16",
        "--prompt", "a cat", "--seed", "3"]


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """A folder holding a tiny WanImageToVideoPipeline, and two input images (odd sizes, not the call's 64x64)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    from dit_accel.models.tiny._common import TINY_WAN_TRANSFORMER, tiny_wan_parts

    root = tmp_path_factory.mktemp("i2v")
    with torch.random.fork_rng(devices=[]):
        parts = tiny_wan_parts(0)
        transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER).eval()
    pipe = WanImageToVideoPipeline(**parts, transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   image_encoder=None, image_processor=None, expand_timesteps=True)
    pipe.save_pretrained(root / "pipe")
    images = []
    for seed in (0, 1):
        path = root / f"in{seed}.png"
        Image.fromarray((np.random.RandomState(seed).rand(40, 56, 3) * 255).astype(np.uint8)).save(path)
        images.append(path)
    return root / "pipe", images


def _generate(tmp_path, model, images, *extra, name="out"):
    """Run generate into a folder of PNG frames (lossless); its sidecar and frames."""
    out = tmp_path / name
    argv = ["generate", "--model", str(model), *CALL, "--out", str(out), "--quiet", *extra]
    for image in images:
        argv += ["--image", str(image)]
    assert main(argv) == 0
    record = json.loads((tmp_path / f"{name}.json").read_text())
    return record, np.stack([np.asarray(Image.open(f)) for f in record["output"]])


def _one_line(capsys) -> str:
    """The error, one line (Diffusers' progress bars of loading a local folder aside: not generate's output)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and "Traceback" not in err and lines[0].startswith("dit-accel generate: error: "), err
    return lines[0]


def test_the_image_reaches_the_pipeline_and_the_sidecar_records_it(i2v, tmp_path):
    from dit_accel.models.loading import load_pipeline
    from dit_accel.videos import to_uint8_frames

    folder, (first, second) = i2v
    record, frames = _generate(tmp_path, folder, [first], "--method", "dense", name="first")
    _, other = _generate(tmp_path, folder, [second], "--method", "dense", name="second")
    assert np.abs(frames.astype(int) - other.astype(int)).max() > 10  # another image, another video

    pipe = load_pipeline(str(folder))
    pipe.set_progress_bar_config(disable=True)
    direct = pipe(prompt="a cat", image=Image.open(first).convert("RGB"), num_frames=5, height=64, width=64,
                  num_inference_steps=2, max_sequence_length=16, generator=torch.Generator().manual_seed(3),
                  output_type="np").frames[0]
    assert np.array_equal(frames, to_uint8_frames(direct))  # the same call

    digest = hashlib.sha256(first.read_bytes()).hexdigest()
    assert record["pipeline"] == "WanImageToVideoPipeline"
    assert record["settings"]["images"] == [{"path": str(first), "sha256": digest, "size": [56, 40]}]
    assert record["settings"]["pipeline_call"]["image"] == str(first)
    assert record["provenance"]["images_sha256"] == [digest]


def test_the_dense_run_of_compare_dense_and_side_by_side_gets_the_same_image(i2v, tmp_path, monkeypatch):
    from diffusers import WanImageToVideoPipeline

    folder, (first, _) = i2v
    seen = []
    real = WanImageToVideoPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(np.asarray(kwargs["image"]))
        return real(self, *args, **kwargs)

    spy.__signature__ = inspect.signature(real)  # generate reads the call's parameters
    monkeypatch.setattr(WanImageToVideoPipeline, "__call__", spy)
    record, _ = _generate(tmp_path, folder, [first], "--method", "tile", "--tile", "1,2,2", "--window", "1,1,1",
                          "--side-by-side")
    assert record["compare_dense"]["side_by_side"] and record["compare_dense"]["psnr_db"] is not None
    assert len(seen) >= 3  # dense warm-up and run, sparse warm-up and run
    expected = np.asarray(Image.open(first).convert("RGB"))
    assert all(np.array_equal(image, expected) for image in seen)


def test_several_images_go_as_one_list_to_a_pipeline_that_takes_several(tmp_path):
    """Several --image are one list of references only for the pipelines that take them (checked on a stub)."""
    from dit_accel.cli.generate import _pipeline_call
    from dit_accel.cli.generate_args import _check_flags
    from dit_accel.cli.main import build_parser

    class QwenImageEditPlusPipeline:  # the name decides; the call takes an image like the real one
        def __call__(self, prompt=None, image=None, height=None, width=None, num_inference_steps=50):
            raise AssertionError("not called")

    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"{seed}.png")
        Image.new("RGB", (8 + seed, 8), (seed * 200, 0, 0)).save(paths[-1])
    args = build_parser("generate").parse_args(["generate", "--model", "some/folder", "--out", str(tmp_path / "o.png"),
                                      "--image", str(paths[0]), "--image", str(paths[1])])
    _check_flags(args)
    call = _pipeline_call(args, QwenImageEditPlusPipeline(), tiny=False)
    assert [image.size for image in call["image"]] == [(8, 8), (9, 8)]
    args = build_parser("generate").parse_args(["generate", "--model", "some/folder", "--out", str(tmp_path / "o.png"),
                                      "--image", str(paths[1])])
    _check_flags(args)
    assert isinstance(_pipeline_call(args, QwenImageEditPlusPipeline(), tiny=False)["image"], Image.Image)


@pytest.fixture
def no_model_load(monkeypatch):
    from dit_accel.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(loading, "load_pipeline", refuse)


@pytest.mark.parametrize("name, content, said", [
    ("missing.png", None, "--image {path}: no such file"),
    ("notes.png", b"not an image", "--image {path}: not an image PIL can read"),
    ("cut.png", "truncated", "--image {path}: unreadable image"),
], ids=["missing", "not-an-image", "truncated"])
def test_a_bad_image_file_is_refused_before_the_model_loads(name, content, said, tmp_path, capsys, no_model_load):
    path = tmp_path / name
    if content == "truncated":
        Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif content is not None:
        path.write_bytes(content)
    assert main(["generate", "--model", "tiny-wan", "--image", str(path), "--out", str(tmp_path / "o.mp4")]) == 2
    assert said.format(path=path) in _one_line(capsys)
    assert not (tmp_path / "o.mp4").exists()


def test_a_pipeline_without_an_image_parameter_refuses_the_image(i2v, tmp_path, capsys):
    _, (first, _) = i2v
    assert main(["generate", "--model", "tiny-wan", "--image", str(first), "--out", str(tmp_path / "o.mp4"),
                 "--quiet"]) == 2
    err = _one_line(capsys)
    assert "WanPipeline takes no input image: use an image-to-video pipeline such as " \
           "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers" in err
    assert not (tmp_path / "o.mp4").exists()


def test_several_images_for_a_pipeline_that_takes_one_are_refused(i2v, tmp_path, capsys):
    folder, (first, second) = i2v
    assert main(["generate", "--model", str(folder), "--method", "dense", "--image", str(first), "--image",
                 str(second), "--out", str(tmp_path / "o.mp4"), "--quiet", *CALL]) == 2
    assert "WanImageToVideoPipeline takes one input image; got 2 --image" in _one_line(capsys)
    assert not (tmp_path / "o.mp4").exists()
