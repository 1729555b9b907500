"""MiniMax-H3 as users run it (issue 38): the packed layouts Diffusers' own modular pipeline builds for its four
call forms (t2va, i2va, fl2va, ref2va) against a masked-dense reference, the H3 default (dense first steps,
64-token video tiles, the text/keyframe/audio prefix exact), LoRA loaded through Diffusers beside ``apply``,
and Ulysses context parallelism on CPU processes."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import dit_accel
from dit_accel.models import tiny as T
from dit_accel.pipelines.presets import PRESETS, recommended
from tests.torchrun import torchrun
from tests.utils import ReferenceAttention

CLASS = "MiniMaxH3Transformer3DModel"
GRID = (4, 8, 8)  # 4 latent frames of 8x8 patches: 64-token tiles, 3-frame windows skip far frame pairs
TEXT = 7
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


def layout(form: str, grid=GRID, text: int = TEXT, audio_latents: int = 5):
    """``(position_ids, token_tags, video_indices, audio_indices, text_indices, conditioning video rows)`` of a
    ``form`` call, built by Diffusers' own MiniMax-H3 layout steps (the transformer patch (1, 2, 2), 2 audio
    channels): t2va none, i2va a first-frame keyframe, fl2va first and last keyframes, ref2va an image reference,
    an audio reference and a video reference with its soundtrack."""
    from diffusers.modular_pipelines.minimax_h3.before_denoise import (MiniMaxH3PrepareLayoutStep,
                                                                        MiniMaxH3Ref2VAPrepareLayoutStep)

    f, h, w = grid
    tags = torch.ones(text, dtype=torch.long)
    common = dict(num_latent_frames=f, latent_height=2 * h, latent_width=2 * w, num_audio_latents=audio_latents,
                  patch_size=(1, 2, 2), audio_channels=2, audio_tag=2, video_tag=0)
    if form == "ref2va":
        refs = [SimpleNamespace(kind="image"), SimpleNamespace(kind="audio"),
                SimpleNamespace(kind="video", has_audio=True)]
        visual = [torch.zeros(1, 4, 1, 2 * h, 2 * w), torch.zeros(1, 4, 2, 2 * h, 2 * w)]
        sounds = [torch.zeros(6, 4), torch.zeros(4, 4)]
        out = MiniMaxH3Ref2VAPrepareLayoutStep.build_ref2va_packed_sequence(tags, refs, visual, sounds, **common)
    else:
        anchors = {"t2va": (), "i2va": ("first",), "fl2va": ("first", "last")}[form]
        out = MiniMaxH3PrepareLayoutStep.build_packed_sequence(tags, keyframe_anchors=anchors, **common)
    return out[:5] + (out[5],)


def inputs(model, form: str, batch: int = 2, seed: int = 3, grid=GRID, text: int = TEXT):
    pos, tags, video, audio, text_rows, cond = layout(form, grid, text)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    steps = torch.zeros(pos.shape[0], dtype=torch.long)
    steps[video[:cond]] = 1  # conditioning rows: their own (clean) timestep
    patch = cfg.in_channels * 4
    return dict(hidden_states=torch.randn(batch, video.numel(), patch, generator=g),
                audio_hidden_states=torch.randn(batch, audio.numel(), cfg.audio_in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, text, cfg.text_dim, generator=g),
                timestep=torch.tensor([0.6, 0.0]), timestep_indices=steps, token_tags=tags, position_ids=pos,
                video_indices=video, audio_indices=audio, text_indices=text_rows, return_dict=False)


def sta_mask(grid, tile, window) -> torch.Tensor:
    """Brute force sliding-tile attention: a query's window of ``window`` tiles per dimension is centred on its
    tile and shifted inside the grid of tiles at the borders; a key is seen when its tile is in the window."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, len(grid))
    seen = torch.ones(coords.shape[0], coords.shape[0], dtype=torch.bool)
    for d, (n, t, w) in enumerate(zip(grid, tile, window)):
        tiles = -(-n // t)
        qt = coords[:, d] // t
        start = (qt - w // 2).clamp(min=0).clamp(max=max(tiles - w, 0)) if tiles >= w else torch.zeros_like(qt)
        kt = coords[:, d] // t
        seen &= (kt[None, :] >= start[:, None]) & (kt[None, :] < start[:, None] + min(w, tiles))
    return seen


@pytest.fixture(scope="module")
def model():
    return T.build_tiny_transformer("minimax_h3")


def test_the_default_is_64_token_tiles_with_dense_first_steps():
    method, kwargs = recommended(CLASS, "tile")
    assert method == dit_accel.Tile(tile=(1, 8, 8), window=(3, 3, 3), fit=True) and kwargs == {"dense_steps": 10}
    assert next(iter(PRESETS[CLASS].defaults)) == "tile"  # what `generate` runs without --method
    assert sta_mask(GRID, (1, 8, 8), (3, 3, 3)).float().mean() == pytest.approx(12 / 16)  # frames 0, 1 see 0-2; frames 2, 3 see 1-3


@pytest.mark.parametrize("form", ["t2va", "i2va", "fl2va", "ref2va"])
def test_every_call_form_matches_the_masked_dense_reference(model, form):
    """The prefix (text, keyframe/reference video and audio rows, the target soundtrack) attends and is attended
    exactly; the target video's video-video pairs follow the tile pattern."""
    kwargs = inputs(model, form)
    info = PRESETS[CLASS].read_grid(model, kwargs)
    prefix = kwargs["position_ids"].shape[0] - GRID[0] * GRID[1] * GRID[2]
    assert info.grid == GRID and info.num_text == prefix
    method, _ = recommended(CLASS, "tile")
    pattern = sta_mask(GRID, method.tile, method.window)
    with torch.no_grad():
        dense = model(**kwargs)[0]
        with ReferenceAttention(pattern, "first") as ref_mode:
            ref = model(**kwargs)[0]
        with dit_accel.apply(model, method, backend="torch") as handle:
            out = model(**kwargs)[0]
            assert handle.summary()["sparse_calls"] == 2 and ref_mode.calls == 2
        torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
        assert (out - dense).abs().max() > 1e-3  # the pattern drops pairs that matter
        assert torch.equal(model(**kwargs)[0], dense)  # remove() restores the model


def test_dense_first_steps_then_sparse(model):
    method, schedule = recommended(CLASS, "tile")
    kwargs = inputs(model, "i2va", batch=1)
    with torch.no_grad():
        dense = model(**kwargs)[0]
        with ReferenceAttention(sta_mask(GRID, method.tile, method.window), "first"):
            ref = model(**kwargs)[0]
        with dit_accel.apply(model, method, backend="torch", **schedule) as handle:
            handle.set_step(schedule["dense_steps"] - 1, 30)
            assert torch.equal(model(**kwargs)[0], dense)
            handle.set_step(schedule["dense_steps"], 30)
            torch.testing.assert_close(model(**kwargs)[0], ref, atol=2e-4, rtol=2e-4)


# ------------------------------------------------------------------ LoRA through Diffusers
def _lora_folder(root: Path) -> Path:
    """A Diffusers-format H3 LoRA (what MiniMaxH3LoraLoaderMixin.save_lora_weights writes) on the joint attention
    and feed-forward of every block, non-zero B matrices."""
    from diffusers.modular_pipelines import MiniMaxH3ModularPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = T.build_tiny_transformer("minimax_h3")
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                        target_modules=r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        donor.add_adapter(config)
    out = root / "h3-lora"
    MiniMaxH3ModularPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(donor),
                                               transformer_lora_adapter_metadata=config.to_dict())
    return out


def _h3_pipeline():
    """Diffusers' MiniMax-H3 modular pipeline around the tiny transformer (what load_lora_weights and apply see)."""
    from diffusers.modular_pipelines.minimax_h3.modular_blocks_minimax_h3 import MiniMaxH3Blocks

    pipe = MiniMaxH3Blocks().init_pipeline()
    pipe.update_components(transformer=T.build_tiny_transformer("minimax_h3"))
    return pipe


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return _lora_folder(tmp_path_factory.mktemp("h3"))


@pytest.mark.parametrize("order", ["lora-first", "apply-first"])
def test_lora_loaded_by_diffusers_beside_apply(lora, order):
    pipe = _h3_pipeline()
    t = pipe.transformer
    kwargs = inputs(t, "fl2va", batch=1)
    with torch.no_grad():
        base = t(**kwargs)[0]
    method = dit_accel.Tile(tile=(1, 8, 8), window=(3, 3, 3))
    if order == "lora-first":
        pipe.load_lora_weights(str(lora))
        handle = dit_accel.apply(pipe, method, backend="torch")
    else:
        handle = dit_accel.apply(pipe, method, backend="torch")
        pipe.load_lora_weights(str(lora))
    assert list(t.peft_config) == ["default_0"]
    with torch.no_grad():
        out = t(**kwargs)[0]
        handle.remove()
        with_lora = t(**kwargs)[0]  # remove() keeps the user's LoRA
        with ReferenceAttention(sta_mask(GRID, method.tile, method.window), "first"):
            ref = t(**kwargs)[0]
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA changes the model
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    assert list(t.peft_config) == ["default_0"]


def test_sla_with_a_diffusers_lora_saves_and_reloads(lora, tmp_path):
    """SLA on H3 with a Diffusers-loaded LoRA: save_pretrained while applied writes the base model and a weights
    folder, which a fresh model loads back (Diffusers' loader for the LoRA, apply for the projections)."""
    from diffusers import MiniMaxH3Transformer3DModel

    pipe = _h3_pipeline()
    t = pipe.transformer
    kwargs = inputs(t, "i2va", batch=1)
    pipe.load_lora_weights(str(lora))
    handle = dit_accel.apply(pipe, dit_accel.SLA(topk=0.5), backend="torch")
    with torch.no_grad():
        for proj in handle.sla_projections().values():
            proj.weight.normal_(0, 0.1)
        want = t(**kwargs)[0]
    t.save_pretrained(tmp_path / "h3")
    handle.remove()
    fresh = MiniMaxH3Transformer3DModel.from_pretrained(tmp_path / "h3").eval()
    folder = tmp_path / "h3"
    with dit_accel.apply(fresh, dit_accel.load_method(folder), weights=folder, backend="torch"), torch.no_grad():
        torch.testing.assert_close(fresh(**kwargs)[0], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ Ulysses on CPU processes
def test_ulysses_with_the_default_and_a_lora_matches_one_process(tmp_path):
    """The H3 default (Tile) and SLA, with a Diffusers-loaded LoRA, on the i2va and ref2va layouts: Ulysses over 2
    gloo processes against one process (minimax_h3_cp_worker.py)."""
    out = tmp_path / "h3cp.json"
    torchrun(2, HERE / "minimax_h3_cp_worker.py", out, tmp_path)
    cases = json.loads(out.read_text())
    assert sorted(cases) == sorted(f"{m}/{f}" for m in ("tile", "sla") for f in ("i2va", "ref2va"))
    for key, case in cases.items():
        assert case["finite"] and case["sparse_calls"] > 0 and case["lora"], (key, case)
        assert case["diff"] <= 1e-5, (key, case)


# ------------------------------------------------------------------ tiny-minimax-h3 (generate --model)
@pytest.fixture(scope="module")
def h3_pipe():
    return T.build_tiny_pipeline("tiny-minimax-h3")


def _frame(seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(128, 128, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.mark.parametrize("form", ["t2va", "i2va", "fl2va"])
def test_tiny_pipeline_matches_the_masked_dense_reference_in_every_step(h3_pipe, form):
    """The whole tiny-minimax-h3 denoising loop (video + audio, keyframes as the first/last anchors): the H3
    default's Tile against the masked-dense model, and different from dense; the audio is denoised alongside."""
    keyframes = {"t2va": {}, "i2va": {"image": _frame(1)}, "fl2va": {"image": _frame(1), "last_image": _frame(2)}}
    call = dict(prompt="a fox", num_frames=17, height=128, width=128, num_inference_steps=3, output_type="latent",
                **keyframes[form])

    def run():
        out = h3_pipe(**call, generator=torch.Generator().manual_seed(0))
        return out.frames, out.audio

    method = dit_accel.Tile(tile=(1, 8, 8), window=(3, 3, 3))
    dense = run()
    with ReferenceAttention(sta_mask((5, 8, 8), method.tile, method.window), "first") as ref_mode:
        ref = run()
    assert ref_mode.calls == 2 * 2  # 2 layers x 2 evaluations (3 sigmas)
    with dit_accel.apply(h3_pipe, method, backend="torch") as handle:
        out = run()
        assert handle.summary()["sparse_calls"] == 4
    assert out[0].shape == (1, 4, 5, 16, 16) and out[1].shape == (1, 2, 28, 4)
    for got, want, base in zip(out, ref, dense):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
        assert (got - base).abs().max() > 1e-4


def test_generate_runs_tiny_minimax_h3(tmp_path, capsys):
    from dit_accel.cli.main import main

    out = tmp_path / "h3.mp4"
    assert main(["generate", "--model", "tiny-minimax-h3", "--method", "tile", "--out", str(out)]) == 0
    record = json.loads(Path(f"{out}.json").read_text())
    assert out.is_file() and record["output_shape"][:1] == [17]
    assert record["summary"]["sparse_calls"] == 6 and record["summary"]["mean_density"] < 1
    assert record["method"] == {"method": "tile", "tile": [1, 8, 8], "window": [3, 3, 3]}


def test_apply_wraps_the_ref2va_partition_of_the_modular_pipeline():
    """Diffusers' MiniMax-H3 modular pipeline runs ref2va on its ``transformer_ref`` component: apply(pipe) wraps
    it beside ``transformer``, and its ref2va calls are sparse and match the masked-dense reference."""
    pipe = _h3_pipeline()
    ref_model = T.build_tiny_transformer("minimax_h3", seed=1)
    pipe.update_components(transformer_ref=ref_model)
    kwargs = inputs(ref_model, "ref2va", batch=1)
    method = dit_accel.Tile(tile=(1, 8, 8), window=(3, 3, 3))
    with torch.no_grad():
        with ReferenceAttention(sta_mask(GRID, method.tile, method.window), "first"):
            want = ref_model(**kwargs)[0]
        with dit_accel.apply(pipe, method, backend="torch") as handle:
            assert handle.transformers == [pipe.transformer, ref_model]
            got = ref_model(**kwargs)[0]
            assert handle.summary()["sparse_calls"] == 2
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_tiny_pipeline_dense_first_steps_follow_its_scheduler(h3_pipe):
    """dense_steps counts MiniMaxH3Scheduler's steps of the pipeline call (3 transformer calls for 4 sigmas)."""
    call = dict(prompt="a fox", num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0))
    with dit_accel.apply(h3_pipe, dit_accel.Tile(tile=(1, 8, 8), window=(3, 3, 3)), dense_steps=1,
                         backend="torch") as handle:
        h3_pipe(**call)
        summary = handle.summary()
    assert (summary["dense_calls"], summary["sparse_calls"]) == (2, 4)  # 2 layers x (1 dense, 2 sparse steps)
    with pytest.raises(ValueError, match="num_inference_steps=1: MiniMaxH3Scheduler needs at least 2"):
        h3_pipe(prompt="a fox", num_inference_steps=1)
