"""Fine-tuning refuses ``--frames``/``--height``/``--width`` that the model's VAE factors and patch size do not take
before the model loads, read from its folder's configs (before: only once it had loaded, minutes for a real model),
with the words the trainer uses once it has loaded."""
import json

import pytest

import dit_accel
from dit_accel.models import loading
from dit_accel.training import FinetuneConfig, finetune
from dit_accel.training.model_io import FluxIO, HunyuanVideoIO, ModelIO

pytestmark = pytest.mark.usefixtures("one_thread")


class _Loaded(Exception):
    """The loader was reached: the inputs passed the checks before it."""


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise _Loaded()

    monkeypatch.setattr(loading, "load_pipeline", refuse)


def _config(tmp_path, prompts_file, model, **shape):
    return FinetuneConfig(model=str(model), method=dit_accel.SLA(topk=0.5), output=str(tmp_path / "out"),
                          prompts=str(prompts_file), steps=1, rank=4, progress=False, eval_batches=0,
                          max_sequence_length=16, **shape)


def _folder(root, pipeline, transformer_class, transformer, vae_class, vae):
    """A Diffusers folder's configs (no weights: the check must not need them)."""
    for name, config in (("transformer", {"_class_name": transformer_class, **transformer}),
                         ("vae", {"_class_name": vae_class, **vae})):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline,
                                                       "transformer": ["diffusers", transformer_class],
                                                       "vae": ["diffusers", vae_class]}))
    return root


WAN_5B = ("WanPipeline", "WanTransformer3DModel", {"patch_size": [1, 2, 2], "in_channels": 48},
          "AutoencoderKLWan", {"scale_factor_temporal": 4, "scale_factor_spatial": 16})
HUNYUAN = ("HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel",
           {"patch_size": 2, "patch_size_t": 1, "in_channels": 16},
           "AutoencoderKLHunyuanVideo", {"temporal_compression_ratio": 4, "spatial_compression_ratio": 8})
FLUX = ("FluxPipeline", "FluxTransformer2DModel", {"patch_size": 1, "in_channels": 64},
        "AutoencoderKL", {"block_out_channels": [128, 256, 512, 512]})


@pytest.mark.parametrize("family, shape, says", [
    (WAN_5B, dict(frames=17, height=48, width=64), r"--height 48 / --width 64 must be positive multiples of 32 "
                                                   r"\(VAE factor 16 x patch 2\)"),
    (WAN_5B, dict(frames=19, height=64, width=64), r"--frames 19 is invalid for this model: use 1 \(images\) or 4\*k\+1"),
    (HUNYUAN, dict(frames=8, height=64, width=64), r"--frames 8 is invalid for this model"),
    (HUNYUAN, dict(frames=9, height=72, width=64), r"must be positive multiples of 16 \(VAE factor 8 x patch 2\)"),
    (FLUX, dict(frames=1, height=72, width=64), r"must be positive multiples of 16 \(VAE factor 8 x 2x2 packing\) "
                                                r"for FLUX"),
    (FLUX, dict(frames=5, height=64, width=64), r"--frames 5 is invalid for FLUX"),
], ids=["wan5b-size", "wan5b-frames", "hunyuan-frames", "hunyuan-size", "flux-size", "flux-frames"])
def test_a_size_the_model_does_not_take_is_refused_before_it_loads(family, shape, says, tmp_path, prompts_file,
                                                                   no_model):
    model = _folder(tmp_path / "model", *family)
    with pytest.raises(ValueError, match=says):
        finetune(_config(tmp_path, prompts_file, model, **shape))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, shape", [
    (WAN_5B, dict(frames=17, height=64, width=96)), (HUNYUAN, dict(frames=9, height=48, width=64)),
    (FLUX, dict(frames=1, height=48, width=64))], ids=["wan5b", "hunyuan", "flux"])
def test_a_size_the_model_takes_goes_on_to_load(family, shape, tmp_path, prompts_file, no_model):
    with pytest.raises(_Loaded):
        finetune(_config(tmp_path, prompts_file, _folder(tmp_path / "model", *family), **shape))


def test_a_folder_whose_configs_say_nothing_is_left_to_the_check_after_loading(tmp_path, prompts_file, no_model):
    model = _folder(tmp_path / "model", "WanPipeline", "WanTransformer3DModel", {}, "AutoencoderKLWan", {})
    with pytest.raises(_Loaded):  # (no patch size: the loaded model's own config decides)
        finetune(_config(tmp_path, prompts_file, model, frames=17, height=48, width=64))


def _pipeline(family):
    """The family's Diffusers pipeline around a small VAE of non-default factors, nothing else loaded."""
    import diffusers

    if family == "wan":
        vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[True],
                                         scale_factor_temporal=2, scale_factor_spatial=2)
        return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=None, scheduler=None), vae
    if family == "hunyuan":
        vae = diffusers.AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4,
                                                  down_block_types=("HunyuanVideoDownBlock3D",) * 3,
                                                  up_block_types=("HunyuanVideoUpBlock3D",) * 3,
                                                  spatial_compression_ratio=4, temporal_compression_ratio=4)
        return diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=None, vae=vae,
                                              scheduler=None, text_encoder_2=None, tokenizer_2=None), vae
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8, 8), norm_num_groups=4, layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    return diffusers.FluxPipeline(scheduler=None, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=None), vae


@pytest.mark.parametrize("family, io", [("wan", ModelIO), ("hunyuan", HunyuanVideoIO), ("flux", FluxIO)])
def test_the_factors_read_from_the_vae_config_are_the_pipelines(family, io):
    """The check before loading reads the VAE's config.json as each pipeline's __init__ does (Wan:
    scale_factor_*; HunyuanVideo: *_compression_ratio; FLUX: 2 ** (VAE blocks - 1))."""
    pipe, vae = _pipeline(family)
    scales = io.pipe_scales(json.loads(json.dumps(dict(vae.config))))
    assert scales == {name: getattr(pipe, name) for name in scales}
    assert scales != io.pipe_scales({})  # (not the fallbacks: the test tells a value read from one not read)


def test_an_embedded_model_is_checked_from_its_folder(tmp_path, prompts_file, no_model):
    """tiny-shapes ships as a Diffusers folder (WanPipeline; VAE factors 2 and 2, patch 2)."""
    with pytest.raises(ValueError, match=r"--frames 4 is invalid for this model: use 1 \(images\) or 2\*k\+1"):
        finetune(_config(tmp_path, prompts_file, "tiny-shapes", frames=4, height=32, width=32))
    with pytest.raises(ValueError, match=r"--height 30 / --width 32 must be positive multiples of 4"):
        finetune(_config(tmp_path, prompts_file, "tiny-shapes", frames=5, height=30, width=32))
