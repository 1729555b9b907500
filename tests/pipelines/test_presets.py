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
    # AnyFlow ids name Wan 2.1 too; the FAR and VSR ids hold the refused classes
    ("nvidia/AnyFlow-Wan2.1-T2V-14B-Diffusers", "AnyFlowTransformer3DModel"),
    ("nvidia/AnyFlow-FAR-Wan2.1-1.3B-Diffusers", "AnyFlowFARTransformer3DModel"),
    ("kandinskylab/Kandinsky-6.0-VSR-distilled2steps-5s-Diffusers", "Kandinsky6SRTransformer3DModel"),
    # JoyImage Edit and Edit Plus (ids from the Diffusers docstrings); the SANA-WM id holds Sana's "sana"
    ("jdopensource/JoyAI-Image-Edit-Diffusers", "JoyImageEditTransformer3DModel"),
    ("jdopensource/JoyAI-Image-Edit-Plus-Diffusers", "JoyImageEditPlusTransformer3DModel"),
    ("Efficient-Large-Model/SANA-WM_bidirectional-diffusers", "SanaWMTransformer3DModel"),
    # Diffusers 0.42.1 image classes (ids from the Diffusers docstrings); FIBO's ids hold Bria 3.x's "bria"
    ("meituan-longcat/LongCat-Image", "LongCatImageTransformer2DModel"),
    ("meituan-longcat/LongCat-Image-Edit", "LongCatImageTransformer2DModel"),
    ("AIDC-AI/Ovis-Image-7B", "OvisImageTransformer2DModel"),
    ("briaai/FIBO", "BriaFiboTransformer2DModel"),
    ("briaai/Fibo-Edit-1.5-turbo", "BriaFiboTransformer2DModel"),
    ("briaai/Fibo-Edit-1.5-base", "BriaFiboTransformer2DModel"),
    ("briaai/BRIA-3.2", "BriaTransformer2DModel"),
    ("krea/Krea-2-Raw", "Krea2Transformer2DModel"),
    ("facebook/DiT-XL-2-256", "DiTTransformer2DModel"),  # DiT and GLM-Image: ids from the Diffusers docstrings
    ("zai-org/GLM-Image", "GlmImageTransformer2DModel"),
    # Nucleus-Image and PRX: ids from their pipelines' docstrings
    ("NucleusAI/NucleusMoE-Image", "NucleusMoEImageTransformer2DModel"),
    ("Photoroom/prx-512-t2i-sft", "PRXTransformer2DModel"), ("Photoroom/prxpixel-t2i", "PRXTransformer2DModel"),
    # FIBO 2, Ideogram 4 and DreamLite: ids from their pipelines' docstrings (FIBO 2's holds FIBO's and Bria's words)
    ("briaai/Fibo-2.0-dev", "BriaFibo2Transformer2DModel"), ("ideogram-ai/ideogram-v4", "Ideogram4Transformer2DModel"),
    ("carlofkl/DreamLite-base", "DreamLiteTransformer2DModel"),
    ("carlofkl/DreamLite-mobile", "DreamLiteTransformer2DModel"),
])
def test_hub_ids_name_the_right_family(model, cls):
    """A more specific family's hub word wins over a general one that also matches it."""
    from dit_accel.pipelines.presets import resolve_model_family

    assert resolve_model_family(model)[0] == cls


# ------------------------------------------------------------------ the grid rank a class's calls see
@pytest.mark.parametrize("name", sorted(T.TRANSFORMERS))
def test_a_preset_declares_the_rank_of_the_grid_its_reader_reads(name):
    """``Preset.grid_dims`` is what apply refuses methods by: it must be the rank the class's grid reader gives
    on the class's own calls (a video preset that read 2-D, or an image one 3-D, would refuse the wrong methods)."""
    entry = T.TRANSFORMERS[name]
    model = T.build_tiny_transformer(name)
    info = P.PRESETS[entry.class_name].read_grid(model, T.tiny_transformer_inputs(name, model))
    assert len(info.grid) == P.PRESETS[entry.class_name].grid_dims


