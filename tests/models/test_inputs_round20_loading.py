"""Loading models, weights folders, JSON files and frames, trust round 20: what a user passing their own hub ids,
files and arrays hits. Each test names what was wrong before its fix."""

import json
import re

import numpy as np
import pytest
import torch

import dit_accel
from dit_accel.atomic_files import BadFileError, read_json
from dit_accel.eval.metrics import psnr_per_frame, to_frames
from dit_accel.models.loading import ModelLoadError, load_pipeline, resolve_model_kind
from dit_accel.videos import load_video, save_video

HUB_ID = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"


# ------------------------------------------------------------------ JSON files with NaN or Infinity
@pytest.mark.parametrize("text,constant,where", [
    ('{"method": {"method": "sla", "topk": NaN}}', "NaN", "method.topk"),
    ('{"loss": [0.5, Infinity]}', "Infinity", "loss[1]"),
    ('{"a": {"b": [{"c": -Infinity}]}}', "-Infinity", "a.b[0].c"),
], ids=["nan", "inf-in-list", "nested"])
def test_read_json_refuses_nan_and_infinity_naming_the_key(tmp_path, text, constant, where):
    """Before: ``read_json`` (plans, method files, indexes, run records) took Python's NaN and Infinity, which are
    no JSON, and handed a NaN setting on (to run as NaN, or to pass range checks that NaN fails silently)."""
    path = tmp_path / "file.json"
    path.write_text(text)
    pattern = rf"file\.json: holds {re.escape(constant)} at {re.escape(where)}"
    with pytest.raises(BadFileError, match=pattern + r".*no JSON number.*write a number \(or null\) there"):
        read_json(path)
    path.write_text(text.replace(constant, "0.5"))
    assert isinstance(read_json(path), dict)
    path.write_text('{"prompt": "NaN and Infinity are words here"}')  # (strings are not numbers)
    assert read_json(path) == {"prompt": "NaN and Infinity are words here"}


def test_a_weights_folder_method_file_with_nan_is_refused_naming_the_file_and_key(tmp_path):
    """Before: ``read_weights_info`` of a folder whose method file says ``"alpha": NaN`` returned the NaN alpha."""
    (tmp_path / "dit_accel_method.json").write_text(
        '{"format": 1, "method": {"method": "sla", "topk": 0.5}, "files": {"lora": null, "sla_projections": null}, '
        '"lora": {"rank": 2, "alpha": NaN}}')
    with pytest.raises(BadFileError, match=r"dit_accel_method\.json: holds NaN at lora\.alpha"):
        dit_accel.read_weights_info(tmp_path)


# ------------------------------------------------------------------ a LoRA whose adapter metadata scales by NaN
@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A tiny-wan SLA weights folder with a LoRA over to_q (finite tensors)."""
    from peft import LoraConfig

    from dit_accel.checkpoints.finetuned import save_trained_weights
    from dit_accel.models.tiny import build_tiny_pipeline

    method = dit_accel.SLA(topk=0.5)
    transformer = build_tiny_pipeline("tiny-wan").transformer
    handle = dit_accel.apply(transformer, method)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"])
    transformer.add_adapter(config)
    folder = tmp_path_factory.mktemp("lora") / "weights"
    save_trained_weights(folder, transformer=transformer, method=method, lora_config=config,
                         sla_projections=handle.sla_projections(), extra={"dense_layers": None})
    return folder


def _with_metadata(src, dst, field, value):
    """A copy of the weights folder ``src`` at ``dst`` whose LoRA's adapter metadata gives ``field=value`` (the
    method file's hashes updated, as a file written so would have them)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dit_accel.atomic_files import file_hashes
    from dit_accel.checkpoints.finetuned import LORA_FILE, METHOD_FILE

    shutil.copytree(src, dst)
    path = dst / LORA_FILE
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    adapter = json.loads(metadata["lora_adapter_metadata"])
    adapter[f"transformer.{field}"] = value
    metadata["lora_adapter_metadata"] = json.dumps(adapter)  # (Python's json writes NaN, as a hand edit could)
    save_file(load_file(str(path)), str(path), metadata=metadata)
    info = json.loads((dst / METHOD_FILE).read_text())
    info["sha256"] = file_hashes(dst, list(info["sha256"]))
    (dst / METHOD_FILE).write_text(json.dumps(info))
    return dst


