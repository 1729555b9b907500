"""Model families' presets and token layouts, trust round 11: what a user of a family's transformer hits. Tiny
models on the CPU; each test names what was wrong before its fix."""

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines.presets import PRESETS, family_of, published_settings, recommended

# The video families whose grid readers index the axes of a 5-D latent (their own or patched_video_grid's).
VIDEO_READERS = ["wan", "skyreels_v2", "chronoedit", "wan_animate", "wan_vace", "hunyuan", "hunyuan15", "cosmos",
                 "motif", "helios", "cogvideox", "consisid", "mochi", "allegro", "easyanimate", "latte"]


@pytest.mark.parametrize("name", VIDEO_READERS)
def test_a_video_model_called_with_a_4d_latent_says_so_in_one_line(name):
    """Before: calling a sparse video transformer with a latent of another rank (an image latent (B, C, H, W), a
    latent whose frame axis was dropped) raised a bare ``IndexError: tuple index out of range`` from dit_accel's grid
    reader, before the model could say anything. Now one ValueError names hidden_states, its shape and the layout
    wanted; the failed call leaves the model sparse and working."""
    model = T.build_tiny_transformer(name)
    kwargs = T.tiny_transformer_inputs(name, model, batch=1)
    x = kwargs["hidden_states"]
    method = dit_accel.GNA(kernel_size=2)
    with torch.no_grad(), dit_accel.apply(model, method, backend="torch") as handle:
        with pytest.raises(ValueError, match=r"hidden_states of shape \(\d+, \d+, \d+, \d+\) is not a \(B, [CF], [CF], "
                                             r"H, W\) video latent") as err:
            model(**{**kwargs, "hidden_states": x[:, :, 0]})
        assert "\n" not in str(err.value)
        model(**kwargs)
        assert all(r["sparse_calls"] >= 1 for r in handle.stats())


def _subclass_of(name):
    """The tiny transformer ``name`` built as a user's subclass of its Diffusers class (what ``apply`` takes)."""
    import diffusers

    entry = T.TRANSFORMERS[name]
    base = getattr(diffusers, entry.class_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return type(f"My{entry.class_name}", (base,), {})(**entry.config).eval()


def test_recommended_and_the_published_settings_of_a_subclass_are_its_base_classs():
    """Before: ``apply`` ran a subclass of a supported transformer (its preset is found along the class's bases), but
    ``recommended(model, "radial")`` said "no preset for MyWanTransformer3DModel; supported: ...", ``published_settings``
    said it "is not a model class dit_accel knows" and ``family_of`` gave None: the settings for a model apply runs
    were out of reach. Now they read the base class's, as apply does."""
    model = _subclass_of("wan")
    base = T.build_tiny_transformer("wan")
    assert family_of(model) == family_of(base) == "Wan 2.1"
    assert published_settings(model, "radial") == published_settings(base, "radial") != ()
    assert recommended(model, "radial") == recommended(base, "radial")
    assert recommended(type(model), "tile") == recommended("WanTransformer3DModel", "tile")
    kwargs = T.tiny_transformer_inputs("wan", model)
    with torch.no_grad(), dit_accel.apply(model, dit_accel.GNA(kernel_size=2), backend="torch") as handle:
        model(**kwargs)
        assert all(r["sparse_calls"] == 1 for r in handle.stats())
    assert "MyWanTransformer3DModel" not in PRESETS


def test_skyreels_v2_made_block_causal_between_calls_of_one_shape_is_refused_each_time():
    """Before: SkyReelsV2DiffusionForcingPipeline sets ``num_frame_per_block`` on the transformer at call time
    (``_set_ar_attention(causal_block_size)``). After a call of the same latent shape, the preset's cached grid skipped
    its block-causal check: instead of the preset's refusal, every layer warned that it "made an SDPA call it cannot
    make sparse" and ran dense. Now every call is read, so a block-causal call is refused with the reason, and
    setting it back runs sparse again."""
    model = T.build_tiny_transformer("skyreels_v2")
    kwargs = T.tiny_transformer_inputs("skyreels_v2", model)
    with torch.no_grad(), dit_accel.apply(model, dit_accel.GNA(kernel_size=2), backend="torch") as handle:
        model(**kwargs)
        model._set_ar_attention(2)
        try:
            with pytest.raises(ValueError, match="num_frame_per_block=2: its self-attention is block-causal"):
                model(**kwargs)
        finally:
            model._set_ar_attention(1)
        model(**kwargs)
        assert all(r["sparse_calls"] == 2 and r["dense_calls"] == 0 for r in handle.stats())


@pytest.mark.parametrize("call, problem", [
    (dict(name="nope"), r"unknown tiny transformer 'nope'; choose one of"),
    (dict(grid=(8, 8)), r"grid=\(8, 8\) is invalid for tiny 'wan': 3 positive ints"),
    (dict(grid=(0, 8, 8)), r"grid=\(0, 8, 8\) is invalid"),
    (dict(name="flux", grid=(2, 8, 8)), r"grid=\(2, 8, 8\) is invalid for tiny 'flux': 2 positive ints"),
    (dict(text_valid=[7, 3]), r"text_valid=\[7, 3\] is invalid: one valid text length per sample \(1\)"),
])
def test_tiny_transformer_inputs_names_the_argument_it_cannot_use(call, problem):
    """Before: ``tiny_transformer_inputs`` (the documented way to get forward kwargs for a chosen token grid) raised a
    bare ``KeyError: 'nope'`` for an unknown name, ``ValueError: not enough values to unpack`` for a grid of another rank,
    built an empty latent for a zero extent, and an ``IndexError`` for more text lengths than samples. Now one
    ValueError names the argument and what is allowed."""
    name = call.pop("name", "wan")
    model = T.build_tiny_transformer("flux" if name == "flux" else "wan")
    with pytest.raises(ValueError, match=problem):
        T.tiny_transformer_inputs(name, model, **call)


@pytest.mark.parametrize("class_name, error, problem", [
    ("class", TypeError, r"is a class: pass its name, Preset\('MyVideoTransformer3DModel', \.\.\.\)"),
    ("", ValueError, r"Preset.class_name='' is invalid: the transformer's class name"),
    (None, ValueError, r"Preset.class_name=None is invalid"),
])
def test_register_preset_refuses_a_class_name_that_is_no_name(class_name, error, problem):
    """Before: ``register_preset(Preset(MyVideoTransformer3DModel, ...))`` (the class, not its name) was stored under the
    class object: apply never found it, and from then on every "not supported" error (``preset_for`` of any other
    model, ``recommended`` of an unknown class) failed with a bare "TypeError: sequence item 54: expected str instance,
    type found" while listing the supported names. A blank or None name was stored the same way. Now register_preset
    refuses it and the registry is left as it was."""
    from dit_accel.pipelines.presets import GridInfo, Preset, preset_for, register_preset

    cls = type("MyVideoTransformer3DModel", (torch.nn.Module,), {})
    preset = Preset(cls if class_name == "class" else class_name, attention=(r"blocks\.\d+\.attn1",),
                    text_position="none", read_grid=lambda m, a: GridInfo((1, 1, 1), 0), min_diffusers="0.35.0")
    before = dict(PRESETS)
    try:
        with pytest.raises(error, match=problem):
            register_preset(preset)
    finally:
        leaked = [k for k in PRESETS if k not in before]
        for k in leaked:
            PRESETS.pop(k)
    assert not leaked
    with pytest.raises(ValueError, match="dit_accel does not support transformer class Linear; supported: "):
        preset_for(torch.nn.Linear(2, 2))
