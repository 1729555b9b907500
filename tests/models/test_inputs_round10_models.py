"""Model loading and per-family token layouts, trust round 10: what a user of a real checkpoint hits. Each test
names what was wrong before its fix."""

import json

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.models.loading import ModelLoadError, load_pipeline
from dit_accel.pipelines.presets import PRESETS
from tests.utils import ReferenceAttention, method_mask


def _index(folder, **entries):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_diffusers_version": "0.42.1", **entries}))
    return folder


def test_a_folder_saved_by_a_newer_diffusers_names_the_missing_pipeline_class(tmp_path):
    """Before: a folder whose model_index.json names a pipeline class the installed Diffusers lacks (saved by a newer
    release) raised a raw ``AttributeError: module diffusers has no attribute WanFuturePipeline``, which the CLI
    does not catch (a traceback). Now one ModelLoadError line names the class, the installed version and the fix."""
    folder = _index(tmp_path / "wan-next", _class_name="WanFuturePipeline", transformer=["diffusers", "X"])
    with pytest.raises(ModelLoadError, match=r"holds a WanFuturePipeline, which the installed Diffusers [\d.]+ does "
                                             r"not have: upgrade it \(pip install -U diffusers\)") as err:
        load_pipeline(str(folder))
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_a_single_file_checkpoint_is_called_a_file_not_a_folder(tmp_path):
    """Before: ``--model flux1-dev.safetensors`` said "…flux1-dev.safetensors is not a Diffusers pipeline folder (no
    model_index.json)", as if it were a folder. Now it says it is a file and how to get a folder from it."""
    checkpoint = tmp_path / "flux1-dev.safetensors"
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"flux1-dev.safetensors is a file, not a Diffusers pipeline folder") \
            as err:
        load_pipeline(str(checkpoint))
    assert "from_single_file" in str(err.value)


def test_a_component_folder_names_the_pipeline_folder_above_it(tmp_path):
    """Before: passing a pipeline's ``transformer`` subfolder said it is not a pipeline folder and to pass "the folder
    that save_pretrained produced", without saying which. Now it names the pipeline folder to pass."""
    pipeline = _index(tmp_path / "Wan2.1-T2V-1.3B-Diffusers", _class_name="WanPipeline")
    (pipeline / "transformer").mkdir()
    (pipeline / "transformer" / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="is a component of the pipeline folder") as err:
        load_pipeline(str(pipeline / "transformer"))
    assert str(err.value).endswith(f"pass {pipeline.resolve()}")
    lone = tmp_path / "lone"
    lone.mkdir()
    with pytest.raises(ModelLoadError, match=r"lone is not a Diffusers pipeline folder \(no model_index.json\)"):
        load_pipeline(str(lone))


def test_a_missing_relative_folder_offline_is_said_to_be_neither_folder_nor_cached(tmp_path, monkeypatch):
    """Before: ``--model models/wan`` (a folder the user thought was there) under HF_HUB_OFFLINE=1 said only "'models/wan'
    is not in the local Hugging Face cache", as if the user had meant a hub id. Now it says there is no such folder
    either."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'models/wan' is neither a folder here nor in the local Hugging Face "
                                             r"cache, and HF_HUB_OFFLINE=1 forbids downloading"):
        load_pipeline("models/wan")


def _built(name, **config):
    """The tiny transformer ``name`` with ``config`` over its tiny config (options the tiny model does not use)."""
    import diffusers

    entry = T.TRANSFORMERS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(diffusers, entry.class_name)(**{**entry.config, **config}).eval()


def _sparse_and_reference(model, kwargs, method, grid):
    """The model's output under ``method`` and under the masked-dense reference on ``grid``, and the rows."""
    with torch.no_grad():
        with ReferenceAttention(method_mask(method, grid), PRESETS[type(model).__name__].text_position) as ref_mode:
            want = model(**kwargs)[0]
        with dit_accel.apply(model, method, backend="torch") as handle:
            out = model(**kwargs)[0]
            rows = handle.stats()
    assert ref_mode.calls > 0
    return out, want, rows


