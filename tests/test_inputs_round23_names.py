"""Round 23, names and inputs: model family names in any separator, versions dit_accel has no family of, animated
images given as training images, damaged checkpoints given to ``dit-accel convert``."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from dit_accel._util import DitAccelWarning
from dit_accel.atomic_files import BadFileError
from dit_accel.pipelines.presets import resolve_model_family

# (what a user types before the version, the version, the class it names, its family or None)
VERSIONED = [
    ("Wan", "2.1", "WanTransformer3DModel", "Wan 2.1"),
    ("Wan", "2.2", "WanTransformer3DModel", "Wan 2.2"),
    ("HunyuanVideo", "1.5", "HunyuanVideo15Transformer3DModel", None),
    ("Hunyuan Video", "1.5", "HunyuanVideo15Transformer3DModel", None),
    ("LTX", "2", "LTX2VideoTransformer3DModel", None),
    ("FLUX", "1", "FluxTransformer2DModel", None),
    ("FLUX", "2", "Flux2Transformer2DModel", None),
    ("FLUX", "3", "Flux3Transformer2DModel", None),
    ("Qwen-Image", "2.1", "QwenImage21Transformer2DModel", None),
    ("Qwen Image Edit", "2509", "QwenImageTransformer2DModel", None),
    ("Kandinsky", "5", "Kandinsky5Transformer3DModel", None),
    ("Kandinsky", "6", "Kandinsky6Transformer3DModel", None),
    ("CogView", "3", "CogView3PlusTransformer2DModel", None),
    ("CogView", "4", "CogView4Transformer2DModel", None),
    ("Lumina", "2", "Lumina2Transformer2DModel", None),
    ("Krea", "2", "Krea2Transformer2DModel", None),
    ("FIBO", "2", "BriaFibo2Transformer2DModel", None),
    ("Ideogram", "4", "Ideogram4Transformer2DModel", None),
    ("Wan Animate", "2", "WanAnimate2Transformer3DModel", None),
]
SEPARATORS = {"space": " ", "hyphen": "-", "underscore": "_", "none": "", "dot": ".", "two-spaces": "  ", "v": " v"}


@pytest.mark.parametrize("sep", list(SEPARATORS.values()), ids=list(SEPARATORS))
@pytest.mark.parametrize("name,version,class_name,family", VERSIONED, ids=[f"{n} {v}" for n, v, _, _ in VERSIONED])
def test_a_family_and_version_resolve_whatever_separator_is_typed(name, version, class_name, family, sep):
    """Before: the hub words allowed '-' or nothing before a version, so 'HunyuanVideo 1.5' read as HunyuanVideo
    (1.0), 'LTX 2' as LTX-Video, 'FLUX 2' as FLUX.1, 'wan_2.2' as Wan 2.1 and 'Qwen Image' as nothing."""
    model = f"{name}{sep}{version}"
    assert resolve_model_family(model) == (class_name, family)
    assert resolve_model_family(model.upper().replace(" ", "_")) == (class_name, family)


@pytest.mark.parametrize("model,expected", [
    ("Qwen Image", "QwenImageTransformer2DModel"), ("AnyFlow FAR", "AnyFlowFARTransformer3DModel"),
    ("Sana Video", "SanaVideoTransformer3DModel"), ("Z Image", "ZImageTransformer2DModel"),
    ("wan_2_2", "WanTransformer3DModel"), ("Hunyuan Video", "HunyuanVideoTransformer3DModel"),
])
def test_family_names_without_a_version_resolve_with_spaces(model, expected):
    """Before: 'AnyFlow FAR' read as AnyFlow (its word excludes '-far' only), 'Qwen Image' as nothing."""
    assert resolve_model_family(model)[0] == expected
    assert resolve_model_family("wan_2_2")[1] == "Wan 2.2"


def test_a_pathlib_model_is_read_as_its_path():
    """Before: resolve_model_family(Path(...)) said 'model=PosixPath(...) is invalid'."""
    assert resolve_model_family(Path("tiny-wan")) == resolve_model_family("tiny-wan")


@pytest.mark.parametrize("model", ["Wan 2.3", "wan_2.3", "Wan-2.5", "WAN3"])
def test_a_family_name_with_an_unknown_version_is_refused(model):
    """Before: resolve_model_family('Wan 2.3') gave Wan 2.1 (the hub word "wan"); info refused it alone."""
    with pytest.raises(ValueError, match=rf"^'{model}' is no model family dit_accel knows \(did you mean Wan 2\.\d or "
                                         r"Wan 2\.\d\?\): pass one of the families"):
        resolve_model_family(model)


def test_a_run_together_version_of_a_known_family_is_no_unknown_version():
    from dit_accel.pipelines.presets import unknown_version

    assert unknown_version("Wan22") == "" and unknown_version("wan_2_2") == ""
    assert unknown_version("Wan 2.3").startswith("'Wan 2.3' is no model family dit_accel knows")


def test_a_hub_id_of_an_unknown_version_warns_naming_the_id_and_the_guess():
    """Before: 'Wan-AI/Wan2.3-T2V' (uncached) read as Wan 2.1 without a word."""
    with pytest.warns(DitAccelWarning, match=r"^'Wan-AI/Wan2\.3-T2V' names 'wan2\.3', a version dit_accel has no "
                                             r"family of \(it knows Wan 2\.1, Wan 2\.2\): read as "
                                             r"WanTransformer3DModel \(Wan 2\.1\) by its name, a guess.*"
                                             r"huggingface-cli download Wan-AI/Wan2\.3-T2V"):
        assert resolve_model_family("Wan-AI/Wan2.3-T2V") == ("WanTransformer3DModel", "Wan 2.1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for known in ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "Wan-AI/Wan2.2-Animate-14B",
                      "Wan-AI/Wan2.1-VACE-14B-diffusers", "tiny-wan", "black-forest-labs/FLUX.1-dev"):
            resolve_model_family(known)


# ---------------------------------------------------------------------- training data: animated images
def _data_folder(root: Path, suffix: str, frames: int) -> Path:
    from PIL import Image

    root.mkdir()
    pictures = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(frames)]
    pictures[0].save(root / f"a{suffix}", save_all=True, append_images=pictures[1:])
    (root / "metadata.jsonl").write_text(f'{{"file_name": "a{suffix}", "text": "a red square"}}\n')
    return root


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_an_animated_image_is_refused_as_a_training_image(tmp_path, suffix):
    """Before: an animated PNG or WebP trained on its first frame, without a word."""
    from dit_accel.training.data import CaptionDataset

    root = _data_folder(tmp_path / "data", suffix, 3)
    with pytest.raises(BadFileError, match=rf"a{suffix}: is animated \(3 frames\), but an image input is one frame; "
                                           r"expected a still image: to train on its frames, convert it to a video "
                                           rf"\(`ffmpeg -i a{suffix} a\.mp4`\)"):
        CaptionDataset(root, frames=1, height=16, width=16)


def test_a_still_image_still_loads_and_an_animated_one_is_refused_when_drawn(tmp_path):
    from dit_accel.training.data import CaptionDataset, _load_frames

    root = _data_folder(tmp_path / "data", ".png", 1)
    assert CaptionDataset(root, frames=1, height=16, width=16).item(0) is not None
    _data_folder(tmp_path / "other", ".webp", 2)
    with pytest.raises(BadFileError, match=r"is animated \(2 frames\)"):
        _load_frames(tmp_path / "other" / "a.webp", 1)


# ---------------------------------------------------------------------- convert: damaged checkpoints
def _projections(d: int = 8) -> dict:
    return {"blocks.0.self_attn.attn_op.local_attn.proj_l.weight": torch.randn(d, d),
            "blocks.0.self_attn.attn_op.local_attn.proj_l.bias": torch.randn(d)}


@pytest.mark.parametrize("damage", ["empty", "zip-cut", "zip-tail", "legacy-cut"])
def test_a_cut_short_checkpoint_says_download_it_again(tmp_path, damage):
    """Before: a truncated .pth read as 'not a PyTorch checkpoint ... (OSError: Invalid argument)' with the advice to
    load it yourself if you trust the file."""
    good = tmp_path / "good.pth"
    torch.save(_projections(), good, _use_new_zipfile_serialization=damage != "legacy-cut")
    data = good.read_bytes()
    cut = {"empty": b"", "zip-cut": data[:len(data) // 2], "zip-tail": data[:-30], "legacy-cut": data[:len(data) // 2]}
    bad = tmp_path / "bad.pth"
    bad.write_bytes(cut[damage])
    from dit_accel.checkpoints.convert import read_checkpoint

    with pytest.raises(BadFileError, match=r"bad\.pth: is (empty|truncated).*; expected the whole checkpoint: "
                                           r"download or copy it again"):
        read_checkpoint(bad)


def test_a_damaged_safetensors_checkpoint_says_download_it_again(tmp_path):
    from safetensors.torch import save_file

    from dit_accel.checkpoints.convert import read_checkpoint

    good = tmp_path / "good.safetensors"
    save_file(_projections(), str(good))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-50])
    with pytest.raises(BadFileError, match=r"bad\.safetensors: .*; expected a checkpoint of tensors in the SLA "
                                           r"reference layout; if it is damaged or cut short, download or copy it "
                                           r"again"):
        read_checkpoint(bad)
