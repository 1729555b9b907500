"""The ground-truth metric: ~100 % on rendered clips, and each corruption fails the criterion it breaks."""
import numpy as np
import pytest

from dit_accel.eval.groundtruth import parse_prompt, score_many, score_video
from dit_accel.models.clips import COLOURS, DIRECTIONS, PROMPTS, SHAPES, make_prompt, render_clip


def test_parse_prompt():
    assert parse_prompt("a red circle moving left") == ("red", "circle", "left")
    assert parse_prompt("  A Yellow square moving down. ") == ("yellow", "square", "down")
    for bad in ("a red circle", "a purple circle moving left", "a red cube moving up", "a red circle moving sideways", None):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_prompts_follow_the_grammar():
    assert len(PROMPTS) == len(set(PROMPTS)) == 32
    assert {"red", "green", "blue", "yellow"} <= set(COLOURS)
    assert set(SHAPES) == {"square", "circle"} and set(DIRECTIONS) == {"left", "right", "up", "down"}
    assert all(parse_prompt(p) for p in PROMPTS)


def test_render_clip_is_deterministic_and_in_range():
    a = render_clip("green", "square", "up", seed=5, frames=7, height=48, width=64)
    assert a.shape == (7, 48, 64, 3) and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, render_clip("green", "square", "up", seed=5, frames=7, height=48, width=64))
    assert not np.array_equal(a, render_clip("green", "square", "up", seed=6, frames=7, height=48, width=64))
    with pytest.raises(ValueError):
        render_clip("purple", "square", "up")


@pytest.mark.parametrize("frames,height,width", [(7, 48, 48), (9, 32, 64), (17, 96, 96)])
def test_rendered_clips_score_perfectly(frames, height, width):
    # Every prompt twice at the model's size; a third of them once at other sizes.
    jobs = [(p, s) for s in (0, 1) for p in PROMPTS] if (frames, height, width) == (7, 48, 48) else \
        [(p, 2) for p in PROMPTS[::3]]
    videos = [render_clip(*parse_prompt(p), seed=s, frames=frames, height=height, width=width) for p, s in jobs]
    scores = score_many(videos, [p for p, _ in jobs])
    assert scores == {"colour": 1.0, "shape": 1.0, "motion": 1.0, "consistency": 1.0, "all": 1.0, "n": len(videos)}


def test_input_formats_agree():
    from PIL import Image

    video = render_clip("blue", "circle", "right", seed=3)
    uint8 = (video * 255).round().astype(np.uint8)
    prompt = "a blue circle moving right"
    expected = score_video(video, prompt)
    for frames in (uint8, [Image.fromarray(f) for f in uint8]):
        got = score_video(frames, prompt)
        assert {k: got[k] for k in ("colour", "shape", "direction")} == {k: expected[k] for k in ("colour", "shape", "direction")}
        assert got["all_ok"]
    with pytest.raises(ValueError):
        score_video(video[..., :2], prompt)
    with pytest.raises(ValueError):
        score_many([video], [])


def _failed(result):
    return {k for k in ("colour_ok", "shape_ok", "motion_ok", "consistent") if not result[k]}


def test_wrong_colour_fails_colour_only():
    for true, claimed in (("blue", "red"), ("red", "yellow"), ("green", "blue"), ("yellow", "green")):
        result = score_video(render_clip(true, "square", "left", seed=1), make_prompt(claimed, "square", "left"))
        assert result["colour"] == true and _failed(result) == {"colour_ok"}


def test_wrong_shape_fails_shape_only():
    for true, claimed in (("square", "circle"), ("circle", "square")):
        result = score_video(render_clip("red", true, "down", seed=2), make_prompt("red", claimed, "down"))
        assert result["shape"] == true and _failed(result) == {"shape_ok"}


def test_static_and_reversed_motion_fail_motion_only():
    video = render_clip("yellow", "circle", "up", seed=4)
    static = score_video(np.repeat(video[:1], len(video), axis=0), "a yellow circle moving up")
    assert static["direction"] == "static" and _failed(static) == {"motion_ok"}
    reversed_ = score_video(video[::-1], "a yellow circle moving up")
    assert reversed_["direction"] == "down" and _failed(reversed_) == {"motion_ok"}


def _square_moving(dx: float, dy: float, frames: int = 7, size: int = 48):
    """A red 10x10 square on grey whose centre travels (dx, dy) pixels in a straight line."""
    video = np.full((frames, size, size, 3), 0.5, dtype=np.float32)
    for i in range(frames):
        x = 12 + dx * i / (frames - 1)
        y = size - 22 + dy * i / (frames - 1)
        video[i, int(round(y)):int(round(y)) + 10, int(round(x)):int(round(x)) + 10] = (0.9, 0.15, 0.15)
    return video


@pytest.mark.parametrize("dx, dy, seen, ok", [
    (13.6, -2.5, "right", True),    # dense's sample on the default prompt: 10 degrees off the axis
    (12.9, -12.0, "up-right", False),  # the drift the old rule passed: as far up as right, 43 degrees off
    (14.0, -7.0, "right", True),    # 27 degrees: inside the 30-degree bound
    (14.0, -9.0, "up-right", False),  # 33 degrees: outside it
    (-2.0, -14.0, "up", True),
], ids=["dense-sample", "diagonal-drift", "27deg", "33deg", "up"])
def test_motion_off_the_prompts_axis_fails(dx, dy, seen, ok):
    prompt = "a red square moving " + ("up" if seen == "up" else "right")
    result = score_video(_square_moving(dx, dy), prompt)
    assert result["direction"] == seen and result["motion_ok"] is ok
    assert _failed(result) == (set() if ok else {"motion_ok"})


def test_two_objects_fail_consistency():
    video = render_clip("red", "circle", "left", seed=0)
    rows = np.nonzero(video.max(-1) - video.min(-1) > 0.3)[1]
    top = 1 if rows.min() >= 48 - rows.max() else 39  # a second, small object on the free side of the path
    video[:, top:top + 8, 2:10] = COLOURS["red"]
    result = score_video(video, "a red circle moving left")
    assert result["objects_per_frame"] == [2] * 7
    assert _failed(result) == {"consistent"}


def test_vanishing_or_growing_object_fails_consistency():
    video = render_clip("green", "square", "right", seed=1)
    grey = video[..., :1].min() * np.ones_like(video[0])
    vanished = video.copy()
    vanished[3] = grey
    assert "consistent" in _failed(score_video(vanished, "a green square moving right"))
    growing = video.copy()
    growing[-1] = grey
    growing[-1, 4:44, 4:44] = COLOURS["green"]
    assert "consistent" in _failed(score_video(growing, "a green square moving right"))


def test_blank_video_fails_everything():
    blank = np.full((7, 48, 48, 3), 0.3, dtype=np.float32)
    result = score_video(blank, "a red circle moving left")
    assert result["colour"] is None and result["objects_per_frame"] == [0] * 7
    assert _failed(result) == {"colour_ok", "shape_ok", "motion_ok", "consistent"} and not result["all_ok"]