@pytest.mark.parametrize("field,value,shown", [("lora_alpha", float("nan"), "lora_alpha=nan"),
                                               ("lora_alpha", float("inf"), "lora_alpha=inf"),
                                               ("alpha_pattern", {"blocks.0.attn1.to_q": float("nan")},
                                                r"alpha_pattern\['blocks.0.attn1.to_q'\]=nan")],
                         ids=["nan-alpha", "inf-alpha", "nan-pattern"])
def test_a_lora_whose_metadata_scales_by_nan_is_refused_before_loading(lora_folder, tmp_path, field, value, shown):
    """Before: a LoRA file whose adapter metadata says ``lora_alpha: NaN`` passed every check (its tensors are
    finite) and loaded as a LoRA of scale NaN: every output of the model was NaN."""
    from dit_accel.models.tiny import build_tiny_pipeline

    folder = _with_metadata(lora_folder, tmp_path / "weights", field, value)
    transformer = build_tiny_pipeline("tiny-wan").transformer
    handle = dit_accel.apply(transformer, dit_accel.SLA(topk=0.5))
    with pytest.raises(BadFileError, match=rf"pytorch_lora_weights\.safetensors: its adapter metadata gives {shown}"
                                           r"; expected a finite number"):
        handle.load_weights(folder)
    assert not getattr(transformer, "peft_config", None)  # nothing was loaded


# ------------------------------------------------------------------ hub ids written otherwise
@pytest.mark.parametrize("model,why", [
    (HUB_ID + "/", "a hub id has no trailing '/'"),
    ("https://huggingface.co/" + HUB_ID, "a hub id is owner/name, not its web address"),
    ("https://huggingface.co/" + HUB_ID + "/tree/main", "a hub id is owner/name, not its web address"),
    (HUB_ID + "/transformer", "'transformer' is a folder inside the hub model"),
    (" " + HUB_ID, "it has spaces around it"),
], ids=["trailing-slash", "url", "url-tree", "subfolder", "space"])
def test_a_hub_id_written_otherwise_says_what_to_pass_without_the_network(model, why, monkeypatch):
    """Before: ``--model Wan-AI/Wan2.1-T2V-1.3B-Diffusers/`` (a shell's completion, or a copied web address) said
    "neither an embedded model (13 names), an existing folder, nor a hub id like 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'"
    for the very id it named."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (resolve_model_kind, load_pipeline):
        with pytest.raises(ModelLoadError, match=re.escape(why) + r".*pass 'Wan-AI/Wan2\.1-T2V-1\.3B-Diffusers' for "
                                                                  r"the hub model"):
            call(model)


@pytest.mark.parametrize("model", ["Tiny-Wan", "tiny-shapes "])
def test_an_embedded_name_written_otherwise_says_how_it_is_written(model):
    """Before: ``--model Tiny-Wan`` (or a name with a space, read from a config file) said "neither an embedded model
    (tiny-shapes, ..., tiny-wan, ...), an existing folder, nor a hub id", without saying which it nearly was."""
    name = model.strip().lower()
    with pytest.raises(ModelLoadError, match=f"the embedded model of that name is written '{name}': pass '{name}'"):
        load_pipeline(model)


