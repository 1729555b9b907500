"""Issue 38, item 5: the image DiTs still in wide use. PixArt-Sigma and HunyuanDiT attend the image alone
(text by cross-attention), AuraFlow (register + text tokens first), CogView3-Plus and Bria attend [text, image]
jointly; each against the masked-dense reference on its own layout. Sana (linear self-attention) and OmniGen
(one causal / bidirectional masked sequence) are refused with their reasons."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines import presets as P
from tests.utils import ReferenceAttention, method_mask, first_output as _run

NAMES = ("pixart", "hunyuandit", "auraflow", "cogview3plus", "bria", "lumina_next")
LAYOUT = {"pixart": "none", "hunyuandit": "none", "auraflow": "first", "cogview3plus": "first", "bria": "first",
          "lumina_next": "none"}


@pytest.fixture(scope="module")
def models():
    return {name: T.build_tiny_transformer(name) for name in NAMES}


@pytest.mark.parametrize("method", [
    pytest.param(dit_accel.GNA(kernel_size=(3, 5)), id="gna-3x5"),
    pytest.param(dit_accel.Tile(tile=(4, 4), window=(1, 3)), id="tile-4x4-w1x3"),
])
@pytest.mark.parametrize("name", NAMES)
def test_image_dit_matches_the_masked_reference(models, name, method):
    model = models[name]
    preset = P.PRESETS[type(model).__name__]
    assert preset.text_position == LAYOUT[name]
    kwargs = T.tiny_transformer_inputs(name, model, batch=2)
    grid = T.TRANSFORMER_GRIDS[name]
    pattern = method_mask(method, grid)
    assert not pattern.all()
    dense = _run(model, kwargs)
    with ReferenceAttention(pattern, preset.text_position) as ref_mode:
        ref = _run(model, kwargs)
    with dit_accel.apply(model, method, backend="torch") as handle:
        out = _run(model, kwargs)
        rows = handle.stats()
    assert ref_mode.calls == len(rows) == 2 and not handle.warnings
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows), rows
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert (out - dense).abs().max() > 1e-3
    assert torch.equal(_run(model, kwargs), dense)


def test_auraflow_register_tokens_count_as_text(models):
    model = models["auraflow"]
    kwargs = T.tiny_transformer_inputs("auraflow", model)
    info = P.PRESETS["AuraFlowTransformer2DModel"].read_grid(model, kwargs)
    assert info == P.GridInfo(T.TRANSFORMER_GRIDS["auraflow"], T.TRANSFORMER_TEXT["auraflow"] + 8)


@pytest.mark.parametrize("class_name, config, reason", [
    ("SanaTransformer2DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
          num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
          sample_size=8, patch_size=1), "linear attention"),
    ("OmniGenTransformer2DModel",
     dict(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
          intermediate_size=32, num_layers=1, vocab_size=64, pad_token_id=0, pos_embed_max_size=16,
          time_step_dim=16, rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8}), "full \\(S, S\\) attention mask"),
])
def test_refused_image_dits_name_the_class_and_the_reason(class_name, config, reason):
    import diffusers

    assert class_name not in P.SUPPORTED
    model = getattr(diffusers, class_name)(**config)
    with pytest.raises(ValueError, match=f"does not support transformer class {class_name}: .*{reason}"):
        dit_accel.apply(model, dit_accel.GNA(kernel_size=(3, 3)))
    assert not any(type(getattr(m, "processor", None)).__name__ == "SparseAttnProcessor" for m in model.modules())


@pytest.mark.parametrize("hub_id, class_name", [
    ("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "PixArtTransformer2DModel"),
    ("Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers", "HunyuanDiT2DModel"),
    ("fal/AuraFlow-v0.3", "AuraFlowTransformer2DModel"),
    ("THUDM/CogView3-Plus-3B", "CogView3PlusTransformer2DModel"),
    ("briaai/BRIA-3.2", "BriaTransformer2DModel"),
    ("Alpha-VLLM/Lumina-Next-SFT-diffusers", "LuminaNextDiT2DModel"),
    ("Alpha-VLLM/Lumina-Image-2.0", "Lumina2Transformer2DModel"),
    ("Efficient-Large-Model/Sana_1600M_1024px_diffusers", "SanaTransformer2DModel"),
    ("Efficient-Large-Model/SANA-Video_2B_480p_diffusers", "SanaVideoTransformer3DModel"),
    ("hunyuanvideo-community/HunyuanVideo", "HunyuanVideoTransformer3DModel"),
])
def test_hub_ids_name_their_class(hub_id, class_name):
    assert P.resolve_model_family(hub_id)[0] == class_name


@pytest.mark.parametrize("name", NAMES)
def test_sla_keeping_every_block_reproduces_dense_and_a_small_topk_is_sparse(models, name):
    model = models[name]
    kwargs = T.tiny_transformer_inputs(name, model, batch=1)
    dense = _run(model, kwargs)
    with dit_accel.apply(model, dit_accel.SLA(topk=1.0), backend="torch") as handle:
        full = _run(model, kwargs)
        assert handle.summary()["sparse_calls"] == handle.summary()["layers"] == 2
    torch.testing.assert_close(full, dense, atol=1e-5, rtol=1e-5)
    with dit_accel.apply(model, dit_accel.SLA(topk=0.4), backend="torch") as handle:
        sparse = _run(model, kwargs)
        rows = handle.stats()
    assert torch.isfinite(sparse).all() and all(r["sparse_calls"] == 1 and r["density"] < 1 for r in rows)


def test_vsa_on_an_image_model_says_it_needs_a_video_model(models):
    """Issue 74, item 7: the refusal advised passing a (1, H, W) grid, which apply() does not take. It is apply's
    now (the preset's grid rank), before the model changes."""
    model = models["pixart"]
    with pytest.raises(ValueError, match=r"'vsa' needs a video's \(T, H, W\) token grid, but the sparse calls of "
                                         r"PixArtTransformer2DModel see a 2-D \(H, W\) token grid. Use one of .*tile.*sla"
                       ) as err:
        dit_accel.apply(model, dit_accel.VSA(), backend="torch")
    assert "pass (1, H, W)" not in str(err.value)


def test_a_method_that_is_no_config_is_refused_naming_every_registered_method(models):
    from dit_accel.methods import registered_methods

    with pytest.raises(TypeError, match="must be a dit_accel method config") as err:
        dit_accel.apply(models["pixart"], "vsa")
    for entry in registered_methods().values():  # VSA included
        assert f"{entry.cls.__name__}(...)" in str(err.value)
