"""Round 10, leftovers found by the area rounds: messages that named a wrong or repeated value."""

import pytest

import dit_accel


def test_a_one_frame_tiles_block_size_advice_names_distinct_valid_sizes():
    """Before: "e.g. 16 (the whole tile) or 16" for a (1, 4, 4) tile (the whole tile, then its trailing dims,
    which are the same 16 tokens)."""
    with pytest.raises(ValueError, match=r"e\.g\. 16 \(the whole tile\) or 8 or 4;") as err:
        dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1), block_size=63).plan((2, 8, 8))
    assert "or 16" not in str(err.value)
    for size in (16, 8, 4):  # each named size is a valid block for that tile
        dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1), block_size=size).plan((2, 8, 8))


def test_a_plan_read_from_an_sta_strategy_names_the_file_when_refused(tmp_path):
    """Before: "the plan is for 1 heads per attention layer ..." (the ComfyUI plan node and apply read the file)."""
    path = tmp_path / "mask_strategy.json"
    path.write_text('{"0_0_0": [3, 3, 3], "0_1_0": [3, 3, 3]}')
    plan = dit_accel.SparsePlan.load(path)
    with pytest.raises(ValueError, match=f"^plan {path} is for 1 heads per attention layer; this model's layers have 2"):
        plan.check_model("WanTransformer3DModel", [2, 2])


def test_calibrate_refuses_a_dense_reference_with_nan_and_still_scores_a_candidates_nan_as_failing():
    """Before: the dense run's NaN frames were cast to black, and every plan was calibrated against them."""
    import types

    import numpy as np

    from dit_accel.calibrate.run import generate_videos

    def pipe(prompt, generator, output_type, callback_on_step_end, **kwargs):
        frames = np.full((len(prompt), 2, 4, 4, 3), 0.5, dtype=np.float32)
        frames[-1, 1, 0, 0, 0] = np.nan
        return types.SimpleNamespace(frames=frames)

    jobs = [("a red circle moving left", 0), ("a blue square moving up", 3)]
    with pytest.raises(ValueError, match=r"^the dense run returned 1 NaN or inf value\(s\) for prompt 'a blue square "
                                         r"moving up', seed 3 .*try --dtype float32$"):
        generate_videos(pipe, jobs, {}, batch_size=2, reference=True)
    videos = generate_videos(pipe, jobs, {}, batch_size=2)  # a candidate's: scored (black pixel, a low PSNR)
    assert videos[1].dtype == np.uint8 and videos[1][1, 0, 0, 0] == 0 and videos[0].min() == 128


@pytest.mark.parametrize("command", ["kernels", "gpu"])
@pytest.mark.parametrize("shapes", [",", "", " , "])
def test_bench_shapes_that_name_no_substring_are_refused_not_read_as_every_shape(command, shapes, capsys, tmp_path):
    """Before: `bench kernels --shapes ,` kept every shape (the empty substring is in every name) and started the
    full benchmark (over 100 s on a CPU)."""
    from dit_accel.cli.main import main

    args = ["bench", command, "--shapes", shapes] + (["--quick"] if command == "kernels" else ["--out", str(tmp_path / "g")])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--shapes {shapes!r} matches none of" in err


@pytest.mark.parametrize("options, calls", [
    ({"dense_steps": 2}, (4, 0)),        # steps 2 and 3 of 4 (before: the first call counted as step 0, dense)
    ({"dense_steps": 3}, (2, 2)),        # step 2 dense, step 3 sparse
    ({"dense_last_steps": 1}, (2, 2)),   # step 3 dense
], ids=["dense_steps=2", "dense_steps=3", "dense_last_steps=1"])
def test_video_to_video_at_half_strength_numbers_steps_in_the_full_schedule(options, calls):
    """WanVideoToVideoPipeline at strength 0.5 of 4 steps runs steps 2 and 3 without set_begin_index: the
    scheduler finds its first index from the timestep. Before: dit_accel counted that first call as step 0 and the
    second as step 3, so dense_steps=2 made half the run dense (2 sparse, 2 dense layer calls)."""
    import numpy as np
    import torch
    from diffusers import WanVideoToVideoPipeline
    from PIL import Image

    from dit_accel.models import tiny as T

    base = T.build_tiny_pipeline("tiny-wan")
    pipe = WanVideoToVideoPipeline(**{k: base.components[k] for k in
                                      ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")})
    video = [Image.fromarray((np.random.RandomState(i).rand(128, 128, 3) * 255).astype(np.uint8)) for i in range(9)]
    tile = dit_accel.Tile(tile=(1, 4, 4), window=(1, 1, 1))
    with dit_accel.apply(pipe, tile, backend="torch", **options) as handle:
        pipe(video=video, prompt="a cat", num_inference_steps=4, strength=0.5, height=128, width=128,
             max_sequence_length=16, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        summary = handle.summary()
    assert (summary["sparse_calls"], summary["dense_calls"]) == calls


@pytest.mark.parametrize("topk", ["nan", "0", "1.5", "inf"])
def test_convert_names_its_topk_flag(topk, tmp_path, capsys):
    """Before: "SLA.topk=nan is invalid" (the config's name; the user typed --topk)."""
    from dit_accel.cli.main import main

    assert main(["convert", str(tmp_path / "x.pth"), "--out", str(tmp_path / "w"), "--topk", topk]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dit-accel convert: --topk must be a number in (0, 1]") and "\n" not in err
    assert not (tmp_path / "w").exists()


def test_run_eval_from_python_gives_a_tiny_model_its_smoke_run_sizes(tmp_path, monkeypatch):
    """Before: ``run_eval(EvalSettings(model="tiny-wan", ...))`` without sizes ran Wan's own 81x480x832 at 50 steps
    (hours on a CPU, looking hung); only the CLI filled in the tiny sizes. A size the caller gives is kept."""
    from dit_accel.eval import runner
    from dit_accel.models.tiny import TINY_DEFAULTS

    seen = {}

    def stop(settings, *args, **kwargs):
        seen["settings"] = settings
        raise RuntimeError("stop before loading")

    monkeypatch.setattr(runner, "_check_reach", lambda pipe, settings: stop(settings))
    settings = runner.EvalSettings(model="tiny-wan", prompts=["a cat"], height=64)
    with pytest.raises(RuntimeError, match="stop before loading"):
        runner.run_eval(settings, [], tmp_path / "eval", pipe=object())
    filled = seen["settings"]
    want = TINY_DEFAULTS["tiny-wan"]
    assert (filled.frames, filled.height, filled.width, filled.steps, filled.max_sequence_length) == (
        want["num_frames"], 64, want["width"], want["num_inference_steps"], want["max_sequence_length"])
    assert filled.guidance_scale is None and settings.frames is None  # (not in its defaults; the caller's unchanged)
    other = runner.EvalSettings(model="org/some-model", prompts=["a cat"])
    assert other.with_tiny_defaults() is other
