"""Model loading and tiny models, trust round 17: what a Diffusers user passing their own values hits. Each test names
what was wrong before its fix."""

import json

import pytest
import torch

from dit_accel.models import tiny as T
from dit_accel.models.loading import ModelLoadError, load_pipeline, rope_reach_error
from dit_accel.models.tiny_shapes import TRAINED_MODELS


@pytest.fixture(scope="module")
def tiny_wan():
    return load_pipeline("tiny-wan")


@pytest.mark.parametrize("model, name, dtype", [
    ("tiny-shapes", "bf16", torch.bfloat16),  # a folder: Diffusers logged "Defaulting to torch.float32"
    ("tiny-shapes", "float16", torch.float16),
    ("tiny-wan", "torch.bfloat16", torch.bfloat16),  # built in code: a bare TypeError from pipe.to
    ("tiny-wan", "fp16", torch.float16),
])
def test_load_pipeline_takes_the_dtype_names_diffusers_users_write(model, name, dtype):
    """Before: ``load_pipeline("tiny-shapes", dtype="bf16")`` (a folder, like any local or hub model) loaded float32
    weights without an error (Diffusers only logged that it defaulted to float32), and the tiny models failed in
    ``pipe.to`` with "to() received an invalid combination of arguments". Now the name is the dtype."""
    pipe = load_pipeline(model, dtype=name)
    assert pipe.transformer.dtype == dtype and pipe.vae.dtype == dtype


@pytest.mark.parametrize("dtype", ["auto", "bf32", torch.int8, 16])
def test_load_pipeline_names_a_dtype_it_cannot_use(dtype):
    """Before: ``dtype="auto"`` loaded float32 from a folder (or hub) without a word, ``torch.int8`` failed deep in
    Diffusers. Now one ValueError names the argument and what it takes, before anything loads."""
    for model in ("tiny-shapes", "tiny-wan"):
        with pytest.raises(ValueError, match=rf"dtype={dtype!r} is invalid: the weight dtype, a floating torch.dtype "
                                             r"\(torch.bfloat16\) or its name \('float32', .*'bf16'\)"):
            load_pipeline(model, dtype=dtype)
    with pytest.raises(ValueError, match=r"dtype='auto' is invalid"):
        T.build_tiny_pipeline("tiny-wan", dtype="auto")


@pytest.mark.parametrize("inside", ["model_index.json", "transformer/diffusion_pytorch_model.safetensors",
                                    "transformer/config.json"])
def test_a_file_inside_a_pipeline_folder_names_the_folder_to_pass(inside):
    """Before: ``--model .../tiny-shapes/model_index.json`` (or a component's weights) was taken for a single-file
    checkpoint: "not a Diffusers pipeline folder ... load it with the pipeline class's from_single_file", which
    fails on a Diffusers-format file. Now it names the pipeline folder the file belongs to."""
    folder = TRAINED_MODELS["tiny-shapes"]
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder / inside))
    assert str(err.value).endswith(f"is a file of the Diffusers pipeline folder {folder.resolve()}, not the folder: "
                                   f"pass {folder.resolve()}")
    assert "from_single_file" not in str(err.value)


def test_a_pipeline_folder_missing_component_folders_names_them(tmp_path):
    """Before: a partial copy whose model_index.json names a ``vae`` that is not there said "Error no file named
    config.json found in directory <the pipeline folder>", naming neither the component nor its folder. Now the
    missing component folders are named (a component set to [null, null] is not one)."""
    folder = tmp_path / "wan"
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "boundary_ratio": None,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "transformer_2": [None, None],
        "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"]}))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder))
    assert str(err.value) == (f"{folder} lacks the component folders transformer (WanTransformer3DModel), vae "
                              "(AutoencoderKLWan) that its model_index.json names: copy or download the whole pipeline "
                              "folder again")


