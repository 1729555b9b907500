"""Round 24 ("trust") of model names: a version newer than any dit_accel knows of a model line whose first class's
hub word matches every version (FLUX.4, LTX-3, HunyuanVideo 2) read as that first class without a word: FLUX.1's,
LTX-Video's, HunyuanVideo 1.0's settings for a model none of them is. As with Wan 2.3, a bare name and version is
refused and a hub id warned of (its class is a guess)."""

import warnings

import pytest

from dit_accel._util import DitAccelWarning
from dit_accel.pipelines.presets import model_family


@pytest.mark.parametrize("name, newest", [("FLUX 4", "FLUX 3"), ("flux.4", "FLUX 3"), ("LTX 3", "LTX 2"),
                                          ("ltx-3", "LTX 2"), ("HunyuanVideo 2", "HunyuanVideo 1.5"),
                                          ("hunyuan_video 2.0", "HunyuanVideo 1.5")])
def test_a_bare_name_with_a_newer_version_is_refused(name, newest):
    with pytest.raises(ValueError, match=f"{name!r} is no model dit_accel knows .*newest .* is {newest}.*dit-accel info"):
        model_family(name)


@pytest.mark.parametrize("hub_id, words", [("black-forest-labs/FLUX.4-dev", "flux.4"), ("Lightricks/LTX-3", "ltx-3"),
                                           ("tencent/HunyuanVideo-2", "hunyuanvideo-2")])
def test_a_hub_id_with_a_newer_version_is_warned_of(hub_id, words, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(DitAccelWarning, match=f"names {words!r}, a version dit_accel has no family of .*a guess"):
        model_family(hub_id)


@pytest.mark.parametrize("model, expected", [
    ("black-forest-labs/FLUX.1-dev", "FluxTransformer2DModel"), ("black-forest-labs/FLUX.1-Kontext-dev",
                                                                  "FluxTransformer2DModel"),
    ("black-forest-labs/FLUX.2-dev", "Flux2Transformer2DModel"), ("FLUX 2", "Flux2Transformer2DModel"),
    ("Lightricks/LTX-Video-0.9.8", "LTXVideoTransformer3DModel"), ("Lightricks/LTX-2", "LTX2VideoTransformer3DModel"),
    ("tencent/HunyuanVideo-1.5", "HunyuanVideo15Transformer3DModel"), ("HunyuanVideo 1.5",
                                                                       "HunyuanVideo15Transformer3DModel"),
    ("hunyuanvideo-community/HunyuanVideo", "HunyuanVideoTransformer3DModel")])
def test_known_versions_stay_quiet(model, expected, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DitAccelWarning)
        assert model_family(model)[0] == expected
