"""Metric sanity: PSNR/SSIM, FID with a tiny feature net, CLIP score with a tiny offline CLIP, skip lines."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from dit_accel.eval.clip import CLIP_ENV, ClipScorer, create_clip_scorer
from dit_accel.eval.fid import FID_ENV, create_fid_feature, frechet_distance
from dit_accel.eval.metrics import PSNR_CAP, LPIPSScorer, paired_metrics, psnr_per_frame, ssim_per_frame, to_frames
from tests.eval.offline_models import TinyFeatures, tiny_clip


def _video(frames=4, h=33, w=47, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(frames, 3, h, w, generator=g)


def _gray(frames=4, h=64, w=64):
    return torch.full((frames, 3, h, w), 0.5)


# ------------------------------------------------------------------ PSNR / SSIM
@pytest.mark.parametrize("kind", ["float", "uint8"])
def test_identical_videos_give_ssim_one_and_psnr_cap(kind):
    video = _video()
    if kind == "uint8":
        video = (video.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)  # [F, H, W, 3] like the pipelines
    psnr, ssim = psnr_per_frame(video, video), ssim_per_frame(video, video)
    assert psnr.shape == (4,) and ssim.shape == (4,)
    assert torch.all(psnr == PSNR_CAP)
    assert torch.allclose(ssim, torch.ones(4), atol=1e-6)


@pytest.mark.parametrize("sigma", [0.01, 0.03, 0.1], ids=["sigma0.01", "sigma0.03", "sigma0.1"])
def test_gaussian_noise_lowers_psnr_by_expected_amount(sigma):
    ref = _gray()
    noisy = ref + sigma * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    # mid-gray with sigma <= 0.1: clipping at 0/1 is a 5-sigma event, so MSE ~ sigma^2
    expected = -20 * math.log10(sigma)
    psnr = psnr_per_frame(noisy.clamp(0, 1), ref)
    assert abs(float(psnr.mean()) - expected) < 0.15, (float(psnr.mean()), expected)
    assert float(ssim_per_frame(noisy.clamp(0, 1), ref).mean()) < 0.99


def test_psnr_and_ssim_are_per_frame():
    ref = _video(frames=3)
    pred = ref.clone()
    pred[1] = (pred[1] + 0.05 * torch.randn_like(pred[1])).clamp(0, 1)
    out = paired_metrics(pred, ref)
    assert out["psnr_per_frame"][0] == PSNR_CAP and out["psnr_per_frame"][2] == PSNR_CAP
    assert out["psnr_per_frame"][1] < 40
    assert out["ssim_per_frame"][0] == pytest.approx(1.0, abs=1e-6) and out["ssim_per_frame"][1] < 0.99
    assert out["psnr"] == pytest.approx(sum(out["psnr_per_frame"]) / 3, abs=1e-3)


def test_ssim_decreases_with_noise_and_tiny_frames_work():
    ref = _video(frames=2, h=9, w=8)  # smaller than the 11-pixel window
    noisy = [(ref + s * torch.randn_like(ref)).clamp(0, 1) for s in (0.02, 0.1, 0.3)]
    values = [float(ssim_per_frame(x, ref).mean()) for x in noisy]
    assert values[0] > values[1] > values[2]


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="--frames"):
        psnr_per_frame(_video(frames=3), _video(frames=4))


# ------------------------------------------------------------------------- FID
def _reference_fid(a, b, net):
    """Independent Frechet distance: float64 features, scipy sqrtm."""
    from scipy import linalg

    with torch.no_grad():
        fa, fb = net(a).double().numpy(), net(b).double().numpy()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * covmean))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_fid_of_a_set_with_itself_is_zero_and_grows_with_distortion():
    net = TinyFeatures().eval()
    real = _video(frames=48, h=32, w=32)
    g = torch.Generator().manual_seed(2)
    self_fid = frechet_distance(real, real, net)
    fids = [frechet_distance((real + s * torch.randn(real.shape, generator=g)).clamp(0, 1), real, net)
            for s in (0.05, 0.2, 0.5)]
    assert self_fid < 1e-3 * fids[0]
    assert fids[0] < fids[1] < fids[2]
    distorted = (real + 0.2 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    assert frechet_distance(distorted, real, net) == pytest.approx(_reference_fid(distorted, real, net), rel=1e-3)


def test_fid_accepts_lists_of_videos_and_needs_two_images():
    net = TinyFeatures().eval()
    videos = [(v.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8) for v in (_video(3, 32, 32), _video(3, 32, 32, 1))]
    assert frechet_distance(videos, videos, net) < 1e-6
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(_video(1, 32, 32), _video(4, 32, 32), net)


def test_fid_torchscript_weights_file(tmp_path):
    path = tmp_path / "features.pt"
    torch.jit.script(TinyFeatures().eval()).save(str(path))
    feature, why = create_fid_feature(str(path))
    assert why is None
    real = _video(frames=16, h=32, w=32)
    assert frechet_distance(real, real, feature) < 1e-3


# ------------------------------------------------------------------------ CLIP
def _reference_clip(model, tokenizer, frames, prompt):
    """100 * max(cos, 0) through the sub-modules directly (frames already 32x32)."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=(frames - mean) / std).pooler_output)
        ids = tokenizer([prompt], return_tensors="pt")
        txt = model.text_projection(model.text_model(input_ids=ids["input_ids"],
                                                     attention_mask=ids["attention_mask"]).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return 100 * cos.clamp(min=0)


def test_clip_score_matches_reference_and_loads_from_a_folder(tmp_path):
    model, tokenizer = tiny_clip()
    scorer = ClipScorer(model, tokenizer)
    frames = _video(frames=6, h=32, w=32, seed=3)
    got = [scorer.per_frame(frames, p) for p in ("a red cat", "blue house", "the dog of a car")]
    ref = [_reference_clip(model, tokenizer, frames, p) for p in ("a red cat", "blue house", "the dog of a car")]
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-3)
    allv = torch.cat(got)
    assert torch.all((allv >= 0) & (allv <= 100)) and allv.max() > 0  # some positive alignment exists
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    loaded, why = create_clip_scorer(str(tmp_path / "clip"))
    assert why is None
    assert loaded(frames, "a red cat") == pytest.approx(scorer(frames, "a red cat"), abs=1e-3)