def _no_hooks(model) -> bool:
    return not any(type(getattr(m, "processor", None)).__name__ == "SparseAttnProcessor" for m in model.modules())


@pytest.mark.parametrize("method, match", [
    (dit_accel.VSA(), r"method 'vsa' needs a video's \(T, H, W\) token grid, but the sparse calls of "
                      r"FluxTransformer2DModel see a 2-D \(H, W\) token grid. Use one of .*tile"),
    (dit_accel.Radial(), r"method 'radial' needs a video's \(T, H, W\) token grid"),
    (dit_accel.Tile(), r"Tile's tile=\(6, 8, 8\) is for a 3-D token grid, .* Give 2 values per dimension setting "
                       r"\(tile=\(8, 8\), say\) or one int"),
    (dit_accel.Tile(tile=8, window=((3, 3, 3), (1, 5, 5))), r"Tile's window=\(3, 3, 3\) is for a 3-D token grid"),
    (dit_accel.GNA(kernel_size=(3, 5, 5)), r"GNA's kernel_size=\(3, 5, 5\) is for a 3-D token grid"),
])
def test_apply_refuses_a_method_for_another_grid_rank_and_leaves_the_model(method, match):
    """Before, these were accepted and the first denoising step raised; now apply refuses them, the model as it
    was."""
    model = T.build_tiny_transformer("flux")
    with pytest.raises(ValueError, match=match):
        dit_accel.apply(model, method)
    assert _no_hooks(model)


def test_video_settings_on_a_video_model_and_2d_ones_on_an_image_model_pass():
    for name, methods in [("wan", (dit_accel.VSA(), dit_accel.Radial(), dit_accel.Tile(), dit_accel.GNA(
            kernel_size=(3, 5, 5)), dit_accel.Tile(tile=8, window=3))),
            ("flux", (dit_accel.Tile(tile=(8, 8), window=(3, 3)), dit_accel.GNA(kernel_size=(5, 5)),
                      dit_accel.Tile(tile=8, window=((3, 3), (1, 5))), dit_accel.SLA()))]:
        preset = P.PRESETS[T.TRANSFORMERS[name].class_name]
        for method in methods:
            P.check_method_for(preset.class_name, preset, method)
    with pytest.raises(ValueError, match=r"Tile's tile=\(8, 8\) is for a 2-D token grid, but the sparse calls of "
                                         r"WanTransformer3DModel see a video's \(T, H, W\) token grid. Give 3 values"):
        P.check_method_for("WanTransformer3DModel", P.PRESETS["WanTransformer3DModel"], dit_accel.Tile(tile=(8, 8), window=3))


@pytest.mark.parametrize("cls", [c for c in P.SUPPORTED])
def test_recommended_gives_a_setting_the_class_takes_or_refuses_the_method(cls):
    """Every registered method: what ``recommended`` returns passes apply's check on that class (no 3-D default
    for an image model); a method for another rank is refused by name."""
    preset = P.PRESETS[cls]
    for name in ("tile", "gna", "radial", "sla", "vsa"):
        try:
            method, _ = P.recommended(cls, name)
        except ValueError as err:
            assert name in ("radial", "vsa") and preset.grid_dims == 2 or name in preset.refused_methods, err
            continue
        P.check_method_for(cls, preset, method)


def test_every_shipped_preset_declares_its_rank_and_a_registered_one_may_leave_it_open():
    assert all(P.PRESETS[c].grid_dims in (2, 3) for c in P.SUPPORTED)
    open_rank = P.Preset("X", attention=(), text_position="none", read_grid=lambda m, a: None, min_diffusers="0")
    for method in (dit_accel.VSA(), dit_accel.Tile(tile=(8, 8), window=3), dit_accel.Tile()):
        P.check_method_for("X", open_rank, method)  # (unchecked here: the first call's grid refuses a wrong one)
    for bad in (4, True, "3"):
        with pytest.raises(ValueError, match=f"Preset.grid_dims={bad!r} is invalid: the rank of the token grid"):
            P.register_preset(P.Preset("X", attention=(), text_position="none", read_grid=lambda m, a: None,
                                       min_diffusers="0", grid_dims=bad))
    assert "X" not in P.PRESETS