def test_a_mistyped_local_path_is_not_called_a_hub_id(tmp_path, monkeypatch):
    """A path under a folder that is here (``models/wan/`` where ``models`` exists) is a local path: no hub id is
    suggested for it."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="an existing folder") as err:
        resolve_model_kind("models/wan/")
    assert "hub model" not in str(err.value)


# ------------------------------------------------------------------ frames whose layout reads both ways
def _rgb(frames=2, h=3, w=8):
    return np.random.default_rng(0).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)  # [F, H, W, 3]


def test_an_array_whose_layout_reads_both_ways_is_refused_and_layout_says_which():
    """Before: an array ``[F, H, W, 3]`` of frames 3 (or 1) pixels high was read as ``[F, 3, H, W]``: 3 "channels"
    of H x 3 images, scored transposed without a word."""
    video = _rgb()  # (2, 3, 8, 3): frames 3 high, 8 wide
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 3\) reads both as .*pass layout='FHWC' or 'FCHW'"):
        to_frames(video)
    with pytest.raises(ValueError, match="pass layout='HWC' or 'CHW'"):
        to_frames(video[0])
    frames = to_frames(video, layout="FHWC")
    assert frames.shape == (2, 3, 3, 8)
    assert torch.equal(frames, torch.as_tensor(video).permute(0, 3, 1, 2).float() / 255)
    assert to_frames(video[0], layout="HWC").shape == (1, 3, 3, 8)
    assert torch.equal(psnr_per_frame(frames, frames), torch.full((2,), 100.0))  # its result scores as it is
    assert to_frames(torch.zeros(2, 3, 8, 3)).shape == (2, 3, 8, 3)  # a tensor: [F, C, H, W], as returned
    with pytest.raises(ValueError, match="layout='HWCF' is invalid"):
        to_frames(video, layout="HWCF")


def test_the_advice_for_an_alpha_channel_first_cuts_the_channels_not_the_width():
    """Before: an RGBA video ``[F, 4, H, W]`` was told "Drop an alpha channel with video[..., :3]", which cut its
    width to 3; the result ``[F, 4, H, 3]`` was then read as ``[F, H, W, 3]`` and scored transposed, silently."""
    rgba = np.random.default_rng(1).random((2, 4, 6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"Drop an alpha channel with video\[:, :3\]"):
        to_frames(rgba)
    assert torch.equal(to_frames(rgba[:, :3]), torch.as_tensor(rgba[:, :3]))  # the advice, followed
    with pytest.raises(ValueError, match=r"Drop an alpha channel with video\[:3\]"):
        to_frames(rgba[0])
    with pytest.raises(ValueError, match=r"Drop an alpha channel with video\[\.\.\., :3\]"):
        to_frames(rgba.transpose(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"Grey frames \[F, H, W\] need their channel axis: video\[\.\.\., None\]"):
        to_frames(np.zeros((16, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"a pipeline's \.frames: pass one of them, video\[0\]"):
        to_frames(np.zeros((1, 2, 8, 8, 3), np.float32))


def test_a_list_of_three_grey_frames_is_three_frames_not_one_rgb_image():
    """Before: a list of 3 grey frames (PIL "L" images, or [H, W] arrays) became a (3, H, W) array, read as one RGB
    image: one frame scored where there were three, of mixed-up frames. PIL images are read as save_video reads them
    (and frames 3 pixels high are no puzzle: a PIL image is [H, W, C])."""
    from PIL import Image

    grey = np.random.default_rng(2).integers(0, 256, (3, 6, 8), dtype=np.uint8)
    frames = to_frames([Image.fromarray(g, "L") for g in grey])
    assert frames.shape == (3, 3, 6, 8)
    assert torch.equal(frames, torch.as_tensor(grey)[:, None].expand(-1, 3, -1, -1).float() / 255)
    assert torch.equal(to_frames(list(grey)), torch.as_tensor(grey)[:, None].float() / 255)
    assert psnr_per_frame(list(grey), list(grey)).shape == (3,)
    strips = [Image.fromarray(np.full((3, 8, 3), 9, np.uint8)) for _ in range(2)]  # 3 pixels high
    assert to_frames(strips).shape == (2, 3, 3, 8)
    assert to_frames(grey).shape == (1, 3, 6, 8)  # one array of 3 dims: one image, as documented


# ------------------------------------------------------------------ a video path under the home folder
def test_save_and_load_video_read_a_path_under_the_home_folder(tmp_path, monkeypatch):
    """Before: ``save_video(frames, "~/videos/clip.png")`` wrote ``./~/videos/clip_0000N.png`` (a folder named "~"
    in the working one), and ``load_video("~/videos/clip.png")`` did not look in the home folder."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    frames = _rgb(frames=2, h=8, w=8)
    written = save_video(frames, "~/videos/clip.png")
    assert written == home / "videos" / "clip.png" and (home / "videos" / "clip_00001.png").is_file()
    assert not (work / "~").exists()
    assert np.array_equal(load_video("~/videos/clip.png"), frames)



