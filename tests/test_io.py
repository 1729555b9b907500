"""save_video / load_video round trips: frame count and size must come back exactly."""
import numpy as np
import pytest
from PIL import Image

from dit_accel.io import load_video, save_video, to_uint8_frames


def _smooth(frames, height, width, seed=0):
    """Gradients moving over time: compressible, so mp4 error stays small."""
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    phase = rng.random(3) * 6.28
    chans = [0.5 + 0.4 * np.sin(0.3 * t + 0.15 * y + 0.1 * x + p) for p in phase]
    return np.stack(chans, axis=-1).astype(np.float32)  # float [0, 1]


SIZES = [(5, 33, 47), (9, 32, 48), (1, 20, 30)]
FORMATS = [".mp4", ".gif", ".png", ""]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f or "folder")
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_round_trip_keeps_frames_and_size(tmp_path, size, fmt):
    frames = _smooth(*size)
    path = save_video(frames, tmp_path / f"video{fmt}", fps=8)
    back = load_video(path)
    assert back.dtype == np.uint8 and back.shape == (*size, 3)
    ref = to_uint8_frames(frames).astype(np.int16)
    err = np.abs(back.astype(np.int16) - ref).mean()
    if fmt in (".png", ""):
        assert err == 0
    else:  # lossy: H.264 / 256-colour palette
        assert err < 12, err


def test_gif_keeps_identical_consecutive_frames(tmp_path):
    frames = _smooth(6, 16, 24)
    frames[2:5] = frames[1]  # Pillow merges identical frames; load_video must expand them
    back = load_video(save_video(frames, tmp_path / "v.gif", fps=16))
    assert back.shape == (6, 16, 24, 3)
    assert np.array_equal(back[1], back[4]) and not np.array_equal(back[4], back[5])


def test_mp4_odd_size_is_exact_size(tmp_path):
    back = load_video(save_video(_smooth(3, 17, 31), tmp_path / "odd.mp4"))
    assert back.shape == (3, 17, 31, 3)


def test_input_kinds_agree(tmp_path):
    frames = _smooth(3, 16, 16)
    u8 = to_uint8_frames(frames)
    pil = [Image.fromarray(f) for f in u8]
    import torch

    for kind in (u8, pil, list(u8), torch.from_numpy(frames), frames[None]):
        assert np.array_equal(to_uint8_frames(kind), u8)
    rgba = np.concatenate([u8, np.full((*u8.shape[:3], 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(to_uint8_frames(rgba), u8)
    single = save_video(u8[0], tmp_path / "image.png")
    assert load_video(single).shape == (1, 16, 16, 3)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((2, 8, 8, 5), np.uint8), "shape"),
    ([], "empty"),
    (np.zeros((0, 8, 8, 3), np.uint8), "empty"),
], ids=["five-channels", "empty-list", "zero-frames"])
def test_bad_frames_raise_clear_errors(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        save_video(bad, tmp_path / "x.mp4")


def test_bad_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown suffix"):
        save_video(np.zeros((1, 8, 8, 3), np.uint8), tmp_path / "x.avi")
    with pytest.raises(FileNotFoundError):
        load_video(tmp_path / "missing.mp4")


def test_nan_frames_are_refused_not_painted_black(tmp_path):
    import numpy as np

    from dit_accel.errors import NonFiniteOutputError
    from dit_accel.videos import save_video

    frames = np.full((3, 8, 8, 3), 0.5, dtype=np.float32)
    frames[1, 2, 3, 0] = np.nan
    frames[2, 0, 0, 1] = np.inf
    out = tmp_path / "v.mp4"
    with pytest.raises(NonFiniteOutputError, match=r"2 non-finite values \(NaN or inf\) in 2 of 3 frames \(first: "
                                                   r"frame 1\); nothing was saved"):
        save_video(frames, out)
    assert not out.exists()
