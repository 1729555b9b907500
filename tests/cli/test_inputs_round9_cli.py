"""Round-9 input audit of ``dit-accel generate --image``: the faults found, each with the test that failed before.

The pipeline is test_generate_image's tiny ``WanImageToVideoPipeline`` (Wan 2.2 TI2V layout) saved to a folder."""

from __future__ import annotations

from dit_accel.cli.main import main
from tests.cli.test_generate_image import CALL, _one_line, i2v  # noqa: F401  (i2v: the module's fixture)


def test_an_image_to_video_pipeline_without_image_asks_for_one(i2v, tmp_path, capsys):  # noqa: F811
    """WanImageToVideoPipeline's call requires ``image``: without --image, generate failed after the load with the
    call's TypeError traceback ("missing 1 required positional argument: 'image'")."""
    folder, _ = i2v
    assert main(["generate", "--model", str(folder), "--method", "dense", "--out", str(tmp_path / "o.mp4"), "--quiet",
                 *CALL]) == 2
    assert "WanImageToVideoPipeline needs an input image: pass --image FILE" in _one_line(capsys)
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "o.json").exists()


def test_an_empty_image_path_is_named_as_empty(tmp_path, capsys):
    """``--image ""`` (an unset shell variable): refused as "cannot read it (Is a directory)" before, the current
    folder's error."""
    assert main(["generate", "--model", "tiny-wan", "--image", "", "--out", str(tmp_path / "o.mp4")]) == 2
    assert "--image '': an empty path; give an image file" in _one_line(capsys)


def test_a_pipeline_taking_images_gets_them_as_one_list(tmp_path):
    """JoyImageEditPlusPipeline takes its references as ``images=`` (a flat list: one sample, several references):
    --image was refused with "takes no input image", which is not so (checked on a stub of its call)."""
    from PIL import Image

    from dit_accel.cli.generate import _pipeline_call
    from dit_accel.cli.generate_args import _check_flags
    from dit_accel.cli.generate_report import _image_argument
    from dit_accel.cli.main import build_parser

    class JoyImageEditPlusPipeline:  # the call's parameters as the real one's (images: list, optional)
        def __call__(self, prompt=None, images=None, height=None, width=None, num_inference_steps=40):
            raise AssertionError("not called")

    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"{seed}.png")
        Image.new("RGB", (8 + seed, 8), (seed * 200, 0, 0)).save(paths[-1])
    for given in (paths[:1], paths):
        argv = ["generate", "--model", "some/folder", "--out", str(tmp_path / "o.png")]
        for path in given:
            argv += ["--image", str(path)]
        args = build_parser("generate").parse_args(argv)
        _check_flags(args)
        call = _pipeline_call(args, JoyImageEditPlusPipeline(), tiny=False)
        assert "image" not in call and [image.size for image in call["images"]] == [(8 + i, 8) for i in
                                                                                     range(len(given))]
        assert _image_argument(args, call) == {"images": [str(p) for p in given]}