def test_convert_writes_and_reads_paths_under_the_home_folder(tmp_path, monkeypatch):
    """Before: ``convert_checkpoint("~/ck.safetensors", "~/turbo")`` said the checkpoint "is not a file", and with the
    checkpoint given in full wrote ``./~/turbo`` in the working folder (``dit-accel convert --out=~/turbo``, where
    the shell leaves the "~"), past the check that refuses to write into the home's ``turbo`` folder of other files."""
    from safetensors.torch import save_file

    from dit_accel.checkpoints.convert import convert_checkpoint
    from dit_accel.checkpoints.finetuned import METHOD_FILE

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    g = torch.Generator().manual_seed(0)
    proj = "blocks.{i}.self_attn.attn_op.local_attn.proj_l.{part}"
    save_file({proj.format(i=i, part=part): torch.randn(*((12, 12) if part == "weight" else (12,)), generator=g)
               for i in range(2) for part in ("weight", "bias")}, str(home / "ck.safetensors"))
    out = convert_checkpoint("~/ck.safetensors", "~/turbo")
    assert out == home / "turbo" and (home / "turbo" / METHOD_FILE).is_file()
    assert not (work / "~").exists()
    (home / "notes").mkdir()
    (home / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a folder with files in it"):
        convert_checkpoint("~/ck.safetensors", "~/notes")
    assert (home / "notes" / "todo.txt").read_text() == "mine" and not (work / "~").exists()

    # save_trained_weights and convert write through one writer: "~/weights" is the home's folder there too
    from dit_accel.checkpoints.finetuned import SLA_FILE, write_weights_folder

    written = write_weights_folder("~/weights", lambda staging: save_file({"a.weight": torch.ones(2)},
                                                                          str(staging / SLA_FILE)),
                                   {"method": {"method": "sla"}, "files": {"lora": None, "sla_projections": SLA_FILE}})
    assert written == home / "weights" and (home / "weights" / METHOD_FILE).is_file() and not (work / "~").exists()


def test_a_git_lfs_pointer_in_place_of_weights_is_named_with_what_to_run(tmp_path):
    """Before: a sparse-distilled checkpoint (FastWan) cloned without git-lfs, whose
    ``diffusion_pytorch_model.safetensors`` is the 130-byte pointer text, was "not a readable safetensors file
    (SafetensorError: Error while deserializing header: header too large)" when VSA looked for its gates."""
    from dit_accel.checkpoints.vsa_gates import gate_keys

    (tmp_path / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 5676070424\n")
    with pytest.raises(BadFileError, match=r"diffusion_pytorch_model\.safetensors: is a Git LFS pointer .*cloned "
                                           r"without git-lfs.*run `git lfs pull` in the clone"):
        gate_keys(tmp_path)


@pytest.mark.parametrize("convert", [lambda v: v.bfloat16(), lambda v: v.clone().requires_grad_(),
                                     lambda v: list(v.bfloat16())], ids=["bf16", "requires-grad", "list-of-bf16"])
def test_score_video_takes_frames_as_torch_holds_them(convert):
    """Before: ``score_video`` of bfloat16 frames (a pipeline run in bf16 with ``output_type="pt"``, permuted)
    raised numpy's raw "TypeError: Got unsupported ScalarType BFloat16", and of frames that require grad a raw
    RuntimeError; a CUDA tensor failed alike."""
    from dit_accel.models.clips import render_clip
    from dit_accel.models.groundtruth import score_video

    video = torch.as_tensor(render_clip("red", "circle", "left"))  # float [F, H, W, 3] in [0, 1]
    assert score_video(convert(video), "a red circle moving left")["all_ok"]