@pytest.mark.parametrize("method", [dit_accel.Tile(tile=(2, 2), window=(3, 3)), dit_accel.GNA(kernel_size=(3, 5))])
def test_the_hunyuanimage_refiner_call_is_an_image_grid(method):
    """Before: HunyuanImage 2.1's refiner (the same class with ``patch_size=(1, 1, 1)``, called with (B, C, 1, H, W)
    latents) was read as a (1, H, W) grid: every 2-D setting failed at the first call ("tile=(2, 2) has 2 values but
    the grid has 3 dimensions") and apply refused every 3-D one (the class's grid is 2-D): no sparse setting ran.
    Now its one frame is the (H, W) image grid: sparse, equal to the masked reference."""
    model = _built("hunyuanimage", patch_size=(1, 1, 1), rope_axes_dim=(4, 6, 6))
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(2, 4, 1, 5, 7, generator=g), timestep=torch.full((2,), 500.0),
                  encoder_hidden_states=torch.randn(2, 7, 16, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * 7, [1] * 3 + [0] * 4]), return_dict=False)
    out, want, rows = _sparse_and_reference(model, kwargs, method, (5, 7))
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert all(r["sparse_calls"] == 1 and r["dense_calls"] == 0 for r in rows)
    frames = {**kwargs, "hidden_states": torch.randn(2, 4, 2, 5, 7, generator=g)}
    with dit_accel.apply(model, method, backend="torch"), pytest.raises(ValueError, match="holds 2 latent frames"):
        model(**frames)


@pytest.mark.parametrize("model, cls", [
    # Diffusers' own ids for HunyuanImage 2.1 (its pipelines' docstrings) sit under "hunyuanvideo-community"
    ("hunyuanvideo-community/HunyuanImage-2.1-Diffusers", "HunyuanImageTransformer2DModel"),
    ("hunyuanvideo-community/HunyuanImage-2.1-Refiner-Diffusers", "HunyuanImageTransformer2DModel"),
    ("hunyuanvideo-community/HunyuanVideo", "HunyuanVideoTransformer3DModel"),
    ("Skywork/SkyReels-V1-Hunyuan-I2V", "HunyuanVideoTransformer3DModel"),
    # "wan" as a word of its own, after a prefix (FastWan) or before "video", but not inside a longer word
    ("FastVideo/FastWan2.1-T2V-1.3B-Diffusers", "WanTransformer3DModel"),
    ("Kijai/WanVideo_comfy", "WanTransformer3DModel"),
    ("/models/wan", "WanTransformer3DModel"),
])
def test_hub_ids_of_hunyuanimage_and_wan_name_their_class(model, cls):
    """Before: Diffusers' HunyuanImage 2.1 ids ("hunyuanvideo-community/HunyuanImage-2.1-Diffusers") resolved to
    HunyuanVideoTransformer3DModel (its "hunyuan" word matched the organisation's name): ``info`` showed HunyuanVideo's
    published video settings and calibrate and finetune took an image model for a video one. Now they name
    HunyuanImage; the HunyuanVideo and Wan ids still resolve as before."""
    from dit_accel.pipelines.presets import resolve_model_family

    assert resolve_model_family(model)[0] == cls


def test_an_id_that_only_contains_the_letters_wan_is_not_taken_for_wan():
    """Before: "wangfuyun/AnimateLCM" (an AnimateDiff U-Net, from Diffusers' docstrings) resolved to
    WanTransformer3DModel, so ``info`` and calibrate described a Wan model; now it is not told apart, and says so."""
    from dit_accel.pipelines.presets import resolve_model_family

    with pytest.raises(ValueError, match="cannot tell which model 'wangfuyun/AnimateLCM' is"):
        resolve_model_family("wangfuyun/AnimateLCM")


@pytest.mark.parametrize("words, problem", [
    (("my-model",), "'my-model' is not a (regex, family or None) pair"),  # one word, not a pair
    ("my-model", "a str, not a tuple of pairs"),
    ((("my[model", None),), "unterminated character set"),
    ((("my-model", 3),), "('my-model', 3) is not a (regex, family or None) pair"),
])
def test_register_preset_refuses_malformed_hub_words(words, problem):
    """Before: ``register_preset(Preset(..., hub_words=("my-model",)))`` was accepted, and from then on every
    ``resolve_model_family`` (``dit-accel info --model``, calibrate, finetune) of an id no earlier preset names failed
    with a raw "ValueError: too many values to unpack (expected 2)" (or ``re.error``). Now register_preset refuses it,
    naming the class and the form, and leaves the registry as it was."""
    from dit_accel.pipelines.presets import GridInfo, Preset, register_preset, resolve_model_family

    preset = Preset("MyWordsTransformer", attention=(r"blocks\.\d+\.attn1",), text_position="none",
                    read_grid=lambda model, args: GridInfo((2, 2), 0), min_diffusers="0.35.0", hub_words=words)
    try:
        with pytest.raises(ValueError, match=r"Preset 'MyWordsTransformer': hub_words=.* is invalid \(") as err:
            register_preset(preset)
        assert problem in str(err.value) and "MyWordsTransformer" not in PRESETS
        with pytest.raises(ValueError, match="cannot tell which model 'org/some-model' is"):
            resolve_model_family("org/some-model")
    finally:
        PRESETS.pop("MyWordsTransformer", None)


