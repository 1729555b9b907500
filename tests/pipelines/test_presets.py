"""The preset registry: one module per family, all of them registered, each with a tiny transformer; a class
a preset refuses is refused by ``apply`` with the preset's reason."""

import importlib
import re
from pathlib import Path

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines import presets as P


def _family_modules(package) -> set:
    return {p.stem for p in Path(package.__file__).parent.glob("*.py") if not p.stem.startswith("_")}


def test_every_family_module_is_registered_in_order():
    assert _family_modules(P) == set(P.FAMILIES)
    shipped = [p.class_name for name in P.FAMILIES for p in importlib.import_module(f"{P.__name__}.{name}").PRESETS]
    assert list(P.PRESETS)[:len(shipped)] == shipped and len(set(shipped)) == len(shipped)


def test_every_supported_class_has_a_tiny_transformer_in_the_module_of_the_same_name():
    assert _family_modules(T) == set(T.FAMILIES) and set(T.FAMILIES) <= set(P.FAMILIES)
    for name in P.FAMILIES:
        classes = {p.class_name for p in importlib.import_module(f"{P.__name__}.{name}").PRESETS if not p.refused}
        tiny = {t.class_name for t in importlib.import_module(f"{T.__name__}.{name}").TRANSFORMERS}
        assert classes <= tiny, name


def test_every_tiny_pipeline_names_its_family():
    for name in T.FAMILIES:
        module = importlib.import_module(f"{T.__name__}.{name}")
        for pipe in getattr(module, "PIPELINES", ()):  # tiny-<family>: resolved without loading it
            assert P.resolve_model_family(pipe.name)[0] in {t.class_name for t in module.TRANSFORMERS}, pipe.name


# ------------------------------------------------------------------ a class the registry refuses
class PackedHistoryTransformer(torch.nn.Module):
    """Stands for a FramePack-style transformer: its calls carry no single token grid."""

    def forward(self, hidden_states):
        return hidden_states


REASON = ("its calls pack a history of clean latents at three scales ahead of the new frames, so there is no "
          "single token grid; use the dense model, or HunyuanVideoTransformer3DModel for plain text-to-video")


@pytest.fixture
def refused():
    P.register_preset(P.Preset.refusing("PackedHistoryTransformer", REASON))
    yield PackedHistoryTransformer()
    P.unregister_preset("PackedHistoryTransformer")


def test_apply_raises_the_reason_of_a_refused_class(refused):
    expected = re.escape(f"does not support transformer class PackedHistoryTransformer: {REASON}")
    with pytest.raises(ValueError, match=expected):
        dit_accel.apply(refused, dit_accel.Dense())
    with pytest.raises(ValueError, match=re.escape(f"class Sub: {REASON}")):  # subclasses too
        P.preset_for(type("Sub", (PackedHistoryTransformer,), {})())
    with pytest.raises(ValueError, match=expected):
        P.recommended("PackedHistoryTransformer", "tile")
    assert "PackedHistoryTransformer" not in P.SUPPORTED and "PackedHistoryTransformer" in P.PRESETS


def test_info_lists_a_refused_class_with_its_reason(refused, capsys):
    from dit_accel.cli.main import main

    assert main(["info"]) == 0
    assert f"refused: {REASON}" in capsys.readouterr().out


def test_a_refused_preset_needs_a_str_reason():
    with pytest.raises(ValueError, match="needs a reason"):
        P.Preset.refusing("PackedHistoryTransformer", "")
    preset = P.Preset("X", attention=(), text_position="none", read_grid=lambda m, a: None, min_diffusers="0",
                      refused=None)
    with pytest.raises(TypeError, match="Preset.refused must be a str"):
        P.register_preset(preset)


@pytest.mark.parametrize("model, cls", [
    ("tencent/HunyuanImage-2.1", "HunyuanImageTransformer2DModel"),
    ("hunyuanvideo-community/HunyuanVideo", "HunyuanVideoTransformer3DModel"),
    ("black-forest-labs/FLUX.2-dev", "Flux2Transformer2DModel"),
    ("black-forest-labs/FLUX.1-dev", "FluxTransformer2DModel"),
    ("Wan-AI/Wan2.1-VACE-1.3B-diffusers", "WanVACETransformer3DModel"),
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "WanTransformer3DModel"),
    # models-video-c
    ("hunyuanvideo-community/HunyuanVideo-1.5-480p_i2v", "HunyuanVideo15Transformer3DModel"),
    ("tencent/HunyuanVideo-1.5", "HunyuanVideo15Transformer3DModel"),
    ("tencent/HunyuanVideo-I2V", "HunyuanVideoTransformer3DModel"),
    ("kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers", "Kandinsky5Transformer3DModel"),
    ("kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers", "Kandinsky5Transformer3DModel"),
    ("kandinskylab/Kandinsky-6.0-Pro-distill-5s-Diffusers", "Kandinsky6Transformer3DModel"),
    ("alibaba-pai/EasyAnimateV5.1-7b-zh-diffusers", "EasyAnimateTransformer3DModel"),
    ("BestWishYsh/Helios-Base", "HeliosTransformer3DModel"),
    # models-video-d: Wan Animate (2) and LTX-2 before Wan and LTX-Video, and the reverse
    ("Wan-AI/Wan2.2-Animate-2-14B-Diffusers", "WanAnimate2Transformer3DModel"),
    ("Wan-AI/Wan2.2-Animate-14B-Diffusers", "WanAnimateTransformer3DModel"),
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "WanTransformer3DModel"),
    ("Lightricks/LTX-2", "LTX2VideoTransformer3DModel"),
    ("Lightricks/LTX-2.3", "LTX2VideoTransformer3DModel"),
    ("Lightricks/LTX-Video-0.9.7-dev", "LTXVideoTransformer3DModel"),
    ("Lightricks/ltxv-2b-0.9.8-distilled", "LTXVideoTransformer3DModel"),
    ("MiniMaxAI/MiniMax-H3", "MiniMaxH3Transformer3DModel"),
    # models-image-b: FLUX.3 / Qwen-Image 2.1 ids are not FLUX.2/FLUX.1 / Qwen-Image ones, and vice versa
    ("black-forest-labs/FLUX.3-dev", "Flux3Transformer2DModel"),
    ("black-forest-labs/FLUX.2-klein-4B", "Flux2Transformer2DModel"),
    ("black-forest-labs/FLUX.1-schnell", "FluxTransformer2DModel"),
    ("Qwen/Qwen-Image-2.1", "QwenImage21Transformer2DModel"),
    ("Qwen/Qwen-Image", "QwenImageTransformer2DModel"),
    ("Qwen/Qwen-Image-2512", "QwenImageTransformer2DModel"),
    ("Qwen/Qwen-Image-Edit-2511", "QwenImageTransformer2DModel"),
    ("HiDream-ai/HiDream-I1-Full", "HiDreamImageTransformer2DModel"),
    ("Alpha-VLLM/Lumina-Image-2.0", "Lumina2Transformer2DModel"),
    ("Tongyi-MAI/Z-Image-Turbo", "ZImageTransformer2DModel"),
])
def test_hub_ids_name_the_right_family(model, cls):
    """A more specific family's hub word wins over a general one that also matches it."""
    from dit_accel.pipelines.presets import resolve_model_family

    assert resolve_model_family(model)[0] == cls
