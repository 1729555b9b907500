"""dit_accel.eval.temporal on synthetic videos: moving, frozen, looping, and a noisy still."""
import numpy as np
import pytest

from dit_accel.eval.temporal import is_frozen, loop_period, motion, temporal_error, temporal_report


def _moving(frames=8, size=32, step=3):
    """A white 8x8 square moving right by ``step`` pixels per frame on black."""
    video = np.zeros((frames, size, size, 3), np.uint8)
    for t in range(frames):
        x = 2 + step * t
        video[t, 10:18, x:x + 8] = 255
    return video


def test_moving_video_moves_and_does_not_loop():
    video = _moving()
    report = temporal_report(video, video)
    # By hand: each step uncovers 3 columns and covers 3 (8 rows): 2 * 3 * 8 * 3 channels of 1.0 over 32*32*3.
    assert report["motion"] == pytest.approx(2 * 3 * 8 / (32 * 32))
    assert not report["frozen"] and report["loop_period"] is None
    assert report["motion_ratio"] == pytest.approx(1.0) and report["temporal_error"] == 0.0


def test_frozen_video_is_detected_even_with_noise():
    rng = np.random.default_rng(0)
    still = np.repeat(_moving()[:1], 8, axis=0).astype(np.int16)
    still = np.clip(still + rng.integers(0, 2, still.shape), 0, 255).astype(np.uint8)  # sub-level noise
    assert is_frozen(still) and loop_period(still) is None
    report = temporal_report(still, _moving())
    assert report["frozen"] and report["motion_ratio"] < 0.05 and report["temporal_error"] > 0.0
    assert not is_frozen(_moving())


def test_looping_video_reports_its_period():
    base = _moving(frames=3)
    loop = np.concatenate([base, base, base[:1]])  # frames 0 1 2 0 1 2 0
    assert loop_period(loop) == 3
    assert loop_period(np.concatenate([base[:2]] * 4)) == 2  # 0 1 0 1 0 1 0 1: a two-frame flicker
    assert loop_period(_moving(frames=3)) is None  # too short to see repeats


def test_motion_and_temporal_error_by_hand():
    a = np.zeros((3, 2, 2, 3), np.float32)
    a[1] = 0.5
    a[2] = 1.0
    assert motion(a).tolist() == pytest.approx([0.5, 0.5])
    b = np.zeros_like(a)
    assert temporal_error(a, b) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="frame shapes differ"):
        temporal_error(a, b[:2])