def _cached(cache, repo, files):
    """A snapshot of hub id ``repo`` in the Hugging Face cache folder ``cache``, holding ``files`` (name: text)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / "0123456789abcdef"
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text("0123456789abcdef")
    return snapshot


def test_an_offline_hub_id_whose_cached_snapshot_is_no_pipeline_says_so(tmp_path, monkeypatch):
    """Before: under HF_HUB_OFFLINE=1 a hub id held in the cache as a transformer-only repo (a single checkpoint's
    repo) or an incomplete pipeline said "'org/wan-transformer' is not in the local Hugging Face cache" and told the
    user to download it: which they had. Now it names the cached snapshot and what is wrong with it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    lone = _cached(tmp_path, "org/wan-transformer", {"config.json": '{"_class_name": "WanTransformer3DModel"}'})
    with pytest.raises(ModelLoadError, match="is in the local Hugging Face cache") as err:
        load_pipeline("org/wan-transformer")
    assert str(lone) in str(err.value) and "holds no model_index.json (not a Diffusers pipeline" in str(err.value)
    index = json.dumps({"_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
                        "transformer": ["diffusers", "WanTransformer3DModel"]})
    _cached(tmp_path, "org/wan-partial", {"model_index.json": index})
    with pytest.raises(ModelLoadError, match=r"'org/wan-partial' is in the local Hugging Face cache \(.*\) but could "
                                             r"not be loaded from it \("):
        load_pipeline("org/wan-partial")


def test_recommended_and_the_family_of_a_compiled_transformer_are_those_of_the_model():
    """Before: after ``pipe.transformer = torch.compile(pipe.transformer)``, ``recommended(pipe.transformer, "radial")``
    raised "no preset for OptimizedModule; supported: ..., WanTransformer3DModel, ..." (a Wan model, said unknown) and
    ``family_of`` gave None (published settings of every family). Now they read the module torch.compile wraps, as
    apply does (round 25: it goes on the module the wrapper compiles)."""
    from dit_accel.pipelines.presets import family_of, published_settings, recommended

    model = T.build_tiny_transformer("wan")
    compiled = torch.compile(model)  # lazy: nothing compiles until a call
    assert recommended(compiled, "radial") == recommended(model, "radial")
    assert family_of(compiled) == family_of(model) == "Wan 2.1"
    assert published_settings(compiled) == published_settings(model, family="Wan 2.1")
    with dit_accel.apply(compiled, dit_accel.Dense()) as handle:
        assert handle.transformer is model


@pytest.mark.parametrize("text, found", [
    ('{"transformer": ["diffusers", "WanTransformer3DModel"]}', "holds no _class_name"),
    ("[1, 2]", "holds a JSON list"),
])
def test_a_model_index_that_names_no_pipeline_class_is_one_line(tmp_path, text, found):
    """Before: a folder whose model_index.json has no ``_class_name`` (a hand-written index) raised a raw
    ``KeyError: '_class_name'`` from Diffusers, and one that is a JSON list a raw ``TypeError: pop expected at most 1
    argument, got 2``: tracebacks the CLI does not catch. Now one ModelLoadError line names the file and the form."""
    folder = tmp_path / "my-wan"
    folder.mkdir()
    (folder / "model_index.json").write_text(text)
    with pytest.raises(ModelLoadError, match=f"model_index.json {found}, not a Diffusers pipeline index"):
        load_pipeline(str(folder))


def test_a_cached_hub_snapshot_whose_index_names_no_pipeline_class_is_one_line(tmp_path, monkeypatch):
    """Before: Diffusers' bare ``KeyError: '_class_name'`` (local folders were already checked)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = _cached(tmp_path, "org/no-class", {"model_index.json": json.dumps({"_diffusers_version": "0.42.1"})})
    with pytest.raises(ModelLoadError, match="holds no _class_name, not a Diffusers pipeline index") as err:
        load_pipeline("org/no-class")
    assert str(snapshot / "model_index.json") in str(err.value)