def test_rope_reach_counts_the_latent_frames_the_wan_pipeline_rounds_to(tiny_wan):
    """Before: ``--frames 256`` on tiny-wan (rope_max_seq_len 64, 4x temporal VAE) was counted as (256 - 1) // 4 + 1 =
    64 latent frames and let through, but WanPipeline rounds 256 to 257 frames, 65 latent ones, and the first step
    failed in the model ("shape '[65, 1, 1, -1]' is invalid"). Now the check counts what the pipeline encodes."""
    call = {"height": 16, "width": 16}
    assert rope_reach_error(tiny_wan, {**call, "num_frames": 253}) is None
    assert rope_reach_error(tiny_wan, {**call, "num_frames": 255}) is None  # rounded down to 253
    for frames in (256, 257):
        assert rope_reach_error(tiny_wan, {**call, "num_frames": frames}) == (
            f"--frames {frames} is past what WanTransformer3DModel's rotary embedding covers (64 positions per axis, "
            "rope_max_seq_len): give --frames 253 or less")
    with torch.no_grad(), pytest.raises(RuntimeError):  # what the call made of 256 frames
        tiny_wan.transformer(hidden_states=torch.randn(1, 4, 256 // 4 + 1, 2, 2), timestep=torch.tensor([500]),
                             encoder_hidden_states=torch.randn(1, 4, 32))


def test_tiny_dit_refuses_a_grid_that_is_not_square():
    """Before: ``tiny_transformer_inputs("dit", model, grid=(5, 7))`` built the inputs and the forward pass failed in
    Diffusers' unpatchify ("shape '[-1, 5, 5, 2, 2, 8]' is invalid for input of size 2240"). Now the grid is
    refused, with the reason."""
    model = T.build_tiny_transformer("dit")
    with pytest.raises(ValueError, match=r"grid=\(5, 7\) is invalid for tiny 'dit': DiTTransformer2DModel "
                                         r"unpatchifies its output as a square, so give a square grid \(H == W\)"):
        T.tiny_transformer_inputs("dit", model, grid=(5, 7))
    kwargs = T.tiny_transformer_inputs("dit", model, grid=(6, 6))
    with torch.no_grad():
        assert model(**kwargs)[0].shape[-2:] == (12, 12)


def test_a_pathlib_path_is_a_folder_like_its_string():
    """Before: ``load_pipeline(Path("models/wan"))`` (Diffusers' from_pretrained takes a Path) was refused as
    "model=PosixPath(...) is invalid: pass an embedded name ..., a folder or a hub id", and ``model_folder`` of a
    Path was None (no "files:" fingerprint, ``same_model`` false for the same folder). Now a Path is its folder."""
    from pathlib import Path

    from dit_accel.models.loading import model_folder, resolve_model_kind, same_model

    folder = Path(TRAINED_MODELS["tiny-shapes"])
    assert resolve_model_kind(folder) == "folder" and model_folder(folder) == folder
    assert same_model(folder, "tiny-shapes")
    assert type(load_pipeline(folder)).__name__ == "WanPipeline"
    with pytest.raises(ModelLoadError, match=r"neither an embedded model .*, an existing folder, nor a hub id"):
        load_pipeline(folder / "missing")


def test_a_component_with_only_variant_weights_says_which_variant(tmp_path):
    """Before: a folder whose transformer holds only diffusion_pytorch_model.fp16.safetensors (a download of the
    fp16 variant's files) said "Error no file named diffusion_pytorch_model.bin found in directory .../transformer",
    though the weights are there. Now the message names the variant and how to make a plain folder of it."""
    folder = tmp_path / "wan"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text("{}")
    for shard in ("diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
                  "diffusion_pytorch_model-00002-of-00002.fp16.safetensors"):
        (folder / "transformer" / shard).write_bytes(b"\0" * 8)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "WanTransformer3DModel"]}))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder))
    assert str(err.value).startswith(f"{folder / 'transformer'} holds only 'fp16'-variant weights (such as "
                                     "*.fp16.safetensors), and dit_accel loads the plain ones: save the pipeline "
                                     "without the variant once (DiffusionPipeline.from_pretrained(folder, "
                                     "variant='fp16').save_pretrained(new_folder))")


def _tiny_pixart_sigma():
    """A PixArtSigmaPipeline of tiny parts with an 8x VAE (four blocks), as the real checkpoints have."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    from dit_accel.models.tiny._common import t5_tokenizer, tiny_t5_settings

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = t5_tokenizer()
        encoder = T5EncoderModel(T5Config(**{**tiny_t5_settings(tokenizer), "d_model": 16})).eval()
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                            sample_size=64).eval()
    return PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                               transformer=T.build_tiny_transformer("pixart"), scheduler=DPMSolverMultistepScheduler())


def test_a_size_off_the_vae_times_the_patch_is_refused_for_the_pipelines_that_check_the_vae_alone(tmp_path):
    """Before: PixArt-Sigma (like PixArt-Alpha, HunyuanDiT, CogVideoX and CogView3-Plus) checks only that the height
    is a multiple of its VAE's 8, so ``--height 136`` passed dit_accel's size check too; its transformer (2x2
    patches) dropped the 17th latent row and the first scheduler step failed with a raw "The size of tensor a (17)
    must match the size of tensor b (16)". Now both size checks (after loading, and before it from the folder's
    transformer config) ask for multiples of 8 x patch = 16, naming the flag."""
    from dit_accel.models.loading import early_size_error, size_error

    pipe = _tiny_pixart_sigma()
    call = dict(prompt="a cat", width=128, num_inference_steps=2, output_type="latent", max_sequence_length=8,
                use_resolution_binning=False)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(17\) must match"):  # what the call does
        pipe(height=136, **call)
    expected = ("--height 136: PixArtSigmaPipeline takes only heights and widths that are multiples of 16 (its VAE "
                "and patches); give --height 128 or 144")
    assert size_error(pipe, {"height": 136, "width": 128}) == expected
    assert size_error(pipe, {"height": 144, "width": 128}) is None
    folder = tmp_path / "pixart"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtSigmaPipeline"}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"patch_size": 2}))
    assert early_size_error(str(folder), 136, 128) == expected
    (folder / "transformer" / "config.json").write_text(json.dumps({"patch_size": 1}))  # a 1x1 patch: the VAE's 8
    assert early_size_error(str(folder), 136, 128) is None