# -------------------------------------------------------------- missing weights
def test_missing_weights_give_one_skip_line(monkeypatch, tmp_path):
    monkeypatch.delenv(CLIP_ENV, raising=False)
    monkeypatch.delenv(FID_ENV, raising=False)
    scorer, why = create_clip_scorer(None)
    assert scorer is None and "--clip-model" in why and CLIP_ENV in why and "\n" not in why
    scorer, why = create_clip_scorer(str(tmp_path / "nope"))
    assert scorer is None and why.startswith("CLIP score skipped")
    feature, why = create_fid_feature(None)
    assert feature is None and "--fid-weights" in why and FID_ENV in why and "\n" not in why
    feature, why = create_fid_feature(str(tmp_path / "missing.pt"))
    assert feature is None and "does not exist" in why
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    feature, why = create_fid_feature(str(tmp_path / "junk.pt"))
    assert feature is None and why.startswith("FID skipped")
    lpips, why = LPIPSScorer.create()
    assert (lpips is None) == (why is not None)
    if why:
        assert why.startswith("LPIPS skipped") and "\n" not in why


def test_env_variables_are_read(monkeypatch, tmp_path):
    path = tmp_path / "features.pt"
    torch.jit.script(TinyFeatures().eval()).save(str(path))
    monkeypatch.setenv(FID_ENV, str(path))
    feature, why = create_fid_feature(None)
    assert why is None and isinstance(feature, nn.Module)


def test_to_frames_layouts():
    x = np.zeros((2, 5, 7, 3), np.uint8)
    assert to_frames(x).shape == (2, 3, 5, 7)
    with pytest.raises(ValueError, match="video must be"):
        to_frames(np.zeros((5,)))
